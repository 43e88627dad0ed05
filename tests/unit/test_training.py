"""The training loop's pieces: length bucketing, threads, evaluation points, early stopping,
checkpoints and resuming, peak memory, and the new train params' validation."""

from __future__ import annotations

import math
import resource
from dataclasses import replace
from functools import partial
from pathlib import Path

import numpy as np
import pytest
import torch

from tasks.train import CHECKPOINT_FILE, load_checkpoint, save_checkpoint
from tests.conftest import make_rows
from tests.helpers import make_params, tiny_overrides
from textgate import runtime, training
from textgate.config import TrainConfig
from textgate.distributed import World
from textgate.errors import ConfigError
from textgate.model import build_classifier
from textgate.runtime import share_cpus
from textgate.training import (
    CHECKPOINT_FORMAT,
    EarlyStopping,
    EvalPoint,
    TrainingCallbacks,
    configure_threads,
    encode_texts,
    evaluation_steps,
    length_bucketed_batches,
    peak_memory,
    train_classifier,
)


@pytest.fixture
def restore_threads():
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


# --- length bucketing ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("n", "batch_size", "chunk_batches"), [(1, 4, 2), (10, 3, 1), (100, 8, 4), (257, 16, 64)]
)
def test_bucketed_batches_hold_every_index_once_in_ceil_n_over_b_batches(
    n, batch_size, chunk_batches
):
    lengths = np.random.default_rng(0).integers(1, 60, size=n)
    batches = length_bucketed_batches(lengths, batch_size, seed=1, chunk_batches=chunk_batches)
    assert len(batches) == math.ceil(n / batch_size)
    assert sorted(np.concatenate(batches).tolist()) == list(range(n))
    assert sum(len(batch) < batch_size for batch in batches) == (n % batch_size != 0)


def test_bucketed_batches_are_seeded():
    lengths = np.random.default_rng(0).integers(1, 60, size=200)
    first = length_bucketed_batches(lengths, 8, seed=(42, 1), chunk_batches=4)
    again = length_bucketed_batches(lengths, 8, seed=(42, 1), chunk_batches=4)
    other = length_bucketed_batches(lengths, 8, seed=(42, 2), chunk_batches=4)
    assert [b.tolist() for b in first] == [b.tolist() for b in again]
    assert [b.tolist() for b in first] != [b.tolist() for b in other]


def test_bucketed_batches_are_sorted_by_length_within_a_chunk():
    lengths = np.random.default_rng(0).integers(1, 60, size=96)
    # One chunk: the batches, ordered by their shortest text, are the sorted lengths.
    batches = length_bucketed_batches(lengths, 8, seed=3, chunk_batches=12)
    for batch in batches:
        assert np.all(np.diff(lengths[batch]) >= 0)
    ordered = sorted(batches, key=lambda batch: (lengths[batch].min(), lengths[batch].max()))
    assert lengths[np.concatenate(ordered)].tolist() == sorted(lengths.tolist())
    # Several chunks: each batch still comes from one sorted chunk, and the batches are shuffled.
    batches = length_bucketed_batches(lengths, 8, seed=3, chunk_batches=3)
    for batch in batches:
        assert np.all(np.diff(lengths[batch]) >= 0)
    assert [lengths[b].min() for b in batches] != sorted(lengths[b].min() for b in batches)


def test_bucketing_pads_much_less_than_random_batches():
    lengths = np.random.default_rng(0).integers(3, 64, size=2000)

    def padding(batches):
        return sum(len(b) * lengths[b].max() - lengths[b].sum() for b in batches)

    order = np.random.default_rng(1).permutation(len(lengths))
    random_batches = [order[i : i + 32] for i in range(0, len(order), 32)]
    bucketed = length_bucketed_batches(lengths, 32, seed=1)
    assert padding(bucketed) < padding(random_batches) / 10


