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
computes the same scores and takes the same early-stopping decision. Only rank 0 reports and
saves checkpoints, both through the caller's `TrainingCallbacks`: this module prints nothing
and writes no file.
"""

from __future__ import annotations

import math
import random
import re
import resource
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

import numpy as np
import torch
from torch.nn.parallel import DistributedDataParallel
from transformers import PreTrainedModel, PreTrainedTokenizerBase, get_linear_schedule_with_warmup

from textgate.config import TrainConfig
from textgate.distributed import World, all_gather_objects, all_reduce_max, all_reduce_sum
from textgate.metrics import compute_metrics
from textgate.model import autocast_dtype
from textgate.runtime import share_cpus

# A chunk of this many batches is sorted by length before it is cut into batches: large
# enough that batches pad little, small enough that each epoch's batches still differ.
BUCKET_CHUNK_BATCHES = 64
EVAL_BATCH_SIZE = 128
# The layout of the state `TrainingCallbacks.save_checkpoint` is given; other layouts are not
# resumed.
CHECKPOINT_FORMAT = 1
# The loss in progress reports every this many steps: reading it waits for the device.
PROGRESS_LOSS_EVERY = 10
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


def configure_threads(world: World) -> int:
    """Set torch's intra-op threads: the usable CPUs shared out between this machine's processes."""
    threads = share_cpus(world.local_size)
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


def encoder_depth(name: str, layers: int) -> int:
    """Where a pretrained weight sits: 0 for the embeddings, i + 1 for encoder layer i, and
    layers + 1 above them (the pooler)."""
    match = re.search(r"\.layers?\.(\d+)\.", name)
    if match:
        return int(match.group(1)) + 1
    return 0 if "embeddings" in name else layers + 1


def _optimizer(model: PreTrainedModel, config: TrainConfig) -> torch.optim.Optimizer:
    """AdamW over the trainable weights; the new head learns `head_learning_rate_multiplier`
    times faster than the pretrained encoder (it starts from random weights), and each encoder
    layer `layer_learning_rate_decay` times as fast as the one above it."""
    layers = int(getattr(model.config, "num_hidden_layers", 0))
    encoder = {id(parameter) for parameter in model.base_model.parameters()}
    groups: dict[tuple[bool, bool, int], list[torch.nn.Parameter]] = {}
    for name, parameter in model.named_parameters():
        if parameter.requires_grad:
            head = id(parameter) not in encoder
            depth = layers + 1 if head else encoder_depth(name, layers)
            # No weight decay on biases and LayerNorm weights, as in BERT's recipe.
            groups.setdefault((head, parameter.ndim >= 2, depth), []).append(parameter)

    def learning_rate(head: bool, depth: int) -> float:
        if head:
            return config.learning_rate * config.head_learning_rate_multiplier
        return config.learning_rate * config.layer_learning_rate_decay ** (layers + 1 - depth)

    return torch.optim.AdamW(
        [
            {
                "params": parameters,
                "lr": learning_rate(head, depth),
                "weight_decay": config.weight_decay if decayed else 0.0,
            }
            for (head, decayed, depth), parameters in sorted(groups.items())
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


@dataclass(frozen=True)
class TrainingProgress:
    """Where training is: reported on rank 0 at an epoch's start, after each of its optimizer
    steps, and at its end (the epoch done, or training)."""

    moment: Literal["start", "step", "end"]
    epoch: int
    epochs: int
    batches_done: int  # of this epoch's batches
    batches: int  # in this epoch
    step: int
    # Only after every PROGRESS_LOSS_EVERY-th step, else None: reading the loss waits for the
    # device. The loss is this process's mean since the previous validation.
    loss: float | None = None
    samples_per_second: float | None = None


@dataclass(frozen=True)
class ValidationReport:
    """One validation, as reported on rank 0."""

    log: EvalLog
    best: bool  # the best validation so far
    stopping_early: bool


@dataclass(frozen=True)
class TrainingCallbacks:
    """What training reports and how it keeps checkpoints; each is optional.

    The reports and `save_checkpoint` are called on rank 0 only, `load_checkpoint` on every
    process. Give every process the same callbacks: with `save_checkpoint` set, each
    checkpoint first gathers every process's random state (a collective).
    """

    on_resume: Callable[[int, int], None] | None = None  # (step, epoch) resumed from
    on_progress: Callable[[TrainingProgress], None] | None = None
    on_validation: Callable[[ValidationReport], None] | None = None
    on_evaluate: EvalHook | None = None  # its own time is left out of the training time
    save_checkpoint: Callable[[dict[str, Any]], None] | None = None
    load_checkpoint: Callable[[], dict[str, Any] | None] | None = None  # None: none saved


@dataclass
class _Clock:
    """This run's time: wall time less the evaluation hooks' time."""

    start: float = field(default_factory=time.perf_counter)
    excluded: float = 0.0  # in evaluation hooks: not training time
    side: float = 0.0  # in validation and checkpoints: training time, but not optimizer steps

    def seconds(self) -> float:
        return time.perf_counter() - self.start - self.excluded


@dataclass
class _Tally:
    """What this run's optimizer steps did: the loss since the last validation, and speed and
    padding counts."""

    loss_sum: torch.Tensor  # () on the device, summed over this process's examples
    loss_count: int = 0
    samples: int = 0  # examples of the global batches
    real_tokens: int = 0
    padded_tokens: int = 0


@dataclass
class _Run:
    """One training run: the model, its optimizer and data, and how far it has got."""

    config: TrainConfig
    world: World
    device: torch.device
    dtype: torch.dtype | None  # autocast; None: full precision
    threads: int
    callbacks: TrainingCallbacks
    model: PreTrainedModel
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    scaler: torch.amp.GradScaler
    train_data: Encoded
    train_targets: torch.Tensor  # (train examples,) on the CPU
    val_data: Encoded
    val_targets: np.ndarray  # (val examples,)
    clock: _Clock
    tally: _Tally
    early: EarlyStopping
    progress: _Progress = field(default_factory=_Progress)
    best_state: dict[str, torch.Tensor] | None = None  # on the CPU; None: keep the last weights
    resumed_from: int | None = None
    trained: torch.nn.Module | None = None  # set once resumed: the model, in DDP if distributed

    @property
    def total_steps(self) -> int:
        return math.ceil(len(self.train_data) / self.config.batch_size) * self.config.epochs

    def elapsed(self) -> float:
        """Training time in all, earlier (interrupted) runs included."""
        return self.progress.seconds + self.clock.seconds()


def train_classifier(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    train_texts: Sequence[str],
    train_labels: Sequence[int],
    val_texts: Sequence[str],
    val_labels: Sequence[int],
    config: TrainConfig,
    device: torch.device,
    *,
    world: World | None = None,
    callbacks: TrainingCallbacks | None = None,
) -> TrainResult:
    """Fine-tune `model` in place and leave it holding the weights of its best validation.

    The model is validated `train.evals_per_epoch` times an epoch; the best validation is the
    one with the highest macro-F1, and `train.early_stopping_patience` validations without
    improvement stop training early. With `callbacks.save_checkpoint`, a checkpoint is saved
    every `train.checkpoint_every_steps` steps and at each epoch's end; training resumes from
    what `callbacks.load_checkpoint` returns.

    Args:
        world: this process among several (torchrun); the process group must be initialised
            and `device` be this process's own. None: a single process.
        callbacks: reports and checkpoint storage; None: none.
    """
    run = _start_run(
        model,
        tokenizer,
        (train_texts, train_labels),
        (val_texts, val_labels),
        config,
        device,
        world or World(),
        callbacks or TrainingCallbacks(),
    )
    _resume(run)
    run.trained = _distributed(run.model, run.world, run.device)
    run.model.train()
    while not run.progress.finished and run.progress.epoch <= config.epochs:
        _train_epoch(run)
    return _result(run)


def _start_run(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    train: tuple[Sequence[str], Sequence[int]],
    val: tuple[Sequence[str], Sequence[int]],
    config: TrainConfig,
    device: torch.device,
    world: World,
    callbacks: TrainingCallbacks,
) -> _Run:
    """Seed, set up the device and the model, tokenize both splits, make the optimizer."""
    if not val[0]:
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
    clock = _Clock()
    train_data = encode_texts(tokenizer, train[0], config.max_length)
    val_data = encode_texts(tokenizer, val[0], config.max_length)
    optimizer = _optimizer(model, config)
    total_steps = math.ceil(len(train_data) / config.batch_size) * config.epochs
    scheduler = get_linear_schedule_with_warmup(
        optimizer, int(config.warmup_ratio * total_steps), total_steps
    )
    return _Run(
        config=config,
        world=world,
        device=device,
        dtype=dtype,
        threads=threads,
        callbacks=callbacks,
        model=model,
        optimizer=optimizer,
        scheduler=scheduler,
        scaler=scaler,
        train_data=train_data,
        train_targets=torch.tensor(list(train[1]), dtype=torch.long),
        val_data=val_data,
        val_targets=np.asarray(val[1], dtype=np.int64),
        clock=clock,
        tally=_Tally(loss_sum=torch.zeros((), device=device)),
        early=EarlyStopping(config.early_stopping_patience),
    )


def _resume(run: _Run) -> None:
    """Restore the run from the saved checkpoint, if there is one of this format."""
    load = run.callbacks.load_checkpoint
    saved = load() if load is not None else None
    if saved is None or saved.get("format") != CHECKPOINT_FORMAT:
        return  # none, or an older layout: start from the base model
    run.model.load_state_dict(saved["model"])
    run.optimizer.load_state_dict(saved["optimizer"])
    run.scheduler.load_state_dict(saved["scheduler"])
    run.scaler.load_state_dict(saved["scaler"])
    ranks = saved["ranks"]
    _set_rng_state(ranks[run.world.rank if run.world.rank < len(ranks) else 0]["rng"], run.device)
    run.early = EarlyStopping(**saved["early_stopping"])
    progress = saved["progress"]
    history = [EvalLog(**log) for log in progress["history"]]
    run.progress = _Progress(**{**progress, "history": history})
    run.best_state = saved["best_model"]
    if run.best_state is None and saved["best_is_current"]:
        run.best_state = _cpu_state(run.model)
    run.resumed_from = run.progress.step
    if run.world.is_main and run.callbacks.on_resume is not None:
        run.callbacks.on_resume(run.progress.step, run.progress.epoch)


def _distributed(model: PreTrainedModel, world: World, device: torch.device) -> torch.nn.Module:
    """The model to train: wrapped in DDP between processes, itself in a single one."""
    if not world.distributed:
        return model
    # Wrapped after loading a checkpoint; DDP broadcasts rank 0's weights to the others.
    return DistributedDataParallel(
        model, device_ids=[device.index] if device.type == "cuda" else None
    )


def _train_epoch(run: _Run) -> None:
    """Train the rest of the current epoch (all of it unless resumed within it), validating
    and saving checkpoints on the way; stop early when training is finished."""
    config, progress = run.config, run.progress
    batches = length_bucketed_batches(
        run.train_data.lengths, config.batch_size, seed=(config.seed, progress.epoch)
    )
    eval_at = evaluation_steps(len(batches), config.evals_per_epoch)
    _report_progress(run, "start", len(batches))
    while progress.batches_done < len(batches):
        _train_step(run, batches[progress.batches_done])
        _report_progress(run, "step", len(batches))
        epoch_done = progress.batches_done == len(batches)
        if progress.batches_done in eval_at:
            _validation(run, last_of_epoch=epoch_done)
        if epoch_done or progress.finished:
            _report_progress(run, "end", len(batches))
        if epoch_done and not progress.finished:
            progress.epoch += 1
            progress.batches_done = 0
        if _checkpoint_due(run, epoch_done):
            _checkpoint(run)
        if epoch_done or progress.finished:
            return


def _train_step(run: _Run, index: np.ndarray) -> None:
    """One optimizer step on the global batch `index`, of which this process takes a shard."""
    world, device, tally = run.world, run.device, run.tally
    local, weight = index[world.rank :: world.size], world.size / len(index)
    if len(local) == 0:  # a last batch smaller than the world: run one, count none
        local, weight = index[:1], 0.0
    batch = run.train_data.batch(local)
    tally.real_tokens += int(run.train_data.lengths[local].sum())
    tally.padded_tokens += batch["input_ids"].numel()
    batch = _batch_to_device(batch, device)
    targets = _to_device(run.train_targets[torch.from_numpy(local)], device)
    with torch.autocast(device.type, dtype=run.dtype, enabled=run.dtype is not None):
        logits = run.trained(**batch).logits  # (batch, labels)
    # Summed over the shard and divided by the global batch: the mean over the global batch
    # once DDP has averaged the processes' gradients.
    loss_sum = torch.nn.functional.cross_entropy(
        logits.float(), targets, reduction="sum", label_smoothing=run.config.label_smoothing
    )
    run.optimizer.zero_grad(set_to_none=True)
    run.scaler.scale(loss_sum * weight).backward()
    run.scaler.unscale_(run.optimizer)
    torch.nn.utils.clip_grad_norm_(run.model.parameters(), MAX_GRAD_NORM)
    run.scaler.step(run.optimizer)
    run.scaler.update()
    run.scheduler.step()
    run.progress.step += 1
    run.progress.batches_done += 1
    tally.samples += len(index)
    if weight:
        tally.loss_sum += loss_sum.detach()
        tally.loss_count += len(local)


def _report_progress(run: _Run, moment: Literal["start", "step", "end"], batches: int) -> None:
    """Tell `callbacks.on_progress` (rank 0) where training is."""
    report, progress = run.callbacks.on_progress, run.progress
    if report is None or not run.world.is_main:
        return
    loss = samples_per_second = None
    if moment == "step" and progress.step % PROGRESS_LOSS_EVERY == 0:
        loss = run.tally.loss_sum.item() / max(run.tally.loss_count, 1)
        step_seconds = run.clock.seconds() - run.clock.side
        samples_per_second = run.tally.samples / max(step_seconds, 1e-9)
    report(
        TrainingProgress(
            moment=moment,
            epoch=progress.epoch,
            epochs=run.config.epochs,
            batches_done=progress.batches_done,
            batches=batches,
            step=progress.step,
            loss=loss,
            samples_per_second=samples_per_second,
        )
    )


def _validation(run: _Run, last_of_epoch: bool) -> None:
    """Validate, log and report it, keep the best weights, decide whether training is over;
    then run the evaluation hook."""
    start = time.perf_counter()
    progress, early, tally = run.progress, run.early, run.tally
    label_names = [str(i) for i in range(run.model.config.num_labels)]
    accuracy, macro_f1 = _validate(
        run.model, run.val_data, run.val_targets, label_names, run.world, run.device, run.dtype
    )
    loss_sum, count = all_reduce_sum(run.world, [tally.loss_sum.item(), tally.loss_count])
    tally.loss_sum.zero_()
    tally.loss_count = 0
    log = EvalLog(
        step=progress.step,
        epoch=progress.epoch,
        train_loss=loss_sum / max(count, 1),
        val_accuracy=accuracy,
        val_macro_f1=macro_f1,
        seconds=run.elapsed(),
    )
    progress.history.append(log)
    best = early.update(macro_f1, progress.step, progress.epoch)
    if best:
        run.best_state = _cpu_state(run.model)
    if early.should_stop or (progress.epoch == run.config.epochs and last_of_epoch):
        progress.finished = True
        progress.stopped_early = early.should_stop and progress.step < run.total_steps
    if run.world.is_main and run.callbacks.on_validation is not None:
        run.callbacks.on_validation(ValidationReport(log, best, progress.stopped_early))
    run.clock.side += time.perf_counter() - start
    _evaluation_hook(run, log)


def _evaluation_hook(run: _Run, log: EvalLog) -> None:
    """Run `callbacks.on_evaluate` (rank 0) on this validation; its time is not training time."""
    hook = run.callbacks.on_evaluate
    if hook is None or not run.world.is_main:
        return
    start = time.perf_counter()
    hook(
        EvalPoint(
            step=log.step,
            epoch=log.epoch,
            seconds=log.seconds,
            val_accuracy=log.val_accuracy,
            val_macro_f1=log.val_macro_f1,
            model=run.model,
        )
    )
    run.model.train()
    run.clock.excluded += time.perf_counter() - start


def _checkpoint_due(run: _Run, epoch_done: bool) -> bool:
    """A checkpoint at each epoch's end, when training is finished, and every
    `train.checkpoint_every_steps` steps; never without `callbacks.save_checkpoint`."""
    if run.callbacks.save_checkpoint is None:
        return False
    every = run.config.checkpoint_every_steps
    return epoch_done or run.progress.finished or bool(every and run.progress.step % every == 0)


def _checkpoint(run: _Run) -> None:
    """Gather every process's random state; rank 0 saves the run through the callback."""
    start = time.perf_counter()
    ranks = all_gather_objects(run.world, {"rng": _rng_state(run.device)})
    if run.world.is_main:
        early, progress = run.early, run.progress
        best_is_current = early.best_step == progress.step and early.best_step > 0
        run.callbacks.save_checkpoint(
            {
                "format": CHECKPOINT_FORMAT,
                "model": run.model.state_dict(),
                "optimizer": run.optimizer.state_dict(),
                "scheduler": run.scheduler.state_dict(),
                "scaler": run.scaler.state_dict(),
                "ranks": ranks,
                "early_stopping": asdict(early),
                "progress": {**asdict(progress), "seconds": run.elapsed()},
                "best_model": None if best_is_current else run.best_state,
                "best_is_current": best_is_current,
            }
        )
    run.clock.side += time.perf_counter() - start


