"""Fine-tuning loop for sequence classification: seeded, device-agnostic, resumable, in one
process or several (torchrun / DDP).

What makes it fast:
- texts are tokenized once, up front; batches are cut from the token matrix by index;
- batches are length-bucketed (sorted by length within large shuffled chunks), so they pad
  little, then shuffled;
- the word-embedding matrix can be frozen (`train.freeze_embeddings`): in small encoders it
  is half the parameters, and its dense gradient and AdamW update cost much per step;
- on CUDA: bf16 (or fp16 with loss scaling) autocast, TF32 matmuls, pinned host batches
  copied without blocking; on the CPU: one torch thread per usable core, shared out between
  the processes of this machine.

Several processes (torchrun) each take a disjoint shard of every global batch of
`train.batch_size` examples, so a run takes as many optimizer steps as a single process over
the same data. Validation is sharded too and its predictions gathered, so every process
computes the same scores and takes the same early-stopping decision. Only rank 0 writes
checkpoints.
"""

from __future__ import annotations

import math
import os
import random
import resource
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.nn.parallel import DistributedDataParallel
from tqdm.auto import tqdm
from transformers import PreTrainedModel, PreTrainedTokenizerBase, get_linear_schedule_with_warmup

from textgate.config import TrainConfig
from textgate.distributed import World, all_gather_objects, all_reduce_max, all_reduce_sum
from textgate.metrics import compute_metrics
from textgate.model import autocast_dtype

# A chunk of this many batches is sorted by length before it is cut into batches: large
# enough that batches pad little, small enough that each epoch's batches still differ.
BUCKET_CHUNK_BATCHES = 64
EVAL_BATCH_SIZE = 128
CHECKPOINT_FILE = "last.pt"
CHECKPOINT_FORMAT = 1
MAX_GRAD_NORM = 1.0
MIB = 1024 * 1024


@dataclass
class EvalLog:
    """One validation: where training was and how the model scored."""

    step: int
    epoch: int  # the epoch it fell in, from 1
    train_loss: float  # mean training loss since the previous validation
    val_accuracy: float
    val_macro_f1: float
    seconds: float  # training time so far, validations included, evaluation hooks excluded


@dataclass(frozen=True)
class EvalPoint:
    """What an evaluation hook is given after each validation (on rank 0 only)."""

    step: int
    epoch: int
    seconds: float  # training time so far, the time spent in earlier hooks excluded
    val_accuracy: float
    val_macro_f1: float
    model: PreTrainedModel  # the weights of this step (not yet the best ones)


EvalHook = Callable[[EvalPoint], None]


