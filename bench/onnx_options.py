"""ONNX Runtime options for CPU serving, in one process: what each costs or saves per text.

For a model directory with an ONNX export, it runs the test split's texts one per forward pass
(as CPU serving does) under the serving options (`textgate.runtime.session_options`, the
baseline, measured in the same run) and under each variant: graph optimisation level, memory
arena, memory patterns, thread spinning, intra-op threads, and micro-batches of texts of the
same token count. For each it prints the session's load time, texts/s, the ratio to the
baseline, and how far its logits are from the baseline's (a variant that changes answers
cannot be kept: serving must answer as evaluated). Then it profiles the service's own
per-request work in process (`TextgateService.classify` on one text, against the classifier's
`predict` alone and its `predict_logits`) and prints the top functions by their own time.
The last line printed on stdout is one JSON object.

    python -m bench.onnx_options --model-dir DIR [--texts 1000] [--repeats 3]
    python -m bench.onnx_options --bento TAG     # the model of a bento in the BentoML store
"""

from __future__ import annotations

import argparse
import cProfile
import io
import os
import pstats
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from bench.common import json_line, log, machine_info, non_negative_int, positive_int
from textgate.config import PARAMS_FILE
from textgate.runtime import THREADS_ENV, OnnxClassifier, session_options

# name -> what it changes in the serving options (applied to a fresh SessionOptions).
VARIANTS: dict[str, Callable[[Any], None]] = {
    "graph opt: extended": lambda o: setattr(
        o, "graph_optimization_level", _level("ENABLE_EXTENDED")
    ),
    "graph opt: basic": lambda o: setattr(o, "graph_optimization_level", _level("ENABLE_BASIC")),
    "graph opt: disabled": lambda o: setattr(o, "graph_optimization_level", _level("DISABLE_ALL")),
    "memory arena off": lambda o: setattr(o, "enable_cpu_mem_arena", False),
    "memory patterns off": lambda o: setattr(o, "enable_mem_pattern", False),
    "no thread spinning": lambda o: o.add_session_config_entry(
        "session.intra_op.allow_spinning", "0"
    ),
    "2 intra-op threads": lambda o: setattr(o, "intra_op_num_threads", 2),
}
MICRO_BATCH = 8  # texts of one token count per forward pass in the micro-batch variant


def _level(name: str) -> Any:
    import onnxruntime as ort

    return getattr(ort.GraphOptimizationLevel, f"ORT_{name}")


def encode(classifier: OnnxClassifier, texts: Sequence[str]) -> list[list[int]]:
    """Each text's token ids, cleaned and truncated as serving does."""
    cleaned = classifier.clean(texts)
    encoded = classifier.tokenizer(cleaned, truncation=True, max_length=classifier.max_length)
    return encoded["input_ids"]


def run_session(session: Any, input_names: list[str], ids: list[list[int]], batch: int) -> Any:
    """Logits (texts, labels): one pass per text, or per `batch` texts of equal token count."""
    out: list[np.ndarray | None] = [None] * len(ids)
    groups: dict[int, list[int]] = {}
    for index, row in enumerate(ids):
        groups.setdefault(len(row), []).append(index)
    for members in groups.values():
        for start in range(0, len(members), batch):
            chunk = members[start : start + batch]
            input_ids = np.asarray([ids[i] for i in chunk], dtype=np.int64)
            given = {
                "input_ids": input_ids,
                "attention_mask": np.ones_like(input_ids),
                "token_type_ids": np.zeros_like(input_ids),
            }
            (logits,) = session.run(["logits"], {name: given[name] for name in input_names})
            for row, i in enumerate(chunk):
                out[i] = logits[row]
    return np.stack(out)


def measure(
    model_path: Path, ids: list[list[int]], change: Callable[[Any], None] | None, batch: int = 1
) -> dict[str, Any]:
    """Load a session with the serving options (changed by `change`) and time it on `ids`."""
    import onnxruntime as ort

    options = session_options(1)
    if change is not None:
        change(options)
    loaded = time.perf_counter()
    session = ort.InferenceSession(str(model_path), options, providers=["CPUExecutionProvider"])
    load_s = time.perf_counter() - loaded
    names = [node.name for node in session.get_inputs()]
    run_session(session, names, ids[:50], batch)  # warm-up
    started = time.perf_counter()
    logits = run_session(session, names, ids, batch)
    seconds = time.perf_counter() - started
    return {"load_s": load_s, "texts_per_s": len(ids) / seconds, "logits": logits}


