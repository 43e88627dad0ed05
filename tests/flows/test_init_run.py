"""`textgate init` on an awkward file, then a whole pipeline run on the params it wrote."""

from __future__ import annotations

import json

import pytest

from flows.cli import main
from tests.conftest import make_rows
from tests.flows.conftest import git, make_workspace
from tests.flows.test_init import CHINESE, csv_text

pytestmark = pytest.mark.slow


def test_a_run_on_the_params_init_wrote_trains_and_counts_the_repairs(
    harness, tmp_path, tiny_base_model, monkeypatch
):
    workspace = make_workspace(
        tmp_path / "ws",
        tiny_base_model,
        per_class=5,
        overrides={
            "train": {"epochs": 1},
            "evaluate": {"golden_requests": 5},
            # The tiny BERT's vocabulary is English: the Chinese text would fail
            # tokenizer_coverage (tests/tasks/test_validate.py checks that refusal).
            "validate": {"max_unknown_char_share": 1.0},
        },
    )
    rows = make_rows(per_class=20, seed=3)
    # GB18030 with semicolons and CRLF; some labels with a trailing space and a capital.
    rows = [(f"{text} {CHINESE}", label) for text, label in rows]
    rows = [
        (t, "Refund " if i % 5 == 0 and lab == "refund" else lab) for i, (t, lab) in enumerate(rows)
    ]
    test_rows = make_rows(per_class=8, seed=4) + rows[1:3]  # 2 texts also in the train file
    raw = workspace / "data" / "raw"
    (raw / "train.csv").unlink()
    (raw / "tickets.csv").write_bytes(
        csv_text(rows, sep=";").replace("\n", "\r\n").encode("gb18030")
    )
    (raw / "tickets_test.csv").write_text(csv_text(test_rows), encoding="utf-8")
    monkeypatch.chdir(workspace)
    assert (
        main(["init", "--data", "data/raw/tickets.csv", "--test", "data/raw/tickets_test.csv"]) == 0
    )
    git(workspace, "-c", "user.email=t@example.com", "-c", "user.name=t", "add", "-A")
    git(workspace, "-c", "user.email=t@example.com", "-c", "user.name=t", "commit", "-qm", "init")

    from flows.pipeline import pipeline

    state = pipeline(params_path="params.yaml", repo_dir=str(workspace), return_state=True)
    assert state.is_completed(), state.message
    assert state.result()["stages_ran"] == ["validate", "prepare", "train", "evaluate"]
    report = json.loads((workspace / "data" / "validate" / "report.json").read_text())
    assert report["repairs"]["train_relabelled"] == 4
    assert report["repairs"]["test_overlap_dropped"] == 2
    stats = json.loads((workspace / "data" / "prepare" / "stats.json").read_text())
    assert stats["repairs"] == report["repairs"]
