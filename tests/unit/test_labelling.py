"""The labelling loop's pure logic: selection, task formats, import checks, live accuracy."""

from __future__ import annotations

import random
import xml.etree.ElementTree as ET

import pandas as pd
import pytest

from textgate import labelling as lab
from textgate.errors import DataError


def cand(text: str, **kw: object) -> lab.Candidate:
    base = dict(
        label="refund",
        best_label="refund",
        score=0.95,
        abstained=False,
        margin=0.9,
        model_tag="m:1",
    )
    base.update(kw)
    return lab.Candidate(text=text, **base)  # type: ignore[arg-type]


def quotas(**kw: object) -> lab.Quotas:
    base = dict(random=0, abstained=0, low_margin=0, novel=0, low_margin_below=0.2)
    base.update(kw)
    return lab.Quotas(**base)  # type: ignore[arg-type]


def test_review_key_ignores_case_and_spacing_but_not_words() -> None:
    assert lab.review_key("Where is  my REFUND?") == lab.review_key(" where is my refund? ")
    assert lab.review_key("where is my refund?") != lab.review_key("where is my card?")


def test_margin_is_top1_minus_top2() -> None:
    assert lab.margin_of([0.1, 0.6, 0.3]) == pytest.approx(0.3)
    assert lab.margin_of([1.0]) == 1.0


def test_dedupe_drops_seen_and_repeated_texts_keeping_the_latest() -> None:
    seen = {lab.review_key("old one")}
    pool = lab.dedupe(
        [cand("Old one"), cand("new text", score=0.5), cand("NEW text", score=0.7), cand("  ")],
        seen,
    )
    assert [(c.text, c.score) for c in pool] == [("NEW text", 0.7)]


def test_selection_takes_each_reason_by_priority_and_counts_a_text_once() -> None:
    pool = [cand(f"fine {i}") for i in range(20)]
    pool += [
        cand(f"unsure {i}", abstained=True, label="unknown", score=0.3 + i / 100) for i in range(5)
    ]
    pool += [cand(f"close {i}", margin=0.05 * i) for i in range(5)]
    pool += [cand(f"far {i}", novelty=1.0 + i) for i in range(5)]
    items = lab.select_for_review(
        pool, quotas(random=4, abstained=3, low_margin=2, novel=2, novelty_above=0.5), seed=1
    )
    by_reason: dict[str, list[str]] = {}
    for item in items:
        by_reason.setdefault(item.reason, []).append(item.candidate.text)
    assert len(by_reason["random"]) == 4
    # Lowest confidence first, closest calls first, farthest first; never one already taken.
    assert all(t.startswith("unsure") for t in by_reason["abstained"])
    assert all(t.startswith("close") for t in by_reason["low_margin"])
    assert by_reason["novel"][0] in ("far 4", "far 3")
    texts = [item.candidate.text for item in items]
    assert len(texts) == len(set(texts))


def test_random_sample_is_uniform_not_the_models_choice() -> None:
    """Abstained texts are 10% of the pool: the random sample must hold about 10% of them."""
    pool = [cand(f"t{i}", abstained=i % 10 == 0) for i in range(2000)]
    counts = []
    for seed in range(20):
        items = lab.select_for_review(pool, quotas(random=100), seed=seed)
        counts.append(sum(item.candidate.abstained for item in items))
    assert 6 <= sum(counts) / len(counts) <= 14


def test_no_novel_texts_without_an_embedding_threshold() -> None:
    pool = [cand("far", novelty=5.0)]
    assert lab.select_for_review(pool, quotas(novel=5, novelty_above=None), seed=0) == []
    assert len(lab.select_for_review(pool, quotas(novel=5, novelty_above=1.0), seed=0)) == 1


def test_quotas_from_shares_never_exceed_the_total() -> None:
    shares = {"random": 0.25, "abstained": 0.25, "low_margin": 0.25, "novel": 0.25}
    q = lab.Quotas.from_shares(10, shares)
    assert q.random + q.abstained + q.low_margin + q.novel <= 10


def test_tasks_carry_text_reason_and_the_prediction_in_label_studio_format() -> None:
    items = [
        lab.ReviewItem(cand("hi", label="unknown", best_label="refund", score=0.4), "abstained")
    ]
    (task,) = lab.to_tasks(items)
    assert task["data"] == {
        "text": "hi",
        "reason": "abstained",
        "served": "unknown",
        "model_tag": "m:1",
    }
    (result,) = task["predictions"][0]["result"]
    assert result["value"] == {"choices": ["refund"]}
    assert (result["from_name"], result["to_name"]) == (lab.FROM_NAME, lab.TO_NAME)
    csv_lines = lab.to_csv(items).splitlines()
    assert csv_lines[0].split(",")[:4] == ["text", "label", "suggested", "reason"]
    assert csv_lines[1].startswith("hi,,refund,abstained")