@dataclass
class TrainResult:
    """What training did: the best validation's scores, speed, memory and the validation log."""

    device: str
    precision: str
    processes: int
    threads: int  # torch threads per process
    epochs_run: int
    optimizer_steps: int  # in all, resumed runs included
    steps_this_run: int
    resumed_from_step: int | None  # None: started from the base model
    stopped_early: bool
    best_epoch: int
    best_step: int
    val_accuracy: float
    val_macro_f1: float
    seconds: float  # training time in all (resumed runs included; hooks excluded)
    samples_per_second: float  # training examples per second of optimizer steps, this run
    padding_fraction: float  # share of pad tokens in this run's training batches
    peak_memory_mb: float  # the largest over the processes
    peak_memory: str  # what peak_memory_mb measures
    history: list[EvalLog] = field(default_factory=list)


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch (all devices)."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def usable_cpus() -> int:
    """The CPUs this process may run on (its affinity mask), not all of the machine's."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def choose_threads(cpus: int, local_processes: int) -> int:
    """Torch threads per process: the usable CPUs shared out between this machine's processes."""
    return max(1, cpus // max(1, local_processes))


def configure_threads(world: World) -> int:
    """Set torch's intra-op thread count for this process (see choose_threads); return it."""
    threads = choose_threads(usable_cpus(), world.local_size)
    torch.set_num_threads(threads)
    return threads


def enable_tf32() -> None:
    """Let CUDA matmuls use TensorFloat-32 (Ampere and later; fp32 range, 10-bit mantissa)."""
    matmul = torch.backends.cuda.matmul
    if hasattr(matmul, "fp32_precision"):  # the API since torch 2.9
        matmul.fp32_precision = "tf32"
        torch.backends.cudnn.conv.fp32_precision = "tf32"
    else:
        matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True


@dataclass(frozen=True)
class Encoded:
    """Texts tokenized once: (texts, longest) id matrices and each text's length in tokens."""

    tensors: dict[str, torch.Tensor]  # input_ids, attention_mask (, token_type_ids)
    lengths: np.ndarray  # (texts,) tokens per text, special tokens included
    pad_left: bool

    def __len__(self) -> int:
        return len(self.lengths)

    def batch(self, index: np.ndarray) -> dict[str, torch.Tensor]:
        """Rows `index`, padded only to the longest of them; int64 tensors on the CPU."""
        width = max(1, int(self.lengths[index].max()))
        rows = torch.from_numpy(np.asarray(index, dtype=np.int64))
        columns = slice(-width, None) if self.pad_left else slice(0, width)
        return {
            name: tensor[rows][:, columns].to(torch.long) for name, tensor in self.tensors.items()
        }


def encode_texts(
    tokenizer: PreTrainedTokenizerBase, texts: Sequence[str], max_length: int
) -> Encoded:
    """Tokenize every text once (truncated to `max_length`), to be batched by index later."""
    if not texts:
        raise ValueError("no texts to encode")
    encoded = tokenizer(
        list(texts), truncation=True, max_length=max_length, padding=True, return_tensors="pt"
    )
    lengths = encoded["attention_mask"].sum(dim=1).numpy()
    # int32 halves the memory of a large corpus; Encoded.batch turns rows back into int64.
    tensors = {name: value.to(torch.int32) for name, value in encoded.items()}
    return Encoded(tensors=tensors, lengths=lengths, pad_left=tokenizer.padding_side == "left")


def length_bucketed_batches(
    lengths: Sequence[int] | np.ndarray,
    batch_size: int,
    seed: int | Sequence[int],
    chunk_batches: int = BUCKET_CHUNK_BATCHES,
) -> list[np.ndarray]:
    """One epoch's batches of indices, each holding texts of similar length.

    The indices are shuffled, cut into chunks of `chunk_batches * batch_size`, sorted by
    length within each chunk and cut into batches, and the batches shuffled. Every index
    appears exactly once; only the last batch may be short, so an epoch has
    ceil(n / batch_size) batches, as without bucketing. The same seed gives the same batches.
    """
    if batch_size < 1 or chunk_batches < 1:
        raise ValueError(
            f"batch_size and chunk_batches must be >= 1, got {batch_size}, {chunk_batches}"
        )
    lengths = np.asarray(lengths)
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(lengths))
    chunk = batch_size * chunk_batches
    batches = []
    for start in range(0, len(order), chunk):
        part = order[start : start + chunk]
        part = part[np.argsort(lengths[part], kind="stable")]
        batches += [part[i : i + batch_size] for i in range(0, len(part), batch_size)]
    return [batches[i] for i in rng.permutation(len(batches))]


def evaluation_steps(steps_per_epoch: int, evals_per_epoch: int) -> set[int]:
    """The batch numbers within an epoch (from 1) after which to validate; the last is one."""
    count = min(evals_per_epoch, steps_per_epoch)
    return {math.ceil(steps_per_epoch * k / count) for k in range(1, count + 1)}


@dataclass
class EarlyStopping:
    """Tracks the best validation score; says stop after `patience` evaluations without
    improvement (0 or None: never).

    Patience only runs once the score has improved on the first evaluation's: a model still
    at its starting score (some start slowly, at chance) is left to train.
    """

    patience: int | None
    best_score: float = -math.inf
    best_step: int = 0
    best_epoch: int = 0
    evals_without_improvement: int = 0
    improved: bool = False  # on the first evaluation's score

    def update(self, score: float, step: int, epoch: int) -> bool:
        """Record one evaluation; True when it is the best so far."""
        if score > self.best_score:
            self.improved = self.best_score > -math.inf
            self.best_score, self.best_step, self.best_epoch = score, step, epoch
            self.evals_without_improvement = 0
            return True
        self.evals_without_improvement += 1
        return False

    @property
    def should_stop(self) -> bool:
        return (
            bool(self.patience)
            and self.improved
            and self.evals_without_improvement >= self.patience
        )


