"""Inference runtimes for a model directory: ONNX Runtime (int8 by default) or PyTorch.

On a small CPU the int8 ONNX export answers several times faster than eager fp32 PyTorch, so
serving uses it when the model directory has one; on a GPU, PyTorch on CUDA.

The ONNX path imports neither torch nor transformers (its tokenizer is the model's own
`tokenizer.json` run by `tokenizers`: textgate.tokenizer), so a CPU bento need not carry them;
torch is imported only when the torch runtime is chosen, or to ask whether CUDA is usable
where an NVIDIA device is present.

`textgate.export.export_onnx` (a build-time step, kept apart so serving needs only ONNX
Runtime) adds `onnx/model.int8.onnx`, or `onnx/model.onnx` without quantization, to a model
directory; this module finds and runs it.
"""

from __future__ import annotations

import glob
import importlib.util
import os
from pathlib import Path
from typing import Any, Literal

import numpy as np

from textgate.errors import DataError
from textgate.inference import MAX_EXPLAIN_CHARS, Classifier, Explanation, Prediction
from textgate.tokenizer import FastTokenizer

__all__ = [
    "MAX_EXPLAIN_CHARS",
    "ONNX_DIR",
    "ONNX_FP32",
    "ONNX_INT8",
    "LEGACY_THREADS_ENV",
    "THREADS_ENV",
    "Classifier",
    "Explanation",
    "OnnxClassifier",
    "Prediction",
    "Runtime",
    "cuda_usable",
    "default_threads",
    "load_classifier",
    "onnx_file",
    "session_options",
    "share_cpus",
    "usable_cpus",
]

ONNX_DIR = "onnx"
ONNX_FP32 = "onnx/model.onnx"
ONNX_INT8 = "onnx/model.int8.onnx"
# The ONNX graph's outputs: logits, and the mean-pooled embedding (textgate.unknown reads it;
# exports made before it have logits only).
LOGITS_OUTPUT = "logits"
EMBEDDING_OUTPUT = "embedding"
THREADS_ENV = "TEXTGATE_THREADS"
LEGACY_THREADS_ENV = "TEXTGATE_TORCH_THREADS"  # its former name, read when it is not set
# Inference threads per process by default: beyond a few, one short text gains little.
MAX_DEFAULT_THREADS = 4
Runtime = Literal["auto", "torch", "onnx"]


def usable_cpus() -> int:
    """The CPUs this process may run on (its affinity mask), not all of the machine's."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def share_cpus(processes: int, cpus: int | None = None) -> int:
    """Threads per process when `processes` processes on this machine share `cpus` CPUs.

    At least one each; `cpus` defaults to `usable_cpus()`. Training, evaluation and serving
    all size their threads with it, so processes x threads never exceeds the cores.
    """
    cpus = usable_cpus() if cpus is None else cpus
    return max(1, cpus // max(1, processes))


def default_workers() -> int:
    """Serving workers of a bento: one per core, at most two: each holds a model; more only
    adds memory."""
    return min(2, os.cpu_count() or 1)


def default_threads(processes: int = 1) -> int:
    """Intra-op threads for each of `processes` inference processes on this machine.

    `TEXTGATE_THREADS` when set (non-empty), else `TEXTGATE_TORCH_THREADS`, else the usable
    CPUs shared out between the processes (`share_cpus`), at most MAX_DEFAULT_THREADS each.

    Raises:
        ValueError: the variable read is set but not a positive integer.
    """
    for name in (THREADS_ENV, LEGACY_THREADS_ENV):
        raw = os.environ.get(name, "")
        if raw.strip():
            return _positive_threads(name, raw)
    return min(MAX_DEFAULT_THREADS, share_cpus(processes))


def _positive_threads(name: str, raw: str) -> int:
    try:
        threads = int(raw.strip())
    except ValueError:
        threads = 0
    if threads < 1:
        raise ValueError(f"{name} must be a positive integer, got {raw!r}")
    return threads


def _threads(threads: int | None) -> int:
    if threads is None:
        return default_threads()
    if isinstance(threads, bool) or not isinstance(threads, int) or threads < 1:
        raise ValueError(f"threads must be a positive integer, got {threads!r}")
    return threads


def onnx_file(model_dir: str | Path) -> Path | None:
    """The ONNX file serving would load from `model_dir` (int8 first), or None."""
    for relative in (ONNX_INT8, ONNX_FP32):
        path = Path(model_dir) / relative
        if path.is_file():
            return path
    return None


def session_options(threads: int) -> Any:
    """ONNX Runtime's options for one inference process with `threads` intra-op threads."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    return options


