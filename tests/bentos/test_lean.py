"""CPU serving imports neither torch nor transformers; the CPU bento does not carry them."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tests.helpers import REPO_ROOT
from textgate.config import load_params

pytestmark = pytest.mark.slow  # a fresh interpreter imports bentoml; packaging builds bentos

# What the CPU path must never import (scipy and pandas only the pipeline's stages use).
HEAVY = ("torch", "transformers", "scipy", "pandas")

# Runs in a fresh interpreter: the service from source, one classify and one explain.
SERVE_IN_PROCESS = f"""
import json, sys
import bentos.service as service
from threadpoolctl import threadpool_info
instance = service.TextgateService()
answers = instance.classify(["I lost my card yesterday", "please refund my order"])
explained = instance.explain("my wallet was stolen")
print(json.dumps({{
    "runtime": instance.classifier.runtime,
    "answers": [answer.model_dump() for answer in answers],
    "tokens": explained.tokens,
    "loaded": sorted(name for name in sys.modules if name.split(".")[0] in {HEAVY!r}),
    "blas_threads": [pool["num_threads"] for pool in threadpool_info()
                     if pool["user_api"] == "blas"],
}}))
"""


def test_cpu_serving_imports_no_torch_nor_transformers(
    bentoml_home: Path, abstaining_model_dir: Path, tmp_path: Path
) -> None:
    from tasks.package import _save_model
    from textgate.model import TextClassifier

    model_tag = _save_model(abstaining_model_dir, "lean-import-test", {}, {})
    env = {
        **os.environ,
        "PYTHONPATH": str(REPO_ROOT),
        "BENTOML_HOME": str(bentoml_home),
        "TEXTGATE_MODEL_TAG": model_tag,
        "TEXTGATE_RUNTIME": "onnx",
        "TEXTGATE_THREADS": "1",
        "TEXTGATE_REQUEST_LOG": str(tmp_path / "requests.jsonl"),
    }
    done = subprocess.run(
        [sys.executable, "-c", SERVE_IN_PROCESS],
        env=env,
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["runtime"] == "onnx-int8"
    assert result["loaded"] == [], f"CPU serving imported {result['loaded']}"
    # numpy's BLAS gets the worker's compute threads (TEXTGATE_THREADS), not one per core.
    assert result["blas_threads"] and set(result["blas_threads"]) == {1}
    # The answers are the model's (it abstains on every text: see abstaining_model_dir).
    assert [answer["label"] for answer in result["answers"]] == ["unknown", "unknown"]
    reference = TextClassifier(abstaining_model_dir).explain("my wallet was stolen")
    assert result["tokens"] == reference.tokens
    assert len((tmp_path / "requests.jsonl").read_text(encoding="utf-8").splitlines()) == 2


def _requirements(bento_tag: str) -> list[str]:
    import bentoml

    bento = bentoml.bentos.get(bento_tag)
    path = Path(bento.path) / "env" / "python" / "requirements.txt"
    return [line.strip() for line in path.read_text(encoding="utf-8").splitlines()]


def _names(requirements: list[str]) -> set[str]:
    return {re.split(r"[<>=!~ \[;]", line, maxsplit=1)[0].lower() for line in requirements if line}


def test_packaging_picks_the_cpu_bento_for_an_onnx_model_and_torch_otherwise(
    bentoml_home: Path, abstaining_model_dir: Path, tiny_model_dir: Path
) -> None:
    import bentoml

    from tasks.package import package_model

    params = load_params(REPO_ROOT / "params.yaml")
    assert params.package.runtime == "auto"
    lean = package_model(abstaining_model_dir, params=params, metrics={}, lineage={})
    full = package_model(tiny_model_dir, params=params, metrics={}, lineage={})
    assert bentoml.bentos.get(lean.bento_tag).info.args["runtime"] == "onnx"
    assert bentoml.bentos.get(full.bento_tag).info.args["runtime"] == "torch"
    lean_packages, full_packages = (_names(_requirements(r.bento_tag)) for r in (lean, full))
    assert {"onnxruntime", "tokenizers", "numpy"} <= lean_packages
    assert not set(HEAVY) & lean_packages
    assert {"torch", "transformers"} <= full_packages
    files = {p.name for p in (Path(bentoml.bentos.get(lean.bento_tag).path) / "src").rglob("*")}
    assert "model.py" not in files and "inference.py" in files


def test_onnx_packaging_of_a_model_without_an_export_names_the_params(
    tiny_model_dir: Path,
) -> None:
    from tasks.package import PackageError, serving_runtime

    params = load_params(REPO_ROOT / "params.yaml")
    params = params.model_copy(
        update={"package": params.package.model_copy(update={"runtime": "onnx"})}
    )
    with pytest.raises(PackageError, match="no ONNX export.*train.quantize.*package.runtime"):
        serving_runtime(tiny_model_dir, params, REPO_ROOT)


def test_the_torch_bentofile_is_the_cpu_one_plus_torch() -> None:
    lean = yaml.safe_load((REPO_ROOT / "bentos" / "bentofile.yaml").read_text())
    full = yaml.safe_load((REPO_ROOT / "bentos" / "bentofile.torch.yaml").read_text())
    assert set(lean["include"]) | {"textgate/model.py"} == set(full["include"])
    assert {"torch", "transformers"} <= _names(full["python"]["packages"])
    assert not set(HEAVY) & _names(lean["python"]["packages"])
