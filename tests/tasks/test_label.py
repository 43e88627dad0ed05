"""`textgate label export|import` on a workspace: the request log in, batches out."""

from __future__ import annotations

import json
import threading
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pandas as pd
import pytest

from flows.cli import main
from tasks import label as steps
from tests.conftest import make_rows, write_csv
from tests.helpers import make_params, tiny_overrides
from textgate.artifacts import request_record
from textgate.config import Params
from textgate.errors import DataError
from textgate.io import read_training


@pytest.fixture
def workspace(tmp_path: Path, tiny_base_model: Path) -> Params:
    write_csv(tmp_path / "raw" / "train.csv", make_rows(per_class=12))
    overrides = tiny_overrides(tmp_path, tiny_base_model)
    overrides["data"]["train_file"] = ["train.csv", "batches/*.csv"]
    overrides["monitor"] = {"request_log": str(tmp_path / "requests.jsonl")}
    overrides["label"] = {"state_dir": str(tmp_path / "label"), "max_tasks": 8}
    return make_params(overrides)


def log(params: Params, *texts: str, abstained: bool = False, margin: float = 0.9) -> None:
    with params.monitor.request_log.open("a", encoding="utf-8") as handle:
        for text in texts:
            record = request_record(
                ts=datetime.now(UTC).isoformat(),
                request_id="r",
                model_tag="textgate-classifier:v1",
                text=text,
                label="unknown" if abstained else "refund",
                best_label="refund",
                score=0.4 if abstained else 0.9,
                abstained=abstained,
                margin=margin,
            )
            handle.write(json.dumps(record) + "\n")


def test_export_on_no_or_empty_or_malformed_log_says_nothing_to_review(workspace: Params) -> None:
    out = workspace.label.state_dir / "q.json"
    with pytest.raises(steps.NothingToReview, match="no request log"):
        steps.export_for_review(workspace, out)
    workspace.monitor.request_log.write_text("not json\n{}\n")
    with pytest.raises(steps.NothingToReview, match=r"2 malformed line\(s\)"):
        steps.export_for_review(workspace, out)
    assert not out.exists()


def test_export_writes_tasks_and_csv_once_per_text(workspace: Params) -> None:
    log(workspace, *[f"where is refund number {i}" for i in range(6)])
    log(workspace, "what is this thing", "WHAT is this thing", abstained=True)
    log(workspace, "refund or card", margin=0.05)
    out = workspace.label.state_dir / "q.json"
    result = steps.export_for_review(workspace, out)
    tasks = json.loads(out.read_text())
    texts = [task["data"]["text"] for task in tasks]
    assert len(texts) == len(set(t.casefold() for t in texts)) == result.total
    # 8 distinct texts, max_tasks 8 at 25% each: 2 random, then the abstained and the
    # low-margin ones (unless the random sample took them already).
    assert result.counts["random"] == 2
    assert {"WHAT is this thing", "refund or card"} <= set(texts)
    reasons = {task["data"]["text"]: task["data"]["reason"] for task in tasks}
    assert reasons["WHAT is this thing"] in ("random", "abstained")
    assert reasons["refund or card"] in ("random", "low_margin")
    assert "novel" in result.counts and result.counts["novel"] == 0  # no production model
    frame = pd.read_csv(out.with_suffix(".csv"), keep_default_na=False)
    assert list(frame["text"]) == texts and set(frame["label"]) == {""}
    # The cursor moved: the same requests are not exported again; new ones are.
    with pytest.raises(steps.NothingToReview, match="no new request"):
        steps.export_for_review(workspace, out)
    log(workspace, "what is this thing", "a brand new question", abstained=True)
    again = steps.export_for_review(workspace, out)
    assert [t["data"]["text"] for t in json.loads(out.read_text())] == ["a brand new question"]
    assert again.total == 1


def write_labels(path: Path, rows: list[tuple[str, str, str]]) -> Path:
    frame = pd.DataFrame(rows, columns=["text", "label", "reason"])
    frame["suggested"] = "refund"
    frame["model_tag"] = "textgate-classifier:v1"
    frame.to_csv(path, index=False)
    return path


def test_import_writes_a_batch_the_training_glob_reads_and_keeps_the_random_sample_apart(
    workspace: Params, tmp_path: Path
) -> None:
    source = write_labels(
        tmp_path / "labelled.csv",
        [
            ("send my money back please", "refund", "abstained"),
            ("my card is gone", "lost_card", "random"),
        ],
    )
    result = steps.import_labels(workspace, *steps.read_labels_file(source), allow_new_labels=False)
    assert result.batch is not None and result.batch.parent.name == "batches"
    assert result.live is not None and result.live.parent.name == "live"
    training = read_training(workspace.data)
    assert "send my money back please" in set(training["text"])
    assert "my card is gone" not in set(training["text"])  # held out: the live estimate
    assert set(training["file"]) == {"train.csv", f"batches/{result.batch.name}"}
    # The same file again: every row was imported already; nothing is written.
    before = sorted(p.name for p in workspace.data.raw_dir.rglob("*.csv"))
    with pytest.raises(DataError, match="nothing to import"):
        steps.import_labels(workspace, *steps.read_labels_file(source), allow_new_labels=False)
    assert sorted(p.name for p in workspace.data.raw_dir.rglob("*.csv")) == before