def test_encoded_batches_pad_to_their_longest_text(tiny_base_model):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_base_model)
    texts = ["hi", "my card was stolen yesterday evening", "refund please"]
    encoded = encode_texts(tokenizer, texts, max_length=32)
    assert encoded.lengths.tolist() == [len(tokenizer(t)["input_ids"]) for t in texts]
    batch = encoded.batch(np.array([2, 0]))
    assert (
        batch["input_ids"].shape == (2, encoded.lengths[2])
        and batch["input_ids"].dtype == torch.long
    )
    assert batch["input_ids"][0].tolist() == tokenizer(texts[2])["input_ids"]
    assert batch["attention_mask"][1].tolist() == [1] * encoded.lengths[0] + [0] * (
        encoded.lengths[2] - encoded.lengths[0]
    )


# --- threads, evaluation points, early stopping ----------------------------------------------


@pytest.mark.parametrize(
    ("cpus", "processes", "threads"), [(2, 1, 2), (2, 2, 1), (16, 4, 4), (1, 4, 1), (3, 2, 1)]
)
def test_threads_share_the_usable_cpus_between_local_processes(cpus, processes, threads):
    assert share_cpus(processes, cpus) == threads


def test_threads_follow_the_affinity_mask(monkeypatch, restore_threads):
    monkeypatch.setattr(runtime.os, "sched_getaffinity", lambda pid: {0, 1, 2, 3, 4, 5})
    assert configure_threads(World(rank=1, size=2, local_rank=1, local_size=2)) == 3
    assert torch.get_num_threads() == 3
    monkeypatch.setattr(runtime.os, "sched_getaffinity", lambda pid: {0})
    assert configure_threads(World()) == 1


@pytest.mark.parametrize(
    ("steps", "evals", "expected"),
    [(10, 1, {10}), (10, 2, {5, 10}), (7, 3, {3, 5, 7}), (3, 5, {1, 2, 3}), (1, 4, {1})],
)
def test_evaluation_steps_end_each_epoch(steps, evals, expected):
    assert evaluation_steps(steps, evals) == expected


@pytest.mark.parametrize(
    ("patience", "scores", "stops_after"),
    [
        (2, [0.5, 0.6, 0.55, 0.58, 0.9], 4),  # two evaluations without a better score
        (1, [0.5, 0.6, 0.6], 3),  # equal is not better
        (1, [0.5, 0.5, 0.5, 0.5], None),  # never better than at first: still starting
        (1, [0.5, 0.4, 0.6, 0.5], 4),
        (3, [0.1, 0.2, 0.3, 0.4, 0.5, 0.6], None),
        (0, [0.9, 0.1, 0.1, 0.1, 0.1], None),  # off
        (None, [0.9, 0.1, 0.1, 0.1, 0.1], None),  # off
    ],
)
def test_early_stopping_counts_evaluations_without_improvement(patience, scores, stops_after):
    early = EarlyStopping(patience)
    stopped = None
    for number, score in enumerate(scores, start=1):
        early.update(score, step=number * 10, epoch=1)
        if early.should_stop:
            stopped = number
            break
    assert stopped == stops_after
    assert early.best_score == max(scores[: stopped or len(scores)])


# --- training on the tiny model --------------------------------------------------------------


def tiny_config(tmp_path: Path, base_model: Path, **train) -> TrainConfig:
    overrides = tiny_overrides(tmp_path, base_model)
    overrides["train"].update(train)
    return make_params(overrides).train


def tiny_data():
    rows = make_rows(per_class=12)
    labels = sorted({label for _, label in rows})
    ids = {label: i for i, label in enumerate(labels)}
    texts = [text for text, _ in rows]
    targets = [ids[label] for _, label in rows]
    return labels, texts, targets


def train_tiny(
    base_model: Path,
    config: TrainConfig,
    checkpoint_dir: Path | None = None,
    on_evaluate=None,
    callbacks: TrainingCallbacks | None = None,
):
    """Train on tiny_data; with `checkpoint_dir`, checkpoints are files there (as in the stage)."""
    labels, texts, targets = tiny_data()
    torch.manual_seed(config.seed)
    model, tokenizer = build_classifier(str(base_model), labels)
    if callbacks is None:
        callbacks = TrainingCallbacks(on_evaluate=on_evaluate)
    if checkpoint_dir is not None:
        callbacks = replace(
            callbacks,
            save_checkpoint=partial(save_checkpoint, checkpoint_dir),
            load_checkpoint=partial(load_checkpoint, checkpoint_dir),
        )
    result = train_classifier(
        model, tokenizer, texts, targets, texts[::4], targets[::4], config,
        torch.device("cpu"), callbacks=callbacks,
    )  # fmt: skip
    return model, result


