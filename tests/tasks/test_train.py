"""The train stage on tiny files in a temporary folder: seeded, in one or two processes
(torchrun), resumed after a kill; and a stage's clear error on a missing params file."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file
from transformers import AutoConfig, AutoTokenizer, BertModel

from tasks import prepare, train
from tasks.common import stage_main
from tests.conftest import make_rows, write_csv
from tests.helpers import REPO_ROOT, make_params, merge, tiny_overrides
from textgate.artifacts import train_outputs
from textgate.config import Params


@pytest.mark.slow  # trains twice
def test_training_is_seeded(params):
    prepare.run(params)
    weights = params.train.output_dir / "model" / "model.safetensors"
    # What dvc.lock hashes: a rerun must give the same bytes, or a fresh clone's first run
    # rewrites dvc.lock (timings and memory go to run.json, which DVC does not track).
    hashed = [params.train.output_dir / "metrics.json", params.train.output_dir / "model"]
    torch.manual_seed(1)  # whatever the global state before a run, the result is the same
    first = train.run(params)
    first_weights = load_file(weights)
    first_bytes = _file_bytes(hashed)
    torch.manual_seed(2)
    second = train.run(params)
    second_weights = load_file(weights)
    assert _file_bytes(hashed) == first_bytes
    assert train_outputs(params).run.is_file()
    assert first["val_macro_f1"] == second["val_macro_f1"]
    assert first_weights.keys() == second_weights.keys()
    for name, tensor in first_weights.items():
        assert torch.equal(tensor, second_weights[name]), name


def _file_bytes(paths: list[Path]) -> dict[str, bytes]:
    files = [f for p in paths for f in (sorted(p.rglob("*")) if p.is_dir() else [p])]
    return {str(f): f.read_bytes() for f in files if f.is_file()}


def test_stage_reports_missing_prepared_data_clearly(params, capsys):
    code = stage_main("train", train.run, ["--params", "/nonexistent/params.yaml"])
    assert code == 2
    assert "params file not found: /nonexistent/params.yaml" in capsys.readouterr().err


@pytest.fixture
def no_dropout_model(tmp_path, tiny_base_model) -> Path:
    """The tiny BERT without dropout: one process and two then see the same computation."""
    config = AutoConfig.from_pretrained(tiny_base_model)
    config.hidden_dropout_prob = config.attention_probs_dropout_prob = 0.0
    out = tmp_path / "no-dropout"
    BertModel.from_pretrained(tiny_base_model, config=config).save_pretrained(out)
    AutoTokenizer.from_pretrained(tiny_base_model).save_pretrained(out)
    return out


def stage_params(work: Path, base_model: Path, **train_overrides) -> Params:
    overrides = merge(
        tiny_overrides(work, base_model),
        {"train": {"quantize": "off", "evals_per_epoch": 1, **train_overrides}},
    )
    return make_params(overrides)


def write_params(params: Params, path: Path) -> Path:
    path.write_text(yaml.safe_dump(params.model_dump(mode="json", by_alias=True)))
    return path


def run_stage(params_file: Path, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    return subprocess.run(
        [sys.executable, "-m", "tasks.train", "--params", str(params_file)],
        cwd=REPO_ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


# The train stage in two processes (torchrun, gloo on the CPU) against one process.
#
# Each process takes a share of every global batch, so both runs take the same optimizer steps
# over the same data; without dropout they also end with the same weights, up to the order of
# floating-point sums. Only rank 0 writes files.
@pytest.mark.slow  # starts torchrun
def test_two_processes_train_like_one(tmp_path, no_dropout_model):
    # 27 training examples in global batches of 13: 3 steps an epoch, and the last batch of
    # one example leaves the second process nothing (it runs one example with weight 0).
    rows = make_rows(per_class=15)
    write_csv(tmp_path / "raw" / "train.csv", rows)
    two = stage_params(tmp_path, no_dropout_model, processes=2, batch_size=13, epochs=2)
    two.validate_.output_dir.mkdir(parents=True)
    labels = sorted({label for _, label in rows})
    (two.validate_.output_dir / "report.json").write_text(json.dumps({"labels": labels}))
    assert prepare.run(two)["train"] == 27
    one = make_params(
        merge(
            json.loads(two.model_dump_json(by_alias=True)),
            {"train": {"processes": 1, "output_dir": str(tmp_path / "train-one")}},
        )
    )

    completed = run_stage(write_params(two, tmp_path / "params.yaml"))
    assert completed.returncode == 0, completed.stdout[-3000:] + completed.stderr[-3000:]
    single = train.run(one)

    out = two.train.output_dir
    assert sorted(p.name for p in out.iterdir()) == ["metrics.json", "model", "run.json"]
    assert sorted(p.name for p in (out / "model").iterdir()) == sorted(
        p.name for p in (one.train.output_dir / "model").iterdir()
    )
    assert not list(two.train.checkpoint_dir.glob("*")), "checkpoints left behind"
    # Rank 0 alone reports: one line per validation, one "train:" header.
    assert completed.stdout.count("train: 27 examples") == 1
    assert completed.stdout.count("(epoch 1)") == 1 and completed.stdout.count("(epoch 2)") == 1

    result = json.loads((out / "model" / "training.json").read_text())["result"]
    reference = json.loads((one.train.output_dir / "model" / "training.json").read_text())
    reference = reference["result"]
    assert result["processes"] == 2 and reference["processes"] == 1
    run = json.loads(train_outputs(two).run.read_text())
    assert run["threads"] == max(1, len(os.sched_getaffinity(0)) // 2)
    assert result["optimizer_steps"] == reference["optimizer_steps"] == 2 * 3
    assert [log["step"] for log in result["history"]] == [3, 6]
    assert [log["step"] for log in reference["history"]] == [3, 6]
    for mine, theirs in zip(result["history"], reference["history"], strict=True):
        assert mine["train_loss"] == pytest.approx(theirs["train_loss"], rel=1e-4)
        assert mine["val_macro_f1"] == pytest.approx(theirs["val_macro_f1"], abs=1e-6)
    metrics = json.loads((out / "metrics.json").read_text())
    assert 0 <= metrics["val_accuracy"] <= 1 and metrics["optimizer_steps"] == 6
    assert metrics["val_macro_f1"] == pytest.approx(single["val_macro_f1"], abs=1e-6)
    assert run["peak_memory_mb"] > 0

    two_weights = load_file(out / "model" / "model.safetensors")
    one_weights = load_file(one.train.output_dir / "model" / "model.safetensors")
    assert two_weights.keys() == one_weights.keys()
    for name, tensor in one_weights.items():
        torch.testing.assert_close(two_weights[name], tensor, rtol=1e-4, atol=1e-5, msg=name)


CHECKPOINT_WAIT_S = 120.0


# A real train stage killed with SIGKILL once a checkpoint exists resumes where it was.
#
# The rerun must start from the checkpoint (not from the base model), take only the remaining
# optimizer steps, end with as many steps and the same weights as an uninterrupted run, and
# delete its checkpoints once the model is saved.
@pytest.mark.slow  # trains, in a subprocess and in this one
def test_killed_training_resumes_from_its_last_checkpoint(tmp_path, tiny_base_model):
    rows = make_rows(per_class=40)
    write_csv(tmp_path / "raw" / "train.csv", rows)
    overrides = {
        "train": {
            "quantize": "off",
            "batch_size": 4,
            "epochs": 3,
            "evals_per_epoch": 1,
            "early_stopping_patience": 0,  # every run takes all its steps
            "checkpoint_every_steps": 5,
        }
    }
    params = make_params(merge(tiny_overrides(tmp_path, tiny_base_model), overrides))
    params.validate_.output_dir.mkdir(parents=True)
    labels = sorted({label for _, label in rows})
    (params.validate_.output_dir / "report.json").write_text(json.dumps({"labels": labels}))
    n_train = prepare.run(params)["train"]
    steps_per_epoch = -(-n_train // 4)
    total_steps = steps_per_epoch * 3
    params_file = tmp_path / "params.yaml"
    params_file.write_text(yaml.safe_dump(params.model_dump(mode="json", by_alias=True)))
    command = [sys.executable, "-m", "tasks.train", "--params", str(params_file)]
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}

    first = subprocess.Popen(
        command, cwd=REPO_ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    deadline = time.monotonic() + CHECKPOINT_WAIT_S
    try:
        while not list(params.train.checkpoint_dir.glob("*/last.pt")):
            assert first.poll() is None, "training ended before its first checkpoint"
            assert time.monotonic() < deadline, "no checkpoint appeared"
            time.sleep(0.02)
        first.send_signal(signal.SIGKILL)
    finally:
        first.kill()
        first.wait()
    assert first.returncode == -signal.SIGKILL
    assert not (params.train.output_dir / "model").exists()

    second = subprocess.run(
        command, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=300
    )
    assert second.returncode == 0, second.stdout[-3000:] + second.stderr[-3000:]
    result = json.loads(train_outputs(params).run.read_text())
    resumed_from = result["resumed_from_step"]
    assert f"resuming from step {resumed_from} " in second.stdout
    assert 0 < resumed_from < total_steps
    assert resumed_from % 5 == 0 or resumed_from % steps_per_epoch == 0  # a checkpoint's step
    assert result["steps_this_run"] == total_steps - resumed_from < total_steps
    training = json.loads((params.train.output_dir / "model" / "training.json").read_text())
    assert training["result"]["optimizer_steps"] == total_steps
    assert not list(params.train.checkpoint_dir.glob("*/*")), "checkpoints left behind"

    # The same run without interruption, in this process, ends with the same weights.
    uninterrupted = make_params(
        merge(
            json.loads(params.model_dump_json(by_alias=True)),
            {"train": {"output_dir": str(tmp_path / "uninterrupted")}},
        )
    )
    metrics = train.run(uninterrupted)
    assert metrics["optimizer_steps"] == total_steps
    resumed_weights = load_file(params.train.output_dir / "model" / "model.safetensors")
    reference = load_file(Path(uninterrupted.train.output_dir) / "model" / "model.safetensors")
    for name, tensor in reference.items():
        torch.testing.assert_close(resumed_weights[name], tensor, msg=name)
