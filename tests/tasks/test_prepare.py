"""The prepare stage on tiny files in a temporary folder."""

from __future__ import annotations

import json

import pandas as pd

from tasks import prepare


def test_prepare_cleans_redacts_and_splits_stratified(params):
    sizes = prepare.run(params)
    out = params.prepare.output_dir
    parts = {name: pd.read_parquet(out / f"{name}.parquet") for name in ("train", "val", "test")}
    assert sizes == {name: len(frame) for name, frame in parts.items()}
    assert sum(sizes.values()) == 46  # 47 rows, one exact duplicate dropped
    for frame in parts.values():
        assert set(frame["label"]) == {"lost_card", "login", "refund"}
    all_texts = pd.concat(parts.values())["text"]
    assert not all_texts.duplicated().any()
    assert "mail me at [EMAIL] about my refund" in set(all_texts)
    stats = json.loads((out / "stats.json").read_text())
    assert stats["train_file"]["pii_redacted"]["email"] == 1
    assert stats["train_file"]["duplicates_dropped"] == 1
    again = prepare.run(params)
    assert again == sizes  # seeded: the same split every time
    assert pd.read_parquet(out / "test.parquet").equals(parts["test"])