def weights(model) -> dict[str, torch.Tensor]:
    return {name: value.detach().clone() for name, value in model.state_dict().items()}


def same_weights(first: dict, second: dict) -> bool:
    return first.keys() == second.keys() and all(torch.equal(first[k], second[k]) for k in first)


def tiny_optimizer(tmp_path, tiny_base_model, **train):
    """The tiny classifier (word embeddings frozen) and its optimizer at 1e-4, head at 10x."""
    config = tiny_config(
        tmp_path, tiny_base_model, learning_rate=1e-4, head_learning_rate_multiplier=10, **train
    )
    labels, _, _ = tiny_data()
    model, _ = build_classifier(str(tiny_base_model), labels)
    training.freeze_word_embeddings(model)
    return model, training._optimizer(model, config)


def test_the_new_head_learns_faster_than_the_encoder(tmp_path, tiny_base_model):
    # One rate for the encoder (layer decay: the next test).
    model, optimizer = tiny_optimizer(tmp_path, tiny_base_model, layer_learning_rate_decay=1.0)
    head = {id(p) for p in model.classifier.parameters()}
    seen = set()
    for group in optimizer.param_groups:
        in_head = {id(p) in head for p in group["params"]}
        assert len(in_head) == 1  # a group is all head or all encoder
        assert group["lr"] == pytest.approx(1e-3 if in_head.pop() else 1e-4)
        one_dimensional = {p.ndim < 2 for p in group["params"]}
        assert group["weight_decay"] == (0.0 if one_dimensional == {True} else 0.01)
        seen |= {id(p) for p in group["params"]}
    trainable = {id(p) for p in model.parameters() if p.requires_grad}
    assert seen == trainable and id(model.get_input_embeddings().weight) not in seen


def test_each_encoder_layer_learns_decay_times_as_fast_as_the_one_above(tmp_path, tiny_base_model):
    model, optimizer = tiny_optimizer(tmp_path, tiny_base_model, layer_learning_rate_decay=0.5)
    layers = model.config.num_hidden_layers
    assert layers >= 2
    depth = {
        id(p): training.encoder_depth(name, layers)
        for name, p in model.base_model.named_parameters()
    }
    head = {id(p) for p in model.classifier.parameters()}
    rates = {}
    for group in optimizer.param_groups:
        for parameter in group["params"]:
            key = "head" if id(parameter) in head else depth[id(parameter)]
            rates.setdefault(key, set()).add(round(group["lr"], 12))
    assert rates.pop("head") == {1e-3}
    # Embeddings (0), each layer (1..layers), and the [CLS] pooler above them where the head
    # has one (a mean-pooled head, train.pooling auto for BERT, has none).
    pooler = model.base_model.pooler is not None
    assert sorted(rates) == list(range(layers + 1 + pooler))
    for key, rate in rates.items():
        assert rate == {round(1e-4 * 0.5 ** (layers + 1 - key), 12)}


@pytest.mark.slow  # trains the tiny model
def test_label_smoothing_changes_what_training_learns(tmp_path, tiny_base_model, restore_threads):
    trained = []
    for smoothing in (0.0, 0.0, 0.3):
        config = tiny_config(tmp_path, tiny_base_model, epochs=1, label_smoothing=smoothing)
        trained.append(weights(train_tiny(tiny_base_model, config)[0]))
    assert same_weights(trained[0], trained[1])  # the run is deterministic...
    assert not same_weights(trained[0], trained[2])  # ...and the smoothing is in the loss