def export_variants(
    model_dir: Path, calibration_texts: Sequence[str], work: Path
) -> dict[str, Path]:
    """Other ONNX files of the model directory's checkpoint, to run with the serving options:
    the export before this round (transformers' SDPA attention traced, which ONNX Runtime's
    optimiser leaves unfused; dynamic int8), and static int8 (QDQ) calibrated on
    `calibration_texts` (training texts, one per pass) instead of dynamic int8."""
    import onnx
    from onnxruntime.quantization import (
        CalibrationDataReader,
        CalibrationMethod,
        QuantFormat,
        QuantType,
        quantize_static,
    )

    from textgate.export import _quantize_int8, export_fused_fp32

    before = "export before: SDPA attention, unfused"
    files = {before: work / "sdpa.int8.onnx"}
    export_fused_fp32(model_dir, work / "sdpa.onnx", attention="sdpa")
    _quantize_int8(work / "sdpa.onnx", files[before])

    fused = work / "eager.onnx"
    export_fused_fp32(model_dir, fused)
    classifier = OnnxClassifier(model_dir, threads=1)
    ids = encode(classifier, calibration_texts)

    class Calibration(CalibrationDataReader):
        """One training text per pass, fed as serving feeds the session."""

        def __init__(self) -> None:
            self.rows = iter(ids)

        def get_next(self) -> dict[str, np.ndarray] | None:
            row = next(self.rows, None)
            if row is None:
                return None
            input_ids = np.asarray([row], dtype=np.int64)
            return classifier._feed(input_ids, np.ones_like(input_ids), None)

    name = f"static int8 (QDQ, {len(ids)} training texts)"
    files[name] = work / "static.int8.onnx"
    # The fused graph's quantisable products; quantising every operator type fails on it
    # (a bias with no valid scale), and the QOperator format has no static QAttention path.
    quantize_static(
        fused,
        files[name],
        Calibration(),
        quant_format=QuantFormat.QDQ,
        per_channel=True,
        reduce_range=True,
        activation_type=QuantType.QUInt8,
        weight_type=QuantType.QInt8,
        calibrate_method=CalibrationMethod.MinMax,
        op_types_to_quantize=["MatMul", "Attention"],
        extra_options={"DefaultTensorType": onnx.TensorProto.FLOAT},
    )
    return files


def compare_options(
    model_path: Path,
    ids: list[list[int]],
    repeats: int,
    other_files: dict[str, Path] | None = None,
) -> list[dict[str, Any]]:
    """Baseline and variants, alternating `repeats` times; the best texts/s of each.

    `other_files` (name -> ONNX file, e.g. `export_variants`) run with the serving options.
    """
    plan: list[tuple[str, Callable[[Any], None] | None, int, Path]] = [
        ("serving options", None, 1, model_path)
    ]
    plan += [(name, change, 1, model_path) for name, change in VARIANTS.items()]
    micro = f"micro-batches of {MICRO_BATCH} equal-length texts"
    plan.append((micro, None, MICRO_BATCH, model_path))
    plan += [(name, None, 1, path) for name, path in (other_files or {}).items()]
    best: dict[str, dict[str, Any]] = {}
    for repeat in range(repeats):
        for name, change, batch, path in plan:
            result = measure(path, ids, change, batch)
            log(f"round {repeat + 1}/{repeats}: {name}: {result['texts_per_s']:.1f} texts/s")
            if name not in best or result["texts_per_s"] > best[name]["texts_per_s"]:
                best[name] = result
    baseline = best["serving options"]
    rows = []
    for name, *_ in plan:
        result = best[name]
        difference = np.abs(result["logits"] - baseline["logits"])
        same = result["logits"].argmax(1) == baseline["logits"].argmax(1)
        rows.append(
            {
                "variant": name,
                "texts_per_s": result["texts_per_s"],
                "ratio": result["texts_per_s"] / baseline["texts_per_s"],
                "load_s": result["load_s"],
                "max_logit_change": float(difference.max()),
                "same_label_share": float(same.mean()),
            }
        )
    return rows