def test_label_config_is_xml_listing_every_intent() -> None:
    root = ET.fromstring(lab.label_config(["refund", 'say "hi" & <bye>']))
    values = [choice.get("value") for choice in root.iter("Choice")]
    assert values == ["refund", 'say "hi" & <bye>']


def export_task(text: str, *annotations: dict, **data: str) -> dict:
    return {"id": 7, "data": {"text": text, **data}, "annotations": list(annotations)}


def choice(label: str, cancelled: bool = False) -> dict:
    result = [{"from_name": "intent", "value": {"choices": [label]}}]
    return {"result": result, "was_cancelled": cancelled}


def test_label_studio_export_takes_the_latest_valid_annotation() -> None:
    payload = [
        export_task("a", choice("refund"), choice("lost_card"), reason="random", served="refund"),
        export_task("b", choice("refund", cancelled=True)),
        export_task("c"),
    ]
    rows, unlabelled = lab.read_label_studio_export(payload, "x.json")
    assert [(r.text, r.label, r.reason, r.served) for r in rows] == [
        ("a", "lost_card", "random", "refund")
    ]
    assert unlabelled == 2


@pytest.mark.parametrize("payload", [{"tasks": []}, [{"data": {}}], ["text"]])
def test_a_file_that_is_not_a_label_studio_export_is_refused(payload: object) -> None:
    with pytest.raises(DataError, match="not a Label Studio export|expected a list"):
        lab.read_label_studio_export(payload, "x.json")


def test_csv_rows_need_text_and_label_columns() -> None:
    with pytest.raises(DataError, match=r"missing column\(s\) \['label'\]"):
        lab.rows_from_table(pd.DataFrame({"text": ["a"], "intent": ["b"]}), "x.csv")
    rows, unlabelled = lab.rows_from_table(
        pd.DataFrame({"text": ["a", "b"], "label": ["x", ""]}), "x.csv"
    )
    assert [(r.text, r.label, r.where) for r in rows] == [("a", "x", "row 2")]
    assert unlabelled == 1


def rows(*pairs: tuple[str, str]) -> list[lab.LabelledRow]:
    return [lab.LabelledRow(t, label, where=f"row {i + 2}") for i, (t, label) in enumerate(pairs)]


def test_unknown_labels_fail_naming_them_and_where_unless_allowed() -> None:
    data = rows(("a", "refund"), ("b", "new_intent"))
    with pytest.raises(DataError, match=r"'new_intent' \(row 3\).*--allow-new-labels"):
        lab.check_import(data, ["refund"], allow_new_labels=False, already_imported=set())
    report = lab.check_import(data, ["refund"], allow_new_labels=True, already_imported=set())
    assert report.new_labels == ["new_intent"] and len(report.rows) == 2


def test_import_reports_empty_duplicate_conflicting_and_already_imported_rows() -> None:
    data = rows(
        ("keep me", "refund"),
        ("  ", "refund"),
        ("Keep  me", "refund"),
        ("torn", "refund"),
        ("torn", "lost_card"),
        ("old", "refund"),
        ("padded", " refund "),
    )
    report = lab.check_import(
        data,
        ["refund", "lost_card"],
        allow_new_labels=False,
        already_imported={lab.review_key("old")},
    )
    assert [(r.text, r.label) for r in report.rows] == [("keep me", "refund"), ("padded", "refund")]
    assert report.empty == ["row 3"]
    assert report.duplicates == ["row 4"]
    assert report.conflicts == ["row 5", "row 6"]
    assert report.already_imported == ["row 7"]


def test_nothing_left_to_import_is_an_error() -> None:
    with pytest.raises(DataError, match="nothing to import.*already imported"):
        lab.check_import(
            rows(("old", "refund")),
            ["refund"],
            allow_new_labels=False,
            already_imported={lab.review_key("old")},
        )


def test_wilson_interval_covers_the_truth_at_its_confidence() -> None:
    rng = random.Random(0)
    truth, n, hits = 0.8, 60, 0
    for _ in range(400):
        correct = sum(rng.random() < truth for _ in range(n))
        low, high = lab.wilson_interval(correct, n, 0.95)
        hits += low <= truth <= high
    assert 0.92 <= hits / 400 <= 0.98


def test_live_accuracy_compares_served_answers_with_labels_of_the_given_model() -> None:
    sample = [
        {"served": "refund", "label": "refund", "model_tag": "m:1"},
        {"served": "unknown", "label": "refund", "model_tag": "m:1"},
        {"served": "refund", "label": "refund", "model_tag": "m:0"},
    ]
    estimate = lab.live_accuracy(sample, "m:1")
    assert (estimate.correct, estimate.n) == (1, 2)
    assert estimate.low < 0.5 < estimate.high
    assert lab.live_accuracy(sample, "m:9") is None