@pytest.mark.slow  # trains the tiny model
def test_early_stopping_stops_and_keeps_the_best_weights(
    tmp_path, tiny_base_model, monkeypatch, restore_threads
):
    scores = iter([0.5, 0.9, 0.7, 0.6, 0.95, 0.95])  # best at the 2nd validation
    monkeypatch.setattr(training, "_validate", lambda *args: (next(scores),) * 2)
    seen: dict[int, dict] = {}

    def remember(point: EvalPoint) -> None:
        seen[point.step] = weights(point.model)

    config = tiny_config(
        tmp_path, tiny_base_model, epochs=4, evals_per_epoch=2, early_stopping_patience=2
    )
    model, result = train_tiny(tiny_base_model, config, on_evaluate=remember)
    steps_per_epoch = math.ceil(36 / config.batch_size)  # 5
    assert [log.step for log in result.history] == [3, 5, 8, 10]
    assert result.stopped_early and result.optimizer_steps == 10 < 4 * steps_per_epoch
    assert (result.best_step, result.best_epoch, result.val_macro_f1) == (5, 1, 0.9)
    assert same_weights(weights(model), seen[5])
    assert not same_weights(weights(model), seen[10])


@pytest.mark.slow  # trains the tiny model
def test_training_records_speed_padding_and_peak_memory(tmp_path, tiny_base_model, restore_threads):
    config = tiny_config(tmp_path, tiny_base_model, epochs=1, freeze_embeddings=True)
    model, result = train_tiny(tiny_base_model, config)
    assert result.peak_memory == "cpu peak RSS"
    rss_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    assert 50 < result.peak_memory_mb <= rss_mb
    assert result.samples_per_second > 0 and 0 <= result.padding_fraction < 0.5
    assert result.threads == torch.get_num_threads() and result.processes == 1
    assert result.resumed_from_step is None and result.steps_this_run == result.optimizer_steps
    assert not model.get_input_embeddings().weight.requires_grad  # frozen


@pytest.mark.slow  # trains the tiny model
def test_frozen_embeddings_do_not_change(tmp_path, tiny_base_model, restore_threads):
    labels, _, _ = tiny_data()
    torch.manual_seed(42)
    before = build_classifier(str(tiny_base_model), labels)[0].get_input_embeddings().weight
    for freeze in (True, False):
        config = tiny_config(tmp_path, tiny_base_model, epochs=1, freeze_embeddings=freeze)
        model, _ = train_tiny(tiny_base_model, config)
        after = model.get_input_embeddings().weight
        assert torch.equal(before, after) == freeze


@pytest.mark.slow  # trains the tiny model
def test_interrupted_training_resumes_to_the_same_model(tmp_path, tiny_base_model, restore_threads):
    """Killed in a hook after the step-4 checkpoint, a rerun resumes there and ends where an
    uninterrupted run ends (the real SIGKILL: tests/tasks/test_train.py)."""
    config = tiny_config(
        tmp_path, tiny_base_model, epochs=3, checkpoint_every_steps=2, evals_per_epoch=1
    )
    full_model, full = train_tiny(tiny_base_model, config)

    class Interrupted(Exception):
        pass

    def interrupt(point: EvalPoint) -> None:
        if point.step == 10:
            raise Interrupted

    checkpoints = tmp_path / "run"
    with pytest.raises(Interrupted):
        train_tiny(tiny_base_model, config, checkpoint_dir=checkpoints, on_evaluate=interrupt)
    assert load_checkpoint(checkpoints)["progress"]["step"] == 8  # the last before the hook
    model, resumed = train_tiny(tiny_base_model, config, checkpoint_dir=checkpoints)
    assert resumed.resumed_from_step == 8 and resumed.steps_this_run == full.optimizer_steps - 8
    assert resumed.optimizer_steps == full.optimizer_steps == 15
    assert [(log.step, log.val_macro_f1) for log in resumed.history] == [
        (log.step, log.val_macro_f1) for log in full.history
    ]
    for name, value in weights(full_model).items():
        torch.testing.assert_close(weights(model)[name], value, msg=name)
    # A finished run's checkpoint only restores the result: nothing is trained again.
    again_model, again = train_tiny(tiny_base_model, config, checkpoint_dir=checkpoints)
    assert again.steps_this_run == 0 and again.resumed_from_step == 15
    assert same_weights(weights(again_model), weights(model))


