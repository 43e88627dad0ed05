"""Do the gate's default thresholds hold on real data? Evaluate trained models and gate them.

    python -m bench.gate_defaults --data DIR --model NAME=MODEL_DIR [--model ...]
        [--params params.yaml] [--max-test N]

DIR holds test.csv (`text,label`). Each MODEL_DIR is a textgate model directory (e.g. kept by
`python -m bench.train --keep-model`). Each model is evaluated as the evaluate stage does
(the served runtime, abstention, behaviour tests; no must-pass file) and gated with the
params' `gate:` section as a first release (no champion). The table shows, per model, each
check's value and whether it passed, so one sees which defaults let a good model through and
stop a bad one. The last line printed on stdout is one JSON object with every figure.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from bench.common import json_line, log, positive_int
from textgate.config import PARAMS_FILE


def evaluate_and_gate(
    model_dir: Path, texts: list[str], labels: list[str], params: Any
) -> dict[str, Any]:
    """The evaluate stage's metrics for `model_dir` on (texts, labels), and the gate's checks."""
    import pandas as pd

    from tasks.evaluate import Split, metrics_payload, run_behaviour, score_test_split
    from textgate.gate import champion_checks, evaluate_gate
    from textgate.runtime import load_classifier

    classifier = load_classifier(model_dir)
    index = {label: i for i, label in enumerate(classifier.labels)}
    split = Split(
        texts=texts,
        labels=pd.Series(labels),
        y_true=pd.Series(labels).map(index).to_numpy(),
    )
    scores = score_test_split(classifier, split, params.evaluate, model_dir)
    behaviour = run_behaviour(classifier, texts, [], params.evaluate)
    metrics = metrics_payload(classifier, scores, behaviour)
    per_class = {label: c.model_dump() for label, c in scores.metrics.per_class.items()}
    verdict = evaluate_gate(
        metrics,
        per_class,
        params.gate,
        champion=champion_checks(labels, labels, None, params.gate),
    )
    return {"metrics": metrics, "verdict": verdict.model_dump(mode="json")}


def format_table(results: dict[str, dict[str, Any]]) -> str:
    """One row per applied check (per-class recalls summed up), one column per model."""
    names = list(results)
    rows: dict[str, list[str]] = {}
    for column, result in enumerate(results.values()):
        recalls = [c for c in result["verdict"]["checks"] if c["kind"] == "class_recall"]
        failed = [c for c in recalls if not c["passed"]]
        applied = [c for c in recalls if c["applied"]]
        cell = f"{len(failed)}/{len(applied)} fail" if applied else "n/a"
        rows.setdefault("recall[*] floors", [""] * len(names))[column] = cell
        for check in result["verdict"]["checks"]:
            if check["kind"] == "class_recall" or not check["applied"]:
                continue
            value = "n/a" if check["value"] is None else f"{check['value']:.4f}"
            mark = "" if check["passed"] else " FAIL"
            rows.setdefault(check["name"], [""] * len(names))[column] = value + mark
    width = max(len(name) for name in rows) + 2
    lines = [f"{'check':{width}}" + "".join(f"{name:>22}" for name in names)]
    lines += [f"{row:{width}}" + "".join(f"{c:>22}" for c in cells) for row, cells in rows.items()]
    lines.append(
        f"{'verdict':{width}}"
        + "".join(
            f"{'pass' if r['verdict']['passed'] else 'REFUSED':>22}" for r in results.values()
        )
    )
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    import pandas as pd

    from bench.train import stratified_subset
    from textgate.config import load_params

    parser = argparse.ArgumentParser(prog="python -m bench.gate_defaults")
    parser.add_argument("--data", type=Path, required=True, help="folder with test.csv")
    parser.add_argument("--model", action="append", required=True, help="NAME=MODEL_DIR")
    parser.add_argument("--params", type=Path, default=Path(PARAMS_FILE))
    parser.add_argument("--max-test", type=positive_int, help="a stratified subset of test")
    args = parser.parse_args(argv)
    params = load_params(args.params)
    test = pd.read_csv(args.data / "test.csv", dtype=str, keep_default_na=False)
    if args.max_test:
        test = test.iloc[stratified_subset(test["label"].tolist(), args.max_test, 0)]
    results = {}
    for spec in args.model:
        name, _, path = spec.partition("=")
        log(f"{name}: evaluating {path} on {len(test)} test texts")
        results[name] = evaluate_and_gate(
            Path(path), test["text"].tolist(), test["label"].tolist(), params
        )
    print(format_table(results))
    print(json_line({"data": str(args.data), "results": results}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
