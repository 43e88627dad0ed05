"""The validate stage on tiny files: clean data passes, each check can fail, bad input exits 2."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pandas as pd
import pytest
import yaml

from tasks import validate
from tasks.common import EXIT_BAD_INPUT, EXIT_CHECK_FAILED, stage_main
from tests.browser import remote_resources, render_offline, requires_chromium
from tests.conftest import REPO_ROOT, make_rows, write_csv
from textgate.config import Params, parse_params

Rows = list[tuple[Any, Any]]


def params_dict(tmp_path: Path, data: dict[str, Any], **checks: Any) -> dict[str, Any]:
    """The real params.yaml pointed at `tmp_path`, with thresholds for tiny data."""
    raw = yaml.safe_load((REPO_ROOT / "params.yaml").read_text(encoding="utf-8"))
    raw["data"].update({"raw_dir": str(tmp_path / "raw"), "train_file": "train.csv", **data})
    raw["validate"].update(
        {"output_dir": str(tmp_path / "validate"), "min_examples_per_class": 3, **checks}
    )
    # No must-pass cases: their labels are checked against the data's by the tests below.
    must_pass = tmp_path / "must_pass.csv"
    if not must_pass.exists():
        must_pass.write_text("# no cases yet\ntext,label\n", encoding="utf-8")
    raw["evaluate"]["must_pass_file"] = str(must_pass)
    return raw


def make_params(tmp_path: Path, data: dict[str, Any] | None = None, **checks: Any) -> Params:
    return parse_params(params_dict(tmp_path, data or {}, **checks))


def run_stage(
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    data: dict[str, Any] | None = None,
    gate: dict[str, Any] | None = None,
    **checks: Any,
) -> tuple[int, str, dict[str, Any] | None]:
    """Run `python -m tasks.validate` in-process; return exit code, stderr and report.json."""
    path = tmp_path / "params.yaml"
    raw = params_dict(tmp_path, data or {}, **checks)
    raw["gate"].update(gate or {})
    path.write_text(yaml.safe_dump(raw), encoding="utf-8")
    code = stage_main("validate", validate.run, ["--params", str(path)])
    report_path = tmp_path / "validate" / "report.json"
    report = json.loads(report_path.read_text(encoding="utf-8")) if report_path.exists() else None
    return code, capsys.readouterr().err, report


def check(report: dict[str, Any], name: str) -> dict[str, Any]:
    return next(item for item in report["checks"] if item["name"] == name)


def failed_names(report: dict[str, Any]) -> list[str]:
    return [item["name"] for item in report["checks"] if not item["success"]]


TRAIN_CHECKS = [
    "required_columns",
    "text_not_null",
    "text_not_empty",
    "text_length",
    "label_not_null",
    "labels_in_set",
    "header_rows",
    "min_examples_per_class",
    "duplicate_fraction",
    "conflicting_labels",
    "two_or_more_labels",
    "majority_class_share",
    "label_variants",
    "must_pass_labels",
    "class_recall_floor_labels",
    "text_tokens",
    "tokenizer_coverage",
    "base_model_available",
]


def test_clean_dataset_passes_and_writes_report_and_its_page(tmp_path):
    rows = make_rows(per_class=4)
    write_csv(tmp_path / "raw" / "train.csv", rows)
    params = make_params(tmp_path)
    report = validate.run(params)
    assert report.success
    written = json.loads((tmp_path / "validate" / "report.json").read_text(encoding="utf-8"))
    assert written == report.to_dict()
    assert list(written) == [
        "success",
        "n_rows",
        "n_test_rows",
        "labels",
        "label_source",
        "class_counts",
        "checks",
        "repairs",
    ]
    assert written["success"] is True
    assert written["n_rows"] == len(rows)
    assert written["n_test_rows"] is None
    assert written["labels"] == ["login", "lost_card", "refund"]
    assert written["label_source"] == "inferred"
    assert written["class_counts"] == {"login": 4, "lost_card": 4, "refund": 4}
    assert [item["name"] for item in written["checks"]] == TRAIN_CHECKS
    for item in written["checks"]:
        assert item["success"] is True
        assert item["examples"] == []
        assert item["summary"].endswith(".")
    page = (tmp_path / "validate" / "report.html").read_text(encoding="utf-8")
    assert 'Data validation: <span class="passed">passed</span>' in page
    assert all(f"<td>{name}</td>" in page for name in TRAIN_CHECKS)
    assert not (tmp_path / "validate" / "data_docs").exists()


def test_declared_labels_and_a_clean_test_file_pass(tmp_path, capsys):
    rows = make_rows(per_class=6)
    write_csv(tmp_path / "raw" / "train.csv", rows[::2])
    write_csv(tmp_path / "raw" / "test.csv", rows[1::2])
    labels = ["refund", "lost_card", "login"]
    code, err, report = run_stage(tmp_path, capsys, {"test_file": "test.csv", "labels": labels})
    assert code == 0, err
    assert report["success"] is True
    assert report["labels"] == labels
    assert report["label_source"] == "declared"
    assert report["n_test_rows"] == 9
    assert list(report["class_counts"]) == labels
    names = [item["name"] for item in report["checks"]]
    assert "train_test_overlap" in names
    assert "test_labels_in_set" in names and "test_text_not_null" in names


def test_duplicates_exactly_at_the_threshold_pass(tmp_path, capsys):
    rows = make_rows(per_class=6)[:-2]  # 16 unique rows + 2 duplicates: 2/18 = 0.111...
    rows += rows[:2]
    write_csv(tmp_path / "raw" / "train.csv", rows)
    code, err, report = run_stage(tmp_path, capsys, max_duplicate_fraction=2 / 18)
    assert code == 0, err
    assert "2 of 18 rows" in check(report, "duplicate_fraction")["summary"]


LONG_TEXT = "please help with my refund " * 80  # 2160 characters: over max_text_chars=2000

# (name, extra train rows, extra data params, failing check, offending text in the message)
FAILURES = [
    ("empty text", [("", "refund")], {}, "text_not_empty", '""'),
    ("blank text", [("   ", "login")], {}, "text_not_empty", '"   "'),
    # Cleaning in prepare removes invisible characters too, which would leave nothing.
    ("invisible text", [("\u200b\u200b", "login")], {}, "text_not_empty", '"\u200b\u200b"'),
    ("too long", [(LONG_TEXT, "refund")], {}, "text_length", LONG_TEXT[:79] + "…"),
    ("too short", [("x", "login")], {}, "text_length", '"x"'),
    ("missing label", [("hello what is this", "")], {}, "label_not_null", "hello what is this"),
    (
        "label not declared",
        [("hello my parcel is late", "delivery"), ("where is my parcel", "delivery")],
        {"labels": ["refund", "lost_card", "login"]},
        "labels_in_set",
        "hello my parcel is late",
    ),
    (
        "class with one example",
        [("one lonely example", "rare")],
        {},
        "min_examples_per_class",
        "rare",
    ),
    (
        "declared class without examples",
        [],
        {"labels": ["refund", "lost_card", "login", "delivery"]},
        "min_examples_per_class",
        "delivery",
    ),
    (
        "too many duplicates",
        [("hi refund thanks", "refund")] * 2 + [("hi login thanks", "login")] * 2,
        {},
        "duplicate_fraction",
        "hi login thanks",
    ),
    (
        "conflicting labels",
        [("my card and my password", "lost_card"), ("my card and  my password", "login")],
        {},
        "conflicting_labels",
        "my card and my password",
    ),
]


@pytest.mark.parametrize(
    ("extra", "data", "name", "offending"),
    [case[1:] for case in FAILURES],
    ids=[case[0] for case in FAILURES],
)
def test_each_check_fails_for_its_reason(tmp_path, capsys, extra, data, name, offending):
    rows = make_rows(per_class=4) + extra
    write_csv(tmp_path / "raw" / "train.csv", rows)
    # One long text is also a share of truncated texts: that check has tests of its own.
    code, err, report = run_stage(tmp_path, capsys, data, max_truncated_fraction=1.0)
    assert code == EXIT_CHECK_FAILED, err
    assert err.startswith("validate failed: ")
    assert f"- {name}: " in err
    assert offending in err
    assert report["success"] is False
    assert failed_names(report) == [name]
    failed = check(report, name)
    assert failed["examples"]
    assert offending.strip('"').rstrip("…") in json.dumps(failed["examples"], ensure_ascii=False)
    page = (tmp_path / "validate" / "report.html").read_text(encoding="utf-8")
    assert f'<td>{name}</td><td><span class="failed">failed</span>' in page


def test_offending_rows_are_0_based_data_rows(tmp_path, capsys):
    rows = make_rows(per_class=4)
    rows.insert(5, ("   ", "refund"))
    write_csv(tmp_path / "raw" / "train.csv", rows)
    code, err, report = run_stage(tmp_path, capsys)
    assert code == EXIT_CHECK_FAILED
    assert check(report, "text_not_empty")["examples"] == [
        {"row": 5, "text": "   ", "label": "refund"}
    ]
    assert "row 5 [label 'refund']" in err


def test_null_text_in_parquet_fails_text_not_null(tmp_path, capsys):
    rows = make_rows(per_class=4) + [(None, "refund")]
    (tmp_path / "raw").mkdir()
    pd.DataFrame(rows, columns=["text", "label"]).to_parquet(tmp_path / "raw" / "train.parquet")
    code, err, report = run_stage(tmp_path, capsys, {"train_file": "train.parquet"})
    assert code == EXIT_CHECK_FAILED, err
    assert failed_names(report) == ["text_not_null"]
    assert check(report, "text_not_null")["examples"] == [
        {"row": 12, "text": None, "label": "refund"}
    ]
    assert "- text_not_null: 1 of 13 rows have a null text" in err
    assert "row 12 [label 'refund']: <null>" in err


def test_several_failures_are_all_listed(tmp_path, capsys):
    rows = make_rows(per_class=4) + [("", "refund"), ("x", "login"), ("only one", "rare")]
    write_csv(tmp_path / "raw" / "train.csv", rows)
    code, err, report = run_stage(tmp_path, capsys)
    assert code == EXIT_CHECK_FAILED
    assert failed_names(report) == ["text_not_empty", "text_length", "min_examples_per_class"]
    assert "3 of 18 data checks failed" in err


def test_train_test_overlap_fails(tmp_path, capsys):
    rows = make_rows(per_class=6)
    train, test = rows[::2], rows[1::2] + [rows[0]]
    write_csv(tmp_path / "raw" / "train.csv", train)
    write_csv(tmp_path / "raw" / "test.csv", test)
    code, err, report = run_stage(tmp_path, capsys, {"test_file": "test.csv"})
    assert code == EXIT_CHECK_FAILED, err
    assert failed_names(report) == ["train_test_overlap"]
    assert "- train_test_overlap: 1 of 9 train rows" in err
    assert rows[0][0] in err
    assert check(report, "train_test_overlap")["examples"] == [
        {"row": 0, "text": rows[0][0], "label": rows[0][1]}
    ]


def test_test_label_unseen_in_train_fails(tmp_path, capsys):
    rows = make_rows(per_class=6)
    write_csv(tmp_path / "raw" / "train.csv", rows[::2])
    write_csv(tmp_path / "raw" / "test.csv", rows[1::2] + [("where is my parcel", "delivery")])
    code, err, report = run_stage(tmp_path, capsys, {"test_file": "test.csv"})
    assert code == EXIT_CHECK_FAILED, err
    assert failed_names(report) == ["test_labels_in_set"]
    assert "where is my parcel" in err
    assert "(found 'delivery')" in err
    assert report["n_test_rows"] == 10
    assert check(report, "test_labels_in_set")["examples"] == [
        {"row": 9, "text": "where is my parcel", "label": "delivery"}
    ]


def test_test_file_with_blank_text_fails(tmp_path, capsys):
    rows = make_rows(per_class=6)
    write_csv(tmp_path / "raw" / "train.csv", rows[::2])
    write_csv(tmp_path / "raw" / "test.csv", rows[1::2] + [(" ", "refund")])
    code, err, report = run_stage(tmp_path, capsys, {"test_file": "test.csv"})
    assert code == EXIT_CHECK_FAILED, err
    assert failed_names(report) == ["test_text_not_empty"]


def test_parquet_input_passes(tmp_path, capsys):
    (tmp_path / "raw").mkdir()
    frame = pd.DataFrame(make_rows(per_class=4), columns=["message", "intent"])
    frame.to_parquet(tmp_path / "raw" / "train.parquet")
    data = {"train_file": "train.parquet", "text_column": "message", "label_column": "intent"}
    code, err, report = run_stage(tmp_path, capsys, data)
    assert code == 0, err
    assert report["success"] is True
    assert "'message'" in check(report, "required_columns")["summary"]


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (None, "data file not found"),
        (b"message,label\nhello there,refund\n", "missing required column(s) ['text']"),
        (b"text,label\n", "has no rows"),
        (b"text,label\nhello \xff\xfe,refund\n", "not valid utf-8 at byte 17 (line 2)"),
    ],
    ids=["missing file", "missing column", "header only", "not utf-8"],
)
def test_bad_input_exits_2_with_a_clear_message(tmp_path, capsys, content, message):
    (tmp_path / "raw").mkdir()
    if content is not None:
        (tmp_path / "raw" / "train.csv").write_bytes(content)
    code, err, report = run_stage(tmp_path, capsys, {"encoding": "utf-8"})
    assert code == EXIT_BAD_INPUT
    assert err.startswith("validate: error: ")
    assert message in err
    assert "train.csv" in err
    assert report is None


def test_bad_input_removes_the_report_of_an_earlier_run(tmp_path, capsys):
    write_csv(tmp_path / "raw" / "train.csv", make_rows(per_class=4))
    assert run_stage(tmp_path, capsys)[0] == 0
    (tmp_path / "raw" / "train.csv").write_bytes(b"text,label\n")
    code, _, report = run_stage(tmp_path, capsys)
    assert code == EXIT_BAD_INPUT
    assert report is None
    assert not (tmp_path / "validate" / "report.html").exists()


@requires_chromium
def test_the_report_page_renders_offline(tmp_path, capsys):
    rows = make_rows(per_class=4)
    rows.insert(5, ("   ", "refund"))
    write_csv(tmp_path / "raw" / "train.csv", rows)
    assert run_stage(tmp_path, capsys)[0] == EXIT_CHECK_FAILED
    page = tmp_path / "validate" / "report.html"
    assert remote_resources(page.read_text(encoding="utf-8")) == []
    dom = render_offline(page.as_uri())
    assert remote_resources(dom) == []
    assert '<table id="checks">' in dom
    assert '<td>text_not_empty</td><td><span class="failed">failed</span>' in dom
    assert "row 5 [label 'refund']" in dom


def distinct_rows(label: str, n: int) -> Rows:
    return [(f"message number {i} about {label}", label) for i in range(n)]


def test_a_class_of_one_repeated_text_fails_min_examples(tmp_path, capsys):
    # Four rows, but prepare keeps one after de-duplication: too few to split.
    rows = make_rows(per_class=4) + [("where is my parcel", "delivery")] * 4
    write_csv(tmp_path / "raw" / "train.csv", rows)
    code, err, report = run_stage(tmp_path, capsys, max_duplicate_fraction=0.5)
    assert code == EXIT_CHECK_FAILED, err
    assert failed_names(report) == ["min_examples_per_class"]
    assert "(smallest: 'delivery' with 1 in 4 rows)" in err
    assert "fewer than 3 distinct texts" in err


def test_labels_that_look_like_row_ids_are_named(tmp_path, capsys):
    rows = [(text, str(i)) for i, (text, _) in enumerate(make_rows(per_class=4))]
    write_csv(tmp_path / "raw" / "train.csv", rows)
    code, err, report = run_stage(tmp_path, capsys)
    assert code == EXIT_CHECK_FAILED, err
    assert failed_names(report) == ["min_examples_per_class"]
    assert "looks like free text or row ids: check data.label_column" in err


def test_a_header_repeated_as_data_fails(tmp_path, capsys):
    rows = make_rows(per_class=4)
    rows.insert(6, ("Text ", "LABEL"))
    write_csv(tmp_path / "raw" / "train.csv", rows)
    labels = ["refund", "lost_card", "login"]
    code, err, report = run_stage(tmp_path, capsys, {"labels": labels})
    assert code == EXIT_CHECK_FAILED, err
    assert "header_rows" in failed_names(report)
    assert "- header_rows: 1 of 13 rows repeat the header ('text', 'label') as data" in err
    assert check(report, "header_rows")["examples"] == [
        {"row": 6, "text": "Text ", "label": "LABEL"}
    ]


@pytest.mark.parametrize("min_accuracy", [0.85, 0.0])
def test_a_single_label_fails(tmp_path, capsys, min_accuracy):
    write_csv(tmp_path / "raw" / "train.csv", distinct_rows("refund", 12))
    code, err, report = run_stage(tmp_path, capsys, gate={"min_accuracy": min_accuracy})
    assert code == EXIT_CHECK_FAILED, err
    assert "- two_or_more_labels: The labelled rows have only the label 'refund'" in err
    if min_accuracy:
        assert failed_names(report) == ["two_or_more_labels", "majority_class_share"]
        assert check(report, "majority_class_share")["examples"] == [
            {"label": "refund", "n_examples": 12}
        ]
    else:  # no accuracy floor: no majority check, the label count still fails
        assert failed_names(report) == ["two_or_more_labels"]
        assert "majority_class_share" not in [item["name"] for item in report["checks"]]


@pytest.mark.parametrize(
    ("n_refund", "min_accuracy", "passes"),
    [(34, 0.85 + 1e-9, True), (34, 0.85, False), (40, 0.85, False)],
    ids=["share just under the floor", "share at the floor", "share over the floor"],
)
def test_majority_class_share_is_held_under_the_accuracy_floor(
    tmp_path, capsys, n_refund, min_accuracy, passes
):
    # 34 of 34 + 3 + 3 rows is 0.85: a model always answering 'refund' meets a 0.85 floor.
    rows = distinct_rows("refund", n_refund) + distinct_rows("login", 3)
    rows += distinct_rows("lost_card", 3)
    write_csv(tmp_path / "raw" / "train.csv", rows)
    code, err, report = run_stage(tmp_path, capsys, gate={"min_accuracy": min_accuracy})
    assert failed_names(report) == ([] if passes else ["majority_class_share"])
    assert code == (0 if passes else EXIT_CHECK_FAILED), err
    summary = check(report, "majority_class_share")["summary"]
    assert f"The largest class 'refund' holds {n_refund / (n_refund + 6):.1%}" in summary
    if not passes:
        assert "always answering it would meet gate.min_accuracy" in err


def test_a_test_file_of_mostly_one_class_fails(tmp_path, capsys):
    write_csv(tmp_path / "raw" / "train.csv", make_rows(per_class=4))
    test = distinct_rows("refund", 18) + distinct_rows("login", 1) + distinct_rows("lost_card", 1)
    write_csv(tmp_path / "raw" / "test.csv", test)
    code, err, report = run_stage(tmp_path, capsys, {"test_file": "test.csv"})
    assert code == EXIT_CHECK_FAILED, err
    assert failed_names(report) == ["test_majority_class_share"]
    assert "'refund' holds 90.0% of 20 labelled rows" in err


def test_importing_the_stage_does_not_import_great_expectations():
    """Great Expectations takes seconds to import: only running the expectations may load it."""
    probe = "import sys, tasks.validate; print(sorted(m for m in sys.modules if 'great_exp' in m))"
    out = subprocess.run(
        [sys.executable, "-c", probe], cwd=REPO_ROOT, capture_output=True, text=True, check=True
    )
    assert out.stdout.strip() == "[]"


# --- the base model's tokenizer must read the texts ----------------------------------------

CHINESE_ROWS = [
    (text, label)
    for label, texts in {
        "refund": ["我想退款", "请帮我退款", "退款什么时候到账", "怎么申请退款"],
        "lost_card": ["我的银行卡丢了", "卡被偷了，请冻结", "银行卡找不到了", "请挂失我的卡"],
        "login": ["忘记密码了", "登录不了账户", "密码重置失败", "账户被锁定了"],
    }.items()
    for text in texts
]


def test_text_the_tokenizer_cannot_read_fails_and_names_a_model_that_can(tmp_path, capsys):
    write_csv(tmp_path / "raw" / "train.csv", CHINESE_ROWS)
    code, err, report = run_stage(tmp_path, capsys)
    assert code == EXIT_CHECK_FAILED
    assert failed_names(report) == ["tokenizer_coverage"]
    result = check(report, "tokenizer_coverage")
    # The English MiniLM vocabulary lacks most of these characters (退, 款, 账, ...).
    assert (
        "unknown to the tokenizer of train.base_model (bundled:all-MiniLM-L6-v2)"
        in result["summary"]
    )
    assert (
        "set train.base_model to an encoder that reads them, e.g. bert-base-chinese"
        in (result["summary"])
    )
    assert "validate.max_unknown_char_share" in result["summary"]
    assert {"character": "退", "count": 4} in result["examples"]
    assert "tokenizer_coverage" in err


def test_a_higher_unknown_share_allowed_lets_the_same_data_through(tmp_path, capsys):
    write_csv(tmp_path / "raw" / "train.csv", CHINESE_ROWS)
    code, _, report = run_stage(tmp_path, capsys, max_unknown_char_share=1.0)
    assert code == 0, failed_names(report)
    assert check(report, "tokenizer_coverage")["success"]


def test_a_base_model_that_cannot_be_loaded_is_named(tmp_path, capsys):
    write_csv(tmp_path / "raw" / "train.csv", make_rows(per_class=4))
    path = tmp_path / "params.yaml"
    raw = params_dict(tmp_path, {})
    raw["train"]["base_model"] = str(tmp_path / "no-such-model")
    path.write_text(yaml.safe_dump(raw), encoding="utf-8")
    assert stage_main("validate", validate.run, ["--params", str(path)]) == EXIT_CHECK_FAILED
    err = capsys.readouterr().err
    assert "base_model_available" in err and "train.base_model: cannot load" in err