def test_checkpoints_are_replaced_atomically(tmp_path):
    assert load_checkpoint(tmp_path / "none") is None
    save_checkpoint(tmp_path, {"format": 1, "step": 1})
    save_checkpoint(tmp_path, {"format": 1, "step": 2})
    assert [p.name for p in tmp_path.iterdir()] == [CHECKPOINT_FILE]
    assert load_checkpoint(tmp_path) == {"format": 1, "step": 2}


def test_a_checkpoint_of_an_older_layout_is_not_resumed(tmp_path, tiny_base_model, restore_threads):
    config = tiny_config(tmp_path, tiny_base_model, epochs=1)
    older = {"format": CHECKPOINT_FORMAT - 1, "progress": {"step": 3}}
    callbacks = TrainingCallbacks(load_checkpoint=lambda: older)
    _, result = train_tiny(tiny_base_model, config, callbacks=callbacks)
    assert result.resumed_from_step is None and result.steps_this_run == result.optimizer_steps


def test_training_reports_progress_and_validations_through_its_callbacks(
    tmp_path, tiny_base_model, restore_threads
):
    config = tiny_config(tmp_path, tiny_base_model, epochs=2, evals_per_epoch=2)
    moments, validations = [], []
    callbacks = TrainingCallbacks(
        on_progress=lambda p: moments.append((p.moment, p.epoch, p.batches_done, p.step)),
        on_validation=lambda report: validations.append((report.log.step, report.best)),
    )
    _, result = train_tiny(tiny_base_model, config, callbacks=callbacks)
    # 36 examples in batches of 8: 5 steps an epoch, validated after the 3rd and the 5th.
    epoch_1 = [("start", 1, 0, 0), *[("step", 1, n, n) for n in range(1, 6)], ("end", 1, 5, 5)]
    epoch_2 = [("start", 2, 0, 5), *[("step", 2, n, 5 + n) for n in range(1, 6)]]
    assert moments == [*epoch_1, *epoch_2, ("end", 2, 5, 10)]
    assert (
        [step for step, _ in validations] == [log.step for log in result.history] == [3, 5, 8, 10]
    )
    assert [step for step, best in validations if best][-1] == result.best_step


def test_peak_memory_on_the_cpu_is_the_peak_rss():
    value, measured = peak_memory(torch.device("cpu"))
    assert measured == "cpu peak RSS"
    assert value == pytest.approx(
        resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, rel=0.05
    )


# --- config ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("train", "message"),
    [
        ({"processes": 0}, "train.processes"),
        ({"processes": "many"}, "train.processes"),
        ({"processes": 1.5}, "train.processes"),
        ({"freeze_embeddings": "yes"}, "train.freeze_embeddings"),
        ({"head_learning_rate_multiplier": 0}, "train.head_learning_rate_multiplier"),
        ({"layer_learning_rate_decay": 0}, "train.layer_learning_rate_decay"),
        ({"layer_learning_rate_decay": 1.2}, "train.layer_learning_rate_decay"),
        ({"label_smoothing": 1.0}, "train.label_smoothing"),
        ({"label_smoothing": -0.1}, "train.label_smoothing"),
        ({"evals_per_epoch": 0}, "train.evals_per_epoch"),
        ({"early_stopping_patience": -1}, "train.early_stopping_patience"),
        ({"checkpoint_every_steps": -5}, "train.checkpoint_every_steps"),
        ({"checkpoint_every_steps": "often"}, "train.checkpoint_every_steps"),
        ({"checkpoint_dir": None}, "train.checkpoint_dir"),
        ({"evals_per_epoch_typo": 2}, "train.evals_per_epoch_typo: unknown key"),
    ],
)
def test_bad_training_params_name_the_key(train, message):
    with pytest.raises(ConfigError, match=message.replace(".", r"\.")):
        make_params({"train": train})


@pytest.mark.parametrize(
    "train",
    [
        {"processes": "auto", "early_stopping_patience": None, "checkpoint_every_steps": None},
        {"processes": 4, "early_stopping_patience": 0, "checkpoint_every_steps": 0},
    ],
)
def test_good_training_params_are_accepted(train):
    config = make_params({"train": train}).train
    assert config.processes == train["processes"]
