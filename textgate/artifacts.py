"""Each stage's output files: where they are (from params) and what they hold.

The one place that spells a stage's file names and the keys other modules read from them.
JSON is written as the stage built it (dvc.lock hashes the bytes): a `write_*` helper checks
the payload against its model, then writes the payload itself through textgate.io.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any, TypeVar

from pydantic import BaseModel, ConfigDict, Field, RootModel, ValidationError

from textgate.config import Params, RegistryConfig
from textgate.errors import DataError
from textgate.io import read_json, write_json

# Files inside a saved model directory (textgate.model writes them).
LABEL_MAP_FILE = "label_map.json"
TRAINING_FILE = "training.json"
SPLITS = ("train", "val", "test")
# train's record of this run's timings and memory: beside metrics.json, but no DVC output.
RUN_FILE = "run.json"


class _Artifact(BaseModel):
    """A stage output's content: the fields other code reads; more keys may follow."""

    model_config = ConfigDict(extra="allow")


class ReportCheck(_Artifact):
    name: str
    success: bool
    summary: str


class ValidationReport(_Artifact):
    """validate's report.json."""

    success: bool
    n_rows: int
    labels: list[str]
    label_source: str
    checks: list[ReportCheck]
    repairs: dict[str, int] = {}


class ValidatedLabels(_Artifact):
    """The part of validate's report.json that prepare reads: the label set."""

    labels: list[str]


class LabelMap(_Artifact):
    """prepare's label_map.json (and the model directory's)."""

    labels: list[str]


class PrepareStats(_Artifact):
    """prepare's stats.json: split sizes and the cleaning statistics of each input file."""

    splits: dict[str, int]
    train_file: dict[str, Any]


class TrainMetrics(_Artifact):
    """train's metrics.json (DVC metrics)."""

    val_accuracy: float
    val_macro_f1: float
    temperature: float


class EvaluateMetrics(_Artifact):
    """evaluate's metrics.json (DVC metrics); runtime-dependent extras follow the fields."""

    accuracy: float
    macro_f1: float
    n_test: int
    ece: float | None
    ece_uncalibrated: float | None
    temperature: float
    behaviour: dict[str, float | None]


class ClassScores(_Artifact):
    precision: float
    recall: float
    f1: float
    support: int


class PerClass(RootModel[dict[str, ClassScores]]):
    """evaluate's per_class.json: the scores of each label."""


class Behaviour(_Artifact):
    """evaluate's behaviour.json: each invariance test, and the must-pass cases."""

    invariance: dict[str, dict[str, Any]]
    must_pass: dict[str, Any]


# --- the serving request log (bentos/service.py writes it, the drift monitor reads it) ------

REQUEST_LOG_FILE = "requests.jsonl"


class RequestRecord(BaseModel):
    """One line of the request log (fields added later are ignored)."""

    model_config = ConfigDict(frozen=True, extra="ignore", strict=True)

    ts: str
    request_id: str
    model_tag: str
    text: str
    label: str
    best_label: str = Field(min_length=1)
    score: float = Field(ge=0, le=1)
    abstained: bool
    # Top-1 minus top-2 probability (logged since the labelling loop; None in older lines).
    margin: float | None = Field(default=None, ge=0, le=1)
    # The bento that answered (its X-Textgate-Model header); "" in lines written before it was.
    bento_tag: str = ""


def request_record(
    *,
    ts: str,
    request_id: str | None,
    model_tag: str,
    text: str,
    label: str,
    best_label: str,
    score: float,
    abstained: bool,
    margin: float | None = None,
    bento_tag: str = "",
) -> dict[str, Any]:
    """A request log line's JSON object, with `RequestRecord`'s fields in its order.

    Built as a plain dict: the service never fails a request over its log line.
    """
    return {
        "ts": ts,
        "request_id": request_id,
        "model_tag": model_tag,
        "text": text,
        "label": label,
        "best_label": best_label,
        "score": score,
        "abstained": abstained,
        "margin": margin,
        "bento_tag": bento_tag,
    }


def default_request_log(bentoml_home: Path) -> Path:
    """Where the service writes its request log when no path is configured."""
    return bentoml_home / "textgate" / REQUEST_LOG_FILE


