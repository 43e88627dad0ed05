"""Package: save a trained model directory into the BentoML model store and build its bento.

The bento is pinned to the exact model saved here (the bento argument `model_tag`), so it
keeps serving that model after newer ones are saved, and to its runtime (the argument
`runtime`: the CPU bento, bentos/bentofile.yaml, serves the ONNX export without torch;
bentos/bentofile.torch.yaml serves with PyTorch; `package.runtime` picks); the service's
settings from params (`textgate.config.ServiceSettings`) are recorded in it as bento
arguments too. The stores
are BentoML's own, under `BENTOML_HOME` (default `~/bentoml`).
"""

from __future__ import annotations

import json
import math
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import bentoml
from bentoml.exceptions import BentoMLException, NotFound

from textgate.artifacts import (
    LABEL_MAP_FILE,
    TRAINING_FILE,
    EvaluateMetrics,
    LabelMap,
    evaluate_outputs,
    read_artifact,
    read_payload,
    train_outputs,
)
from textgate.config import Params, ServiceSettings
from textgate.errors import TextgateError
from textgate.io import read_json
from textgate.runtime import onnx_file

# The build context: the service's import path and the bentofile's `include` patterns are
# relative to it, and a relative `package.bentofile` is resolved against it.
REPO_ROOT = Path(__file__).resolve().parents[1]
PROJECT = "textgate"


class PackageError(TextgateError):
    """The model could not be saved to the BentoML store, or its bento could not be built."""


@dataclass(frozen=True)
class PackageResult:
    """What `package_model` produced: exact tags (`name:version`), never `latest`."""

    model_tag: str
    bento_tag: str


def package_model(
    model_dir: str | Path,
    *,
    params: Params,
    metrics: dict[str, Any],
    lineage: dict[str, Any],
    build_ctx: Path = REPO_ROOT,
) -> PackageResult:
    """Save `model_dir` as a BentoML model, then build the bento that serves exactly it.

    Args:
        model_dir: a complete textgate model directory (see textgate.model).
        params: `package.model_name` names the model; `package.runtime` picks the build file
            (`serving_runtime`).
        metrics: evaluation metrics, stored in the model's metadata.
        lineage: where the model came from (data hashes, commit, run ids), also metadata.
        build_ctx: the project the bento's code comes from; a relative bentofile is under it.

    Raises:
        PackageError: the directory is not a model, or saving or building failed; then the
            model store holds no model from this call.
    """
    model_dir = Path(model_dir)
    for name in (LABEL_MAP_FILE, TRAINING_FILE):
        if not (model_dir / name).is_file():
            raise PackageError(f"{model_dir} is not a textgate model directory (no {name})")
    runtime, bentofile = serving_runtime(model_dir, params, build_ctx)

    model_tag = _save_model(model_dir, params.package.model_name, metrics, lineage)
    try:
        bento = bentoml.bentos.build_bentofile(
            str(bentofile),
            build_ctx=str(build_ctx),
            labels={"project": PROJECT, "model": model_tag, "runtime": runtime},
            # The service's settings from params (a bento carries no params.yaml).
            args={
                "model_tag": model_tag,
                "runtime": runtime,
                **ServiceSettings.from_params(params).model_dump(),
            },
            # The service module reads the model tag when imported: re-import it so a second
            # package in the same process does not reuse the previous model's tag.
            reload=True,
        )
    except BaseException as error:  # also on Ctrl-C: never keep a model without its bento
        _discard_model(model_tag, error)
        if isinstance(error, (BentoMLException, ValueError, OSError)):
            raise PackageError(f"building the bento from {bentofile} failed: {error}") from error
        raise
    return PackageResult(model_tag=model_tag, bento_tag=str(bento.tag))


def local_bento(tag: str) -> bentoml.Bento:
    """The bento `tag` in the local BentoML store, its version matched exactly.

    `bentoml.bentos.get` takes a version prefix ("textgate:a" is any version starting with
    "a", and several such are an error); a production pointer names one bento, so only that
    version answers.

    Raises:
        NotFound: no bento with exactly this tag is in the store.
        ValueError: `tag` is not a valid bento tag.
    """
    wanted = bentoml.Tag.from_taglike(tag)
    try:
        bento = bentoml.bentos.get(tag)
    except BentoMLException as error:  # none, or several versions start with this one
        raise NotFound(f"no bento {tag} in the store ({error})") from None
    if wanted.version not in (None, "latest") and str(bento.tag) != str(wanted):
        raise NotFound(f"no bento {tag} in the store (only {bento.tag})")
    return bento


