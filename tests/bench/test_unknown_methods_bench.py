"""bench.unknown_methods: every unknown score at several recall targets, as served."""

from __future__ import annotations

import pytest

from tests.conftest import make_rows, write_csv


def test_every_method_is_scored_at_every_target_and_recall_follows_the_target(
    tiny_model_dir, tmp_path
):
    from bench.unknown_methods import main, scores_table
    from textgate.unknown import METHODS

    # One of the tiny model's intents stands in for the out-of-scope label.
    rows = make_rows(per_class=12)
    oos = sorted({label for _, label in rows})[0]
    for name in ("train", "val", "test"):
        write_csv(tmp_path / f"{name}.csv", rows)
    targets = [0.5, 0.9]
    table = scores_table(tiny_model_dir, tmp_path, oos, targets)
    assert set(table) == {"argmax", *METHODS}
    for method in METHODS:
        row = table[method]
        assert 0 <= row["val_auroc"] <= 1 and 0 <= row["test_auroc"] <= 1
        low, high = (row[str(t)]["val"]["oos_recall"] for t in targets)
        # the threshold chosen on val meets each target there, a higher target catching more
        assert low >= 0.5 and high >= 0.9 and high >= low, method
    with pytest.raises(SystemExit, match="not a label"):
        main(["--data", str(tmp_path), "--model", str(tiny_model_dir), "--oos-label", "nope"])
