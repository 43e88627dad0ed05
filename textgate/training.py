"""Fine-tuning loop for sequence classification: seeded, device-agnostic, with progress."""

from __future__ import annotations

import copy
import math
import random
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
from tqdm.auto import tqdm
from transformers import PreTrainedModel, PreTrainedTokenizerBase, get_linear_schedule_with_warmup

from textgate.config import TrainConfig
from textgate.metrics import compute_metrics
from textgate.model import autocast_dtype, predict_proba, tokenize


@dataclass
class EpochLog:
    epoch: int
    train_loss: float
    val_accuracy: float
    val_macro_f1: float
    seconds: float


@dataclass
class TrainResult:
    """What training did: the best epoch's validation scores, speed and the per-epoch log."""

    device: str
    precision: str
    epochs_run: int
    optimizer_steps: int
    best_epoch: int
    val_accuracy: float
    val_macro_f1: float
    seconds: float
    samples_per_second: float
    history: list[EpochLog] = field(default_factory=list)


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch (all devices)."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def _optimizer(model: PreTrainedModel, config: TrainConfig) -> torch.optim.Optimizer:
    # No weight decay on biases and LayerNorm weights, as in BERT's recipe.
    decay, no_decay = [], []
    for parameter in model.parameters():
        if not parameter.requires_grad:
            continue
        (no_decay if parameter.ndim < 2 else decay).append(parameter)
    groups = [
        {"params": decay, "weight_decay": config.weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]
    return torch.optim.AdamW(groups, lr=config.learning_rate)


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
) -> TrainResult:
    """Fine-tune `model` in place and leave it holding the weights of its best epoch.

    The best epoch is the one with the highest validation macro-F1.
    """
    seed_everything(config.seed)
    model.to(device)
    dtype = autocast_dtype(device, config.mixed_precision)
    scaler = torch.amp.GradScaler("cuda", enabled=dtype == torch.float16)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
    optimizer = _optimizer(model, config)
    steps_per_epoch = math.ceil(len(train_texts) / config.batch_size)
    total_steps = steps_per_epoch * config.epochs
    scheduler = get_linear_schedule_with_warmup(
        optimizer, int(config.warmup_ratio * total_steps), total_steps
    )
    labels_tensor = torch.tensor(list(train_labels), dtype=torch.long)
    generator = torch.Generator().manual_seed(config.seed)
    label_names = [str(i) for i in range(model.config.num_labels)]

    history: list[EpochLog] = []
    best_state, best_f1, best_epoch = None, -1.0, 0
    steps, samples, start = 0, 0, time.perf_counter()
    for epoch in range(1, config.epochs + 1):
        model.train()
        epoch_start, loss_sum = time.perf_counter(), 0.0
        order = torch.randperm(len(train_texts), generator=generator).tolist()
        bar = tqdm(
            range(0, len(order), config.batch_size),
            desc=f"epoch {epoch}/{config.epochs}",
            unit="batch",
            disable=not progress,
            # Piped into logs (DVC under Prefect), a bar line every 15 s is plenty.
            mininterval=2.0 if sys.stderr.isatty() else 15.0,
        )
        for begin in bar:
            index = order[begin : begin + config.batch_size]
            batch = tokenize(tokenizer, [train_texts[i] for i in index], config.max_length)
            batch = {key: value.to(device, non_blocking=True) for key, value in batch.items()}
            targets = labels_tensor[index].to(device, non_blocking=True)
            with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
                logits = model(**batch).logits  # (batch, labels)
                loss = torch.nn.functional.cross_entropy(logits.float(), targets)
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            scaler.unscale_(optimizer)
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            scaler.step(optimizer)
            scaler.update()
            scheduler.step()
            steps += 1
            samples += len(index)
            loss_sum += loss.item() * len(index)
            elapsed = time.perf_counter() - start
            bar.set_postfix(
                loss=f"{loss.item():.3f}", samples_s=f"{samples / elapsed:.1f}", refresh=False
            )
        probabilities = predict_proba(model, tokenizer, list(val_texts), config.max_length)
        scores = compute_metrics(list(val_labels), probabilities.argmax(axis=1), label_names)
        log = EpochLog(
            epoch=epoch,
            train_loss=loss_sum / len(order),
            val_accuracy=scores.accuracy,
            val_macro_f1=scores.macro_f1,
            seconds=time.perf_counter() - epoch_start,
        )
        history.append(log)
        print(
            f"epoch {epoch}: loss {log.train_loss:.4f}, val accuracy {log.val_accuracy:.4f}, "
            f"val macro-F1 {log.val_macro_f1:.4f} ({log.seconds:.1f}s)",
            flush=True,
        )
        if scores.macro_f1 > best_f1:
            best_f1, best_epoch = scores.macro_f1, epoch
            best_state = copy.deepcopy(model.state_dict())
    if best_state is not None:
        model.load_state_dict(best_state)
    seconds = time.perf_counter() - start
    best = history[best_epoch - 1]
    return TrainResult(
        device=str(device),
        precision=str(dtype).removeprefix("torch.") if dtype else "float32",
        epochs_run=len(history),
        optimizer_steps=steps,
        best_epoch=best_epoch,
        val_accuracy=best.val_accuracy,
        val_macro_f1=best.val_macro_f1,
        seconds=seconds,
        samples_per_second=samples / seconds,
        history=history,
    )