class OnnxClassifier(Classifier):
    """A model directory's ONNX export loaded with ONNX Runtime: clean, tokenize, predict.

    The same interface and preprocessing as `textgate.model.TextClassifier`, without torch or
    transformers: the tokenizer is the directory's `tokenizer.json` (textgate.tokenizer).
    `logits_from_ids`, from which predictions and explanations follow
    (textgate.inference.Classifier), runs the "logits" output; `forward_from_ids` also the
    pooled "embedding" the unknown score may read (textgate.unknown).
    """

    def __init__(self, model_dir: str | Path, *, threads: int | None = None) -> None:
        import onnxruntime as ort

        super().__init__(model_dir)
        path = onnx_file(self.model_dir)
        if path is None:
            raise DataError(
                f"{self.model_dir} has no ONNX export ({ONNX_INT8} or {ONNX_FP32}); "
                "run textgate.export.export_onnx on it, or use the torch runtime"
            )
        self.onnx_path = path
        self.runtime = "onnx-int8" if path.name == Path(ONNX_INT8).name else "onnx-fp32"
        self.threads = _threads(threads)
        providers = ["CPUExecutionProvider"]
        if "CUDAExecutionProvider" in ort.get_available_providers():
            providers.insert(0, "CUDAExecutionProvider")
        self.session = ort.InferenceSession(
            str(path), session_options(self.threads), providers=providers
        )
        if self.session.get_providers()[0] == "CPUExecutionProvider":
            # One text per forward pass on CPUs. Batching buys nothing here (the matrix
            # products of one short text already keep a core busy) and padding costs: on the
            # sample's test texts (27 tokens on average), one thread ran 155 texts/s one at a
            # time against 89/s in batches of 32. It also makes every answer independent of
            # the texts it is batched with (int8 activations are quantised per call).
            self.max_batch_size = 1
        self.input_names = [node.name for node in self.session.get_inputs()]
        self.output_names = {node.name for node in self.session.get_outputs()}
        self.tokenizer = FastTokenizer(self.model_dir)

    def _feed(
        self, input_ids: np.ndarray, attention_mask: np.ndarray, token_type_ids: np.ndarray | None
    ) -> dict[str, np.ndarray]:
        input_ids = np.asarray(input_ids, dtype=np.int64)
        if token_type_ids is None:
            token_type_ids = np.zeros_like(input_ids)
        given = {
            "input_ids": input_ids,
            "attention_mask": np.asarray(attention_mask, dtype=np.int64),
            "token_type_ids": np.asarray(token_type_ids, dtype=np.int64),
        }
        return {name: given[name] for name in self.input_names}

    def logits_from_ids(
        self,
        input_ids: np.ndarray,
        attention_mask: np.ndarray,
        token_type_ids: np.ndarray | None = None,
    ) -> np.ndarray:
        """Raw class scores, (batch, labels) float32, for already-tokenized (batch, tokens) ids."""
        feed = self._feed(input_ids, attention_mask, token_type_ids)
        (logits,) = self.session.run([LOGITS_OUTPUT], feed)
        return np.asarray(logits, dtype=np.float32)

    def forward_from_ids(
        self,
        input_ids: np.ndarray,
        attention_mask: np.ndarray,
        token_type_ids: np.ndarray | None = None,
    ) -> tuple[np.ndarray, np.ndarray]:
        """Logits (batch, labels) and mean-pooled embeddings (batch, hidden), float32."""
        if EMBEDDING_OUTPUT not in self.output_names:
            raise DataError(
                f"{self.onnx_path} has no {EMBEDDING_OUTPUT!r} output (an older export): "
                "export the model again (textgate.export.export_onnx)"
            )
        feed = self._feed(input_ids, attention_mask, token_type_ids)
        logits, pooled = self.session.run([LOGITS_OUTPUT, EMBEDDING_OUTPUT], feed)
        return np.asarray(logits, dtype=np.float32), np.asarray(pooled, dtype=np.float32)


def cuda_usable() -> bool:
    """Whether PyTorch is installed and can use a CUDA device.

    torch is imported only where an NVIDIA device is present (its device files or driver),
    so the answer on a CPU-only machine, or in a bento without torch, costs no torch import.
    """
    if importlib.util.find_spec("torch") is None:
        return False
    if os.environ.get("CUDA_VISIBLE_DEVICES", None) in ("", "-1"):
        return False
    if not glob.glob("/dev/nvidia[0-9]*") and not glob.glob("/proc/driver/nvidia/gpus/*"):
        return False
    import torch

    return torch.cuda.is_available()


def load_classifier(
    model_dir: str | Path, runtime: Runtime = "auto", *, threads: int | None = None
) -> Classifier:
    """Load a model directory for inference with the requested runtime.

    "onnx": ONNX Runtime on the directory's ONNX export (DataError if it has none); imports
    neither torch nor transformers.
    "torch": PyTorch, on CUDA when available; on the CPU with `threads` intra-op threads.
    "auto": PyTorch on CUDA when a GPU is usable (`cuda_usable`), else ONNX when exported,
    else PyTorch.

    Args:
        threads: intra-op threads; None = `default_threads()`.
    """
    if runtime not in ("auto", "torch", "onnx"):
        raise ValueError(f"unknown runtime {runtime!r}; choose one of 'auto', 'torch', 'onnx'")
    threads = _threads(threads)
    if runtime == "auto":
        use_onnx = onnx_file(model_dir) is not None and not cuda_usable()
        runtime = "onnx" if use_onnx else "torch"
    if runtime == "onnx":
        return OnnxClassifier(model_dir, threads=threads)
    import torch

    from textgate.model import TextClassifier

    classifier = TextClassifier(model_dir)
    if classifier.device.type == "cpu":
        torch.set_num_threads(threads)
    return classifier