def peak_memory(device: torch.device) -> tuple[float, str]:
    """Peak memory of this process in MiB, and what was measured."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / MIB, "cuda max_memory_allocated"
    # ru_maxrss is in KiB on Linux (bytes on macOS).
    scale = 1 if sys.platform == "darwin" else 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale / MIB, "cpu peak RSS"


def freeze_word_embeddings(model: PreTrainedModel) -> int:
    """Stop training the word-embedding matrix; return how many parameters that freezes."""
    weight = model.get_input_embeddings().weight
    weight.requires_grad_(False)
    return weight.numel()


def _optimizer(model: PreTrainedModel, config: TrainConfig) -> torch.optim.Optimizer:
    """AdamW over the trainable weights; the new head learns `head_learning_rate_multiplier`
    times faster than the pretrained encoder (it starts from random weights)."""
    encoder = {id(parameter) for parameter in model.base_model.parameters()}
    groups: dict[tuple[bool, bool], list[torch.nn.Parameter]] = {}
    for parameter in model.parameters():
        if parameter.requires_grad:
            # No weight decay on biases and LayerNorm weights, as in BERT's recipe.
            key = (id(parameter) not in encoder, parameter.ndim >= 2)
            groups.setdefault(key, []).append(parameter)
    return torch.optim.AdamW(
        [
            {
                "params": parameters,
                "lr": config.learning_rate * (config.head_learning_rate_multiplier if head else 1),
                "weight_decay": config.weight_decay if decayed else 0.0,
            }
            for (head, decayed), parameters in sorted(groups.items())
        ],
        lr=config.learning_rate,
        # The fused kernel: one pass over all weights instead of one per tensor (CPU and CUDA).
        fused=True,
    )


def _to_device(tensor: torch.Tensor, device: torch.device) -> torch.Tensor:
    if device.type != "cuda":
        return tensor
    # Pinned host memory lets the copy run asynchronously with the GPU's work.
    return tensor.pin_memory().to(device, non_blocking=True)


def _batch_to_device(
    batch: dict[str, torch.Tensor], device: torch.device
) -> dict[str, torch.Tensor]:
    return {name: _to_device(tensor, device) for name, tensor in batch.items()}


def _cpu_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()}


def _rng_state(device: torch.device) -> dict[str, Any]:
    numpy_state = np.random.get_state()
    state = {
        "torch": torch.get_rng_state(),
        "python": random.getstate(),
        # As plain values, so the checkpoint loads with torch.load(weights_only=True).
        "numpy": [numpy_state[0], numpy_state[1].tolist(), *numpy_state[2:]],
    }
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def _set_rng_state(state: dict[str, Any], device: torch.device) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    name, keys, *rest = state["numpy"]
    np.random.set_state((name, np.asarray(keys, dtype=np.uint32), *rest))
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], device)


def save_checkpoint(directory: Path, state: dict[str, Any]) -> Path:
    """Write `state` to `directory/last.pt` atomically: a temporary file, then os.replace."""
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / CHECKPOINT_FILE
    temporary = directory / f".{CHECKPOINT_FILE}.{os.getpid()}.tmp"
    with temporary.open("wb") as handle:
        torch.save(state, handle)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(temporary, path)
    return path


def load_checkpoint(directory: Path | None) -> dict[str, Any] | None:
    """The state saved in `directory/last.pt`; None when there is none."""
    if directory is None or not (directory / CHECKPOINT_FILE).is_file():
        return None
    state = torch.load(directory / CHECKPOINT_FILE, map_location="cpu", weights_only=True)
    if state.get("format") != CHECKPOINT_FORMAT:
        return None
    return state


@dataclass
class _Progress:
    """Counters of one training run, saved in checkpoints."""

    epoch: int = 1  # the epoch in progress
    batches_done: int = 0  # batches of that epoch already trained
    step: int = 0
    seconds: float = 0.0  # training time of earlier (interrupted) runs
    finished: bool = False
    stopped_early: bool = False
    history: list[EvalLog] = field(default_factory=list)


def _predict_encoded(
    model: PreTrainedModel,
    encoded: Encoded,
    batches: Sequence[np.ndarray],
    device: torch.device,
    dtype: torch.dtype | None,
) -> np.ndarray:
    """Predicted class of every index in `batches`, in their order."""
    predictions = []
    model.eval()
    with torch.inference_mode():
        for index in batches:
            batch = _batch_to_device(encoded.batch(index), device)
            with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
                logits = model(**batch).logits  # (batch, labels)
            predictions.append(logits.argmax(dim=1).cpu().numpy())
    model.train()
    return np.concatenate(predictions) if predictions else np.zeros(0, dtype=np.int64)


def _validate(
    model: PreTrainedModel,
    encoded: Encoded,
    labels: np.ndarray,
    label_names: Sequence[str],
    world: World,
    device: torch.device,
    dtype: torch.dtype | None,
) -> tuple[float, float]:
    """Validation accuracy and macro-F1; each process scores a share, all get the same result."""
    order = np.argsort(encoded.lengths, kind="stable")
    batches = [order[i : i + EVAL_BATCH_SIZE] for i in range(0, len(order), EVAL_BATCH_SIZE)]
    mine = batches[world.rank :: world.size]
    predicted = _predict_encoded(model, encoded, mine, device, dtype)
    index = np.concatenate(mine) if mine else np.zeros(0, dtype=np.int64)
    gathered = all_gather_objects(world, (index, predicted))
    all_index = np.concatenate([part[0] for part in gathered])
    all_predicted = np.concatenate([part[1] for part in gathered])
    scores = compute_metrics(labels[all_index], all_predicted, label_names)
    return scores.accuracy, scores.macro_f1


def train_classifier(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    train_texts: Sequence[str],
    train_labels: Sequence[int],
    val_texts: Sequence[str],
    val_labels: Sequence[int],
    config: TrainConfig,
    device: torch.device,
    progress: bool = True,
    *,
    world: World | None = None,
    checkpoint_dir: Path | None = None,
    on_evaluate: EvalHook | None = None,
) -> TrainResult:
    """Fine-tune `model` in place and leave it holding the weights of its best validation.

    The model is validated `train.evals_per_epoch` times an epoch; the best validation is the
    one with the highest macro-F1, and `train.early_stopping_patience` validations without
    improvement stop training early.

    Args:
        world: this process among several (torchrun); the process group must be initialised
            and `device` be this process's own. None: a single process.
        checkpoint_dir: where to save a checkpoint every `train.checkpoint_every_steps` steps
            and at each epoch's end (rank 0), and to resume from; None: no checkpoints.
        on_evaluate: called on rank 0 after each validation; its own time is left out of
            the training time.
    """
    world = world or World()
    if not val_texts:
        raise ValueError("training needs at least one validation example")
    seed_everything(config.seed + world.rank)  # dropout differs between the processes
    threads = configure_threads(world)
    dtype = autocast_dtype(device, config.mixed_precision)
    scaler = torch.amp.GradScaler("cuda", enabled=dtype == torch.float16)
    if device.type == "cuda":
        enable_tf32()
        torch.cuda.reset_peak_memory_stats(device)
    if config.freeze_embeddings:
        freeze_word_embeddings(model)
    model.to(device)
    clock_start = time.perf_counter()
    excluded = 0.0  # seconds spent in evaluation hooks
    train_data = encode_texts(tokenizer, train_texts, config.max_length)
    val_data = encode_texts(tokenizer, val_texts, config.max_length)
    targets_all = torch.tensor(list(train_labels), dtype=torch.long)
    val_targets = np.asarray(val_labels, dtype=np.int64)
    label_names = [str(i) for i in range(model.config.num_labels)]

    optimizer = _optimizer(model, config)
    steps_per_epoch = math.ceil(len(train_data) / config.batch_size)
    total_steps = steps_per_epoch * config.epochs
    scheduler = get_linear_schedule_with_warmup(
        optimizer, int(config.warmup_ratio * total_steps), total_steps
    )
    early = EarlyStopping(config.early_stopping_patience)
    state = _Progress()
    best_state: dict[str, torch.Tensor] | None = None
    resumed = load_checkpoint(checkpoint_dir)
    resumed_from = None
    if resumed is not None:
        model.load_state_dict(resumed["model"])
        optimizer.load_state_dict(resumed["optimizer"])
        scheduler.load_state_dict(resumed["scheduler"])
        scaler.load_state_dict(resumed["scaler"])
        ranks = resumed["ranks"]
        _set_rng_state(ranks[world.rank if world.rank < len(ranks) else 0]["rng"], device)
        early = EarlyStopping(**resumed["early_stopping"])
        saved = resumed["progress"]
        state = _Progress(**{**saved, "history": [EvalLog(**log) for log in saved["history"]]})
        best_state = resumed["best_model"]
        if best_state is None and resumed["best_is_current"]:
            best_state = _cpu_state(model)
        resumed_from = state.step
        if world.is_main:
            print(f"resuming from step {state.step} (epoch {state.epoch})", flush=True)

    trained: torch.nn.Module = model
    if world.distributed:
        # Wrapped after loading a checkpoint; DDP broadcasts rank 0's weights to the others.
        trained = DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None
        )
    eval_at = evaluation_steps(steps_per_epoch, config.evals_per_epoch)
    every = config.checkpoint_every_steps if checkpoint_dir is not None else None
    first_step = state.step
    samples = real_tokens = padded_tokens = 0
    loss_total = torch.zeros((), device=device)  # summed over this process's examples
    loss_count = 0
    side_seconds = 0.0  # validation and checkpoints: not optimizer steps

    def elapsed() -> float:
        return state.seconds + time.perf_counter() - clock_start - excluded

    def checkpoint() -> None:
        ranks = all_gather_objects(world, {"rng": _rng_state(device)})
        if not world.is_main:
            return
        best_is_current = early.best_step == state.step and early.best_step > 0
        save_checkpoint(
            checkpoint_dir,
            {
                "format": CHECKPOINT_FORMAT,
                "model": model.state_dict(),
                "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict(),
                "scaler": scaler.state_dict(),
                "ranks": ranks,
                "early_stopping": asdict(early),
                "progress": {**asdict(state), "seconds": elapsed()},
                "best_model": None if best_is_current else best_state,
                "best_is_current": best_is_current,
            },
        )

    model.train()
    while not state.finished and state.epoch <= config.epochs:
        batches = length_bucketed_batches(
            train_data.lengths, config.batch_size, seed=(config.seed, state.epoch)
        )
        bar = tqdm(
            total=len(batches),
            initial=state.batches_done,
            desc=f"epoch {state.epoch}/{config.epochs}",
            unit="batch",
            disable=not progress or not world.is_main,
            # Piped into logs (DVC under Prefect), a bar line every 15 s is plenty.
            mininterval=2.0 if sys.stderr.isatty() else 15.0,
        )
        while state.batches_done < len(batches):
            index = batches[state.batches_done]
            local, weight = index[world.rank :: world.size], world.size / len(index)
            if len(local) == 0:  # a last batch smaller than the world: run one, count none
                local, weight = index[:1], 0.0
            batch = train_data.batch(local)
            real_tokens += int(train_data.lengths[local].sum())
            padded_tokens += batch["input_ids"].numel()
            batch = _batch_to_device(batch, device)
            targets = _to_device(targets_all[torch.from_numpy(local)], device)
            with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
                logits = trained(**batch).logits  # (batch, labels)
            # Summed over the shard and divided by the global batch: the mean over the global
            # batch once DDP has averaged the processes' gradients.
            loss_sum = torch.nn.functional.cross_entropy(logits.float(), targets, reduction="sum")
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(loss_sum * weight).backward()
            scaler.unscale_(optimizer)
            torch.nn.utils.clip_grad_norm_(model.parameters(), MAX_GRAD_NORM)
            scaler.step(optimizer)
            scaler.update()
            scheduler.step()
            state.step += 1
            state.batches_done += 1
            samples += len(index)
            if weight:
                loss_total += loss_sum.detach()
                loss_count += len(local)
            bar.update(1)
            if state.step % 10 == 0 and bar.n:
                train_seconds = time.perf_counter() - clock_start - excluded - side_seconds
                bar.set_postfix(
                    loss=f"{loss_total.item() / max(loss_count, 1):.3f}",
                    samples_s=f"{samples / max(train_seconds, 1e-9):.1f}",
                    refresh=False,
                )

            if state.batches_done in eval_at:
                side_start = time.perf_counter()
                accuracy, macro_f1 = _validate(
                    model, val_data, val_targets, label_names, world, device, dtype
                )
                loss_sum_all, count_all = all_reduce_sum(world, [loss_total.item(), loss_count])
                loss_total.zero_()
                loss_count = 0
                log = EvalLog(
                    step=state.step,
                    epoch=state.epoch,
                    train_loss=loss_sum_all / max(count_all, 1),
                    val_accuracy=accuracy,
                    val_macro_f1=macro_f1,
                    seconds=elapsed(),
                )
                state.history.append(log)
                if early.update(macro_f1, state.step, state.epoch):
                    best_state = _cpu_state(model)
                if early.should_stop or (
                    state.epoch == config.epochs and state.batches_done == len(batches)
                ):
                    state.finished = True
                    state.stopped_early = early.should_stop and state.step < total_steps
                if world.is_main:
                    bar.clear()
                    print(
                        f"step {log.step} (epoch {log.epoch}): loss {log.train_loss:.4f}, val "
                        f"accuracy {log.val_accuracy:.4f}, val macro-F1 {log.val_macro_f1:.4f} "
                        f"({log.seconds:.1f}s)"
                        + (" best" if early.best_step == state.step else "")
                        + (", stopping early" if state.stopped_early else ""),
                        flush=True,
                    )
                side_seconds += time.perf_counter() - side_start
                if on_evaluate is not None and world.is_main:
                    hook_start = time.perf_counter()
                    on_evaluate(
                        EvalPoint(
                            step=log.step,
                            epoch=log.epoch,
                            seconds=log.seconds,
                            val_accuracy=accuracy,
                            val_macro_f1=macro_f1,
                            model=model,
                        )
                    )
                    model.train()
                    excluded += time.perf_counter() - hook_start
            epoch_done = state.batches_done == len(batches)
            if epoch_done and not state.finished:
                state.epoch += 1
                state.batches_done = 0
            if checkpoint_dir is not None and (
                epoch_done or state.finished or (every and state.step % every == 0)
            ):
                side_start = time.perf_counter()
                checkpoint()
                side_seconds += time.perf_counter() - side_start
            if epoch_done or state.finished:
                break
        bar.close()

    if best_state is not None:
        model.load_state_dict(best_state)
    wall = time.perf_counter() - clock_start - excluded
    memory, measured = peak_memory(device)
    best = next(log for log in state.history if log.step == early.best_step)
    return TrainResult(
        device=str(device),
        precision=str(dtype).removeprefix("torch.") if dtype else "float32",
        processes=world.size,
        threads=threads,
        epochs_run=state.history[-1].epoch,
        optimizer_steps=state.step,
        steps_this_run=state.step - first_step,
        resumed_from_step=resumed_from,
        stopped_early=state.stopped_early,
        best_epoch=early.best_epoch,
        best_step=early.best_step,
        val_accuracy=best.val_accuracy,
        val_macro_f1=best.val_macro_f1,
        seconds=state.seconds + wall,
        samples_per_second=samples / max(wall - side_seconds, 1e-9),
        padding_fraction=1 - real_tokens / padded_tokens if padded_tokens else 0.0,
        peak_memory_mb=all_reduce_max(world, memory),
        peak_memory=measured,
        history=state.history,
    )