def serving_runtime(model_dir: Path, params: Params, build_ctx: Path) -> tuple[str, Path]:
    """The runtime the bento serves with ("onnx" or "torch") and the bentofile that builds it.

    `package.runtime`: onnx builds `package.bentofile` (ONNX Runtime, no torch: the model
    needs its ONNX export), torch builds `package.torch_bentofile`, auto is onnx when the model
    has an ONNX export and torch otherwise.

    Raises:
        PackageError: onnx is asked for a model without an ONNX export, or the bentofile is
            missing.
    """
    exported = onnx_file(model_dir) is not None
    runtime = params.package.runtime
    if runtime == "auto":
        runtime = "onnx" if exported else "torch"
    if runtime == "onnx" and not exported:
        raise PackageError(
            f"package.runtime is onnx but {model_dir} has no ONNX export: train with "
            "train.quantize: int8, or set package.runtime: torch (or auto)"
        )
    key = "bentofile" if runtime == "onnx" else "torch_bentofile"
    bentofile = getattr(params.package, key)
    if not bentofile.is_absolute():
        bentofile = build_ctx / bentofile
    if not bentofile.is_file():
        raise PackageError(f"package.{key}: {bentofile} not found")
    return runtime, bentofile


def package_candidate(root: Path, params: Params, lineage: dict[str, Any]) -> PackageResult:
    """Package the pipeline's trained model with its evaluation metrics and lineage."""
    return package_model(
        train_outputs(params).model_dir,
        params=params,
        metrics=read_payload(EvaluateMetrics, evaluate_outputs(params).metrics),
        lineage=lineage,
        build_ctx=root,
    )


def metadata_for_bentoml(metadata: dict[str, Any]) -> dict[str, Any]:
    """The JSON view of `metadata` in the types BentoML accepts: it has no null.

    Values become what JSON would store (paths and other objects become strings); then
    null values are left out of mappings, and nulls inside lists become NaN. The exact
    JSON stays in the model directory (training.json) and in the registry release.
    """

    def convert(value: Any) -> Any:
        if isinstance(value, dict):
            return {key: convert(item) for key, item in value.items() if item is not None}
        if isinstance(value, list):
            return [math.nan if item is None else convert(item) for item in value]
        return value

    return convert(json.loads(json.dumps(metadata, default=str)))


def _discard_model(model_tag: str, cause: BaseException) -> None:
    """Delete a model saved by this call; if that fails too, say so on the original error."""
    try:
        bentoml.models.delete(model_tag)
    except (BentoMLException, OSError) as error:
        cause.add_note(f"could not delete {model_tag} from the model store either: {error}")


def _save_model(
    model_dir: Path, model_name: str, metrics: dict[str, Any], lineage: dict[str, Any]
) -> str:
    """Copy the model directory into a new version of `model_name`; return its exact tag."""
    sections = {
        "labels": read_artifact(LabelMap, model_dir / LABEL_MAP_FILE).labels,
        "training": read_json(model_dir / TRAINING_FILE),
        "metrics": metrics,
        "lineage": lineage,
    }
    staging: Path | None = None
    try:
        metadata = metadata_for_bentoml(sections)
        # The context manager saves to the store only if the block succeeds.
        with bentoml.models.create(
            name=model_name, labels={"project": PROJECT}, metadata=metadata
        ) as model:
            staging = Path(model.path)
            shutil.copytree(model_dir, staging, dirs_exist_ok=True)
            model_tag = str(model.tag)
    except (BentoMLException, ValueError, OSError) as error:
        raise PackageError(
            f"saving {model_dir} as BentoML model {model_name!r} failed: {error}"
        ) from error
    finally:
        # BentoML stages the files in a temporary directory and copies it into the store,
        # leaving the staging copy behind; remove it (it can be as large as the weights).
        if staging is not None:
            shutil.rmtree(staging, ignore_errors=True)
    return model_tag