def profile_service(model_tag: str, texts: Sequence[str], requests: int) -> dict[str, Any]:
    """The service's per-request cost in process: classify vs predict vs the forward pass."""
    from bentoml._internal.configuration.containers import BentoMLContainer

    from textgate.requestlog import REQUEST_LOG_ENV

    os.environ.setdefault(THREADS_ENV, "1")
    os.environ[REQUEST_LOG_ENV] = str(Path(tempfile.mkdtemp()) / "requests.jsonl")
    # As a built bento passes them (the service reads them when imported).
    BentoMLContainer.bento_arguments.set({"model_tag": model_tag, "runtime": "onnx"})
    import bentos.service as service

    instance = service.TextgateService()
    classifier = instance.classifier
    sample = [texts[i % len(texts)] for i in range(requests)]
    timings = {}
    for name, call in (
        ("clean, tokenize, forward (predict_logits)", lambda t: classifier.predict_logits([t], 1)),
        ("classifier.predict", lambda t: classifier.predict([t], 64)),
        ("service classify (validation excluded)", lambda t: instance.classify([t])),
    ):
        for text in sample[:20]:
            call(text)
        started = time.perf_counter()
        for text in sample:
            call(text)
        timings[name] = (time.perf_counter() - started) * 1000 / len(sample)
    profiler = cProfile.Profile()
    profiler.enable()
    for text in sample:
        instance.classify([text])
    profiler.disable()
    stream = io.StringIO()
    pstats.Stats(profiler, stream=stream).sort_stats("tottime").print_stats(15)
    return {"ms_per_request": timings, "profile": stream.getvalue()}


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.onnx_options", description=__doc__)
    parser.add_argument("--params", type=Path, default=Path(PARAMS_FILE))
    parser.add_argument("--bento", help="bento tag: benchmark the model it serves")
    parser.add_argument("--model-dir", type=Path, help="a model directory with an ONNX export")
    parser.add_argument("--texts", type=positive_int, default=1000)
    parser.add_argument("--repeats", type=positive_int, default=3)
    parser.add_argument(
        "--calibration-texts",
        type=non_negative_int,
        default=300,
        help="training texts to calibrate static int8 on; 0 skips the exported variants "
        "(which need torch and transformers)",
    )
    args = parser.parse_args(argv)
    from bench.serve import bento_model, load_texts

    texts = load_texts(args.params)[: args.texts]
    model_tag = None
    if args.bento:
        _, model_tag, model_dir = bento_model(args.bento)
    elif args.model_dir:
        model_dir = args.model_dir
    else:
        parser.error("give --bento or --model-dir")
    classifier = OnnxClassifier(model_dir, threads=1)
    ids = encode(classifier, texts)
    log(f"{classifier.onnx_path}: {len(ids)} texts, {np.mean([len(r) for r in ids]):.1f} tokens")
    with tempfile.TemporaryDirectory(prefix="onnx-options-") as work:
        other_files = None
        if args.calibration_texts:
            calibration = load_texts(args.params, split="train")[: args.calibration_texts]
            other_files = export_variants(Path(model_dir), calibration, Path(work))
        rows = compare_options(classifier.onnx_path, ids, args.repeats, other_files)
    print(f"{'variant':48}{'texts/s':>9}{'ratio':>8}{'load s':>8}{'max dlogit':>12}{'same':>7}")
    for row in rows:
        print(
            f"{row['variant']:48}{row['texts_per_s']:9.1f}{row['ratio']:7.2f}x"
            f"{row['load_s']:8.2f}{row['max_logit_change']:12.2e}{row['same_label_share']:7.1%}"
        )
    report: dict[str, Any] = {"options": rows, "machine": machine_info("onnxruntime")}
    if model_tag is not None:
        service_cost = profile_service(model_tag, texts, requests=min(len(texts), 500))
        for name, ms in service_cost["ms_per_request"].items():
            print(f"{name:48}{ms:8.3f} ms/request")
        print(service_cost["profile"])
        report["service_ms_per_request"] = service_cost["ms_per_request"]
    print(json_line(report), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