def _result(run: _Run) -> TrainResult:
    """Load the best weights into the model; what training did."""
    if run.best_state is not None:
        run.model.load_state_dict(run.best_state)
    wall = run.clock.seconds()
    memory, measured = peak_memory(run.device)
    progress, early, tally = run.progress, run.early, run.tally
    best = next(log for log in progress.history if log.step == early.best_step)
    padded = tally.padded_tokens
    return TrainResult(
        device=str(run.device),
        precision=str(run.dtype).removeprefix("torch.") if run.dtype else "float32",
        processes=run.world.size,
        threads=run.threads,
        epochs_run=progress.history[-1].epoch,
        optimizer_steps=progress.step,
        steps_this_run=progress.step - (run.resumed_from or 0),
        resumed_from_step=run.resumed_from,
        stopped_early=progress.stopped_early,
        best_epoch=early.best_epoch,
        best_step=early.best_step,
        val_accuracy=best.val_accuracy,
        val_macro_f1=best.val_macro_f1,
        seconds=progress.seconds + wall,
        samples_per_second=tally.samples / max(wall - run.clock.side, 1e-9),
        padding_fraction=1 - tally.real_tokens / padded if padded else 0.0,
        peak_memory_mb=all_reduce_max(run.world, memory),
        peak_memory=measured,
        history=progress.history,
    )