def test_import_with_unknown_labels_or_wrong_columns_writes_nothing(
    workspace: Params, tmp_path: Path
) -> None:
    bad = write_labels(tmp_path / "bad.csv", [("a new kind of thing", "brand_new", "novel")])
    with pytest.raises(DataError, match="brand_new.*--allow-new-labels"):
        steps.import_labels(workspace, *steps.read_labels_file(bad), allow_new_labels=False)
    pd.DataFrame({"message": ["x"], "intent": ["refund"]}).to_csv(
        tmp_path / "cols.csv", index=False
    )
    with pytest.raises(DataError, match="missing column"):
        steps.read_labels_file(tmp_path / "cols.csv")
    # A labeller's spreadsheet saved in a legacy code page is decoded, not refused.
    (tmp_path / "latin.csv").write_bytes("text,label\ncaf\xe9 refund,refund\n".encode("cp1252"))
    rows, _ = steps.read_labels_file(tmp_path / "latin.csv")
    assert [row.text for row in rows] == ["caf\xe9 refund"]
    assert not (workspace.data.raw_dir / "batches").exists()
    result = steps.import_labels(workspace, *steps.read_labels_file(bad), allow_new_labels=True)
    assert result.report.new_labels == ["brand_new"]


def test_two_imports_at_once_both_land_whole(workspace: Params, tmp_path: Path) -> None:
    files = [
        write_labels(
            tmp_path / f"l{n}.csv",
            [(f"text {n} number {i}", "refund", "novel") for i in range(200)],
        )
        for n in range(2)
    ]
    errors: list[BaseException] = []

    def run(path: Path) -> None:
        try:
            steps.import_labels(workspace, *steps.read_labels_file(path), allow_new_labels=False)
        except BaseException as error:  # noqa: BLE001
            errors.append(error)

    threads = [threading.Thread(target=run, args=(path,)) for path in files]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors
    batches = sorted((workspace.data.raw_dir / "batches").glob("*.csv"))
    assert len(batches) == 2
    assert sorted(len(pd.read_csv(path)) for path in batches) == [200, 200]


def test_the_random_sample_joins_training_after_the_holdout(
    workspace: Params, tmp_path: Path
) -> None:
    source = write_labels(tmp_path / "l.csv", [("is my refund coming", "refund", "random")])
    result = steps.import_labels(workspace, *steps.read_labels_file(source), allow_new_labels=False)
    assert steps.release_expired_live(workspace, datetime.now(UTC) + timedelta(days=29)) == []
    released = steps.release_expired_live(workspace, datetime.now(UTC) + timedelta(days=31))
    assert [path.name for path in released] == [f"live-{result.live.name}"]
    assert "is my refund coming" in set(read_training(workspace.data)["text"])


def test_validation_names_the_batch_of_an_offending_row(workspace: Params) -> None:
    batch = workspace.data.raw_dir / "batches" / "20260101T000000000000Z.csv"
    write_csv(batch, [("fine text here", "refund"), ("", "refund")])
    frame = read_training(workspace.data)
    assert frame.loc[frame["file"] == "batches/" + batch.name, "file_row"].tolist() == [0, 1]
    from textgate import validation as v

    rows = v.row_features(frame)
    blank = rows.index[rows[v.TEXT_BLANK]]
    (example,) = v.row_examples(rows, blank)
    assert v.describe_example(example).startswith(f"row 1 of batches/{batch.name}")


def test_cli_export_and_import_round_trip(workspace: Params, tmp_path: Path, capsys) -> None:
    import yaml

    from tests.helpers import merge, raw_params

    params_file = tmp_path / "params.yaml"
    overrides = tiny_overrides(tmp_path, Path(workspace.train.base_model))
    overrides["data"]["train_file"] = ["train.csv", "batches/*.csv"]
    overrides["monitor"] = {"request_log": str(workspace.monitor.request_log)}
    overrides["label"] = {"state_dir": str(workspace.label.state_dir)}
    params_file.write_text(yaml.safe_dump(merge(raw_params(), overrides)))
    assert main(["label", "export", "--params", str(params_file)]) == 0
    assert "nothing to review" in capsys.readouterr().out
    log(workspace, "is there an office near me", abstained=True)
    out = tmp_path / "q.json"
    assert main(["label", "export", "--params", str(params_file), "--out", str(out)]) == 0
    frame = pd.read_csv(out.with_suffix(".csv"), keep_default_na=False)
    frame["label"] = "refund"
    frame.to_csv(tmp_path / "done.csv", index=False)
    assert main(["label", "import", "--params", str(params_file), str(tmp_path / "done.csv")]) == 0
    assert "wrote training batch" in capsys.readouterr().out
    frame["label"] = "nope"
    frame.to_csv(tmp_path / "bad.csv", index=False)
    assert main(["label", "import", "--params", str(params_file), str(tmp_path / "bad.csv")]) == 2
    assert "'nope'" in capsys.readouterr().err
