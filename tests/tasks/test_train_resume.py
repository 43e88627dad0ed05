"""A real train stage killed with SIGKILL once a checkpoint exists resumes where it was.

The rerun must start from the checkpoint (not from the base model), take only the remaining
optimizer steps, end with as many steps and the same weights as an uninterrupted run, and
delete its checkpoints once the model is saved.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import torch
import yaml
from safetensors.torch import load_file

from tasks import prepare, train
from tests.conftest import make_rows, write_csv
from tests.helpers import REPO_ROOT, make_params, merge, tiny_overrides

CHECKPOINT_WAIT_S = 120.0


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
    result = json.loads((params.train.output_dir / "model" / "training.json").read_text())
    result = result["result"]
    resumed_from = result["resumed_from_step"]
    assert f"resuming from step {resumed_from} " in second.stdout
    assert 0 < resumed_from < total_steps
    assert resumed_from % 5 == 0 or resumed_from % steps_per_epoch == 0  # a checkpoint's step
    assert result["steps_this_run"] == total_steps - resumed_from < total_steps
    assert result["optimizer_steps"] == total_steps
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