# --- where each stage writes ---------------------------------------------------------------


@dataclass(frozen=True)
class ValidateOutputs:
    report: Path
    page: Path


@dataclass(frozen=True)
class PrepareOutputs:
    directory: Path
    label_map: Path
    stats: Path

    def split(self, name: str) -> Path:
        """The Parquet file of split `name` (train, val or test)."""
        if name not in SPLITS:
            raise ValueError(f"unknown split {name!r}; one of {SPLITS}")
        return self.directory / f"{name}.parquet"


@dataclass(frozen=True)
class TrainOutputs:
    model_dir: Path
    metrics: Path
    run: Path


@dataclass(frozen=True)
class EvaluateOutputs:
    metrics: Path
    per_class: Path
    predictions: Path
    behaviour: Path
    golden: Path
    confusion_csv: Path
    confusion_png: Path


@dataclass(frozen=True)
class VerdictOutputs:
    """The gate's verdict files: one per run, and the newest again as `latest.json`."""

    directory: Path

    @property
    def latest(self) -> Path:
        return self.directory / "latest.json"

    def of_run(self, created_at: datetime) -> Path:
        """The file of the verdict decided at `created_at` (UTC)."""
        return self.directory / f"{created_at.strftime('%Y%m%dT%H%M%S%fZ')}.json"


def validate_outputs(params: Params) -> ValidateOutputs:
    out = params.validate_.output_dir
    return ValidateOutputs(report=out / "report.json", page=out / "report.html")


def prepare_outputs(params: Params) -> PrepareOutputs:
    out = params.prepare.output_dir
    return PrepareOutputs(directory=out, label_map=out / LABEL_MAP_FILE, stats=out / "stats.json")


def train_outputs(params: Params) -> TrainOutputs:
    out = params.train.output_dir
    return TrainOutputs(model_dir=out / "model", metrics=out / "metrics.json", run=out / RUN_FILE)


def evaluate_outputs(params: Params) -> EvaluateOutputs:
    out = params.evaluate.output_dir
    return EvaluateOutputs(
        metrics=out / "metrics.json",
        per_class=out / "per_class.json",
        predictions=out / "predictions.parquet",
        behaviour=out / "behaviour.json",
        golden=out / "golden.json",
        confusion_csv=out / "confusion.csv",
        confusion_png=out / "confusion.png",
    )


def verdict_outputs(registry: RegistryConfig) -> VerdictOutputs:
    """`registry.verdicts_dir`, or `verdicts/` next to the registry file when it is null."""
    return VerdictOutputs(registry.verdicts_dir or registry.path.parent / "verdicts")


# --- reading and writing --------------------------------------------------------------------

Model = TypeVar("Model", bound=BaseModel)


def _checked(model: type[Model], payload: Any, path: Path) -> Model:
    try:
        return model.model_validate(payload)
    except ValidationError as error:
        problems = "; ".join(
            f"{'.'.join(str(part) for part in issue['loc']) or '(top level)'}: {issue['msg']}"
            for issue in error.errors()
        )
        raise DataError(f"{path} is not a valid {model.__name__}: {problems}") from None


def read_artifact(model: type[Model], path: Path) -> Model:
    """Read `path` as `model`; DataError naming the file and each bad field."""
    return _checked(model, read_json(path), Path(path))


def read_payload(model: type[BaseModel], path: Path) -> Any:
    """Read `path`, check it against `model`, and return the JSON as written (e.g. to store it)."""
    payload = read_json(path)
    _checked(model, payload, Path(path))
    return payload


def write_artifact(model: type[BaseModel], path: Path, payload: Any) -> None:
    """Check `payload` against `model`, then write it unchanged (atomically)."""
    _checked(model, payload, Path(path))
    write_json(path, payload)


def write_verdict(outputs: VerdictOutputs, created_at: datetime, payload: dict[str, Any]) -> Path:
    """Write a run's verdict file and `latest.json`; returns the latter."""
    write_json(outputs.of_run(created_at), payload)
    write_json(outputs.latest, payload)
    return outputs.latest
