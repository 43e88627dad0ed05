"""Typed mirror of params.yaml: frozen models that reject unknown keys and wrong types."""

from __future__ import annotations

import re
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Literal
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from textgate.errors import ConfigError

API_KEY_ENV = "TEXTGATE_API_KEY"  # the served API's key; unset or empty: no authentication


def api_key_from_env(environ: Mapping[str, str]) -> str | None:
    """The API key in `environ` without surrounding whitespace; None when unset or empty.

    Raises:
        ConfigError: set to whitespace only, which would silently turn authentication off.
    """
    raw = environ.get(API_KEY_ENV, "")
    if raw and not raw.strip():
        raise ConfigError(
            f"{API_KEY_ENV} is set but blank (whitespace only): set a real key, or unset it "
            "(or set it empty) to serve without authentication"
        )
    return raw.strip() or None


# Where every command looks for the params when not told otherwise (relative: the workspace's).
PARAMS_FILE = "params.yaml"

# YAML gives strings for paths; everything else must have the right type as written.
FilePath = Annotated[Path, Field(strict=False)]
Rate = Annotated[float, Field(ge=0, le=1)]


class _Section(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid", strict=True)


class DataConfig(_Section):
    raw_dir: FilePath
    # One file, or several files and glob patterns (inside raw_dir), read as one table:
    # labelled batches (`textgate label import`) accumulate under raw_dir/batches/.
    train_file: str | list[str]
    test_file: str | None
    text_column: str = Field(min_length=1)
    label_column: str = Field(min_length=1)
    labels: list[str] | None
    encoding: str | None = Field(min_length=1)  # CSV/TSV/JSON text encoding; None = detected
    # Labels as written in the files -> the label they mean (variants by case or whitespace).
    label_aliases: dict[str, str]
    on_duplicates: Literal["fail", "drop"]  # exact duplicate train rows
    on_test_overlap: Literal["fail", "drop"]  # train rows whose text is in the test file

    @model_validator(mode="after")
    def _aliases_name_declared_labels(self) -> DataConfig:
        if self.labels is not None:
            unknown = sorted(set(self.label_aliases.values()) - set(self.labels))
            if unknown:
                raise ValueError(
                    f"label_aliases maps to {unknown}, not in data.labels: map each variant to "
                    "a declared label"
                )
        return self

    # The label of out-of-scope examples (e.g. CLINC150's `oos`); its served answer is
    # "unknown" (abstained), as an abstention's. None: the data has none.
    out_of_scope_label: str | None = Field(min_length=1)

    @model_validator(mode="after")
    def _text_and_label_are_different_columns(self) -> DataConfig:
        if self.text_column == self.label_column:
            raise ValueError(
                f"text_column and label_column are both {self.text_column!r}: the labels would "
                "be the texts themselves; name the column that holds the labels"
            )
        return self

    @model_validator(mode="after")
    def _train_files_named(self) -> DataConfig:
        patterns = self.train_patterns
        if not patterns or any(not p.strip() for p in patterns):
            raise ValueError("train_file must name at least one file (or glob pattern)")
        return self

    @property
    def train_patterns(self) -> list[str]:
        """`train_file` as a list: one file, or files and glob patterns."""
        return [self.train_file] if isinstance(self.train_file, str) else list(self.train_file)

    @property
    def train_path(self) -> Path:
        """The first training file (the one `train_file` names when it is a single file)."""
        return self.raw_dir / self.train_patterns[0]

    def train_paths(self) -> list[Path]:
        """Every training file, in order: plain names as given (missing ones too, so that
        reading them fails naming them), each glob's matches sorted (a glob may match none).
        """
        paths: list[Path] = []
        for pattern in self.train_patterns:
            if any(char in pattern for char in "*?["):
                paths += sorted(p for p in self.raw_dir.glob(pattern) if p.is_file())
            else:
                paths.append(self.raw_dir / pattern)
        return list(dict.fromkeys(paths))

    @property
    def test_path(self) -> Path | None:
        return None if self.test_file is None else self.raw_dir / self.test_file


class ValidateConfig(_Section):
    output_dir: FilePath
    min_text_chars: int = Field(ge=1)
    max_text_chars: int = Field(ge=1)
    min_examples_per_class: int = Field(ge=1)
    max_duplicate_fraction: float = Field(ge=0, le=1)
    max_conflicting_texts: int = Field(ge=0)
    # Share of train texts longer than train.max_length tokens of the base model (truncated).
    max_truncated_fraction: float = Field(ge=0, le=1)
    max_unknown_char_share: Rate  # of the texts' characters, unknown to the base model's tokenizer

    @model_validator(mode="after")
    def _bounds(self) -> ValidateConfig:
        if self.min_text_chars > self.max_text_chars:
            raise ValueError("min_text_chars must not exceed max_text_chars")
        return self


class PrepareConfig(_Section):
    output_dir: FilePath
    seed: int
    val_fraction: float = Field(gt=0, lt=1)
    test_fraction: float = Field(gt=0, lt=1)
    redact_pii: bool
    pii_phone_regions: list[str]  # ISO 3166 regions whose national phone formats are redacted
    chinese_script: Literal["simplified", "traditional"] | None  # None: left as written

    @model_validator(mode="after")
    def _phone_regions_are_known(self) -> PrepareConfig:
        import phonenumbers  # here: only a params file that names regions needs it

        unknown = [r for r in self.pii_phone_regions if r not in phonenumbers.SUPPORTED_REGIONS]
        if unknown:
            raise ValueError(
                f"pii_phone_regions: unknown region code(s) {unknown}; use ISO 3166 codes in "
                "capitals, e.g. CN, US, GB, DE, IN"
            )
        return self

    @model_validator(mode="after")
    def _fractions(self) -> PrepareConfig:
        if self.val_fraction + self.test_fraction >= 0.9:
            raise ValueError("val_fraction + test_fraction must leave at least 10% for training")
        return self


class TrainConfig(_Section):
    output_dir: FilePath
    base_model: str = Field(min_length=1)
    max_length: int = Field(ge=8, le=4096)
    epochs: int = Field(ge=1)
    batch_size: int = Field(ge=1)
    learning_rate: float = Field(gt=0)
    head_learning_rate_multiplier: float = Field(gt=0)
    # Each encoder layer learns this times as fast as the layer above it (layer-wise decay:
    # the lower, more general layers move less); 1 = one learning rate for the encoder.
    layer_learning_rate_decay: float = Field(default=1.0, gt=0, le=1)
    # Cross-entropy against targets with this share spread over the other labels; 0 = off.
    label_smoothing: float = Field(default=0.0, ge=0, lt=1)
    weight_decay: float = Field(ge=0)
    warmup_ratio: float = Field(ge=0, lt=1)
    seed: int
    device: Literal["auto", "cpu", "cuda"]
    mixed_precision: Literal["auto", "off"]
    quantize: Literal["int8", "off"]
    abstain_target_precision: float = Field(gt=0, le=1)
    # Under the precision target, at most this share of validation answered "unknown" by
    # score; None = no cap.
    abstain_max_share: float | None = Field(ge=0, le=1)
    # The unknown score (textgate.unknown): msp | energy | mahalanobis | mahalanobis+energy.
    unknown_score: Literal["msp", "energy", "mahalanobis", "mahalanobis+energy"]
    # With out-of-scope examples in validation: the share of them to answer "unknown"
    # (this target instead of abstain_target_precision); None = the precision target.
    abstain_target_oos_recall: float | None = Field(gt=0, le=1)
    # Training processes (torchrun / DDP); auto = one per CUDA GPU, else 1.
    processes: Annotated[int, Field(ge=1)] | Literal["auto"]
    freeze_embeddings: bool
    # What the classification head reads: mean = the mean-pooled token states (BERT-family
    # encoders), cls = the family's own head, auto = mean for BERT-family encoders, else cls.
    pooling: Literal["auto", "mean", "cls"]
    evals_per_epoch: int = Field(ge=1)
    early_stopping_patience: Annotated[int, Field(ge=0)] | None  # 0 or None: off
    checkpoint_dir: FilePath
    checkpoint_every_steps: Annotated[int, Field(ge=0)] | None  # 0 or None: epoch ends only


class EvaluateConfig(_Section):
    output_dir: FilePath
    batch_size: int = Field(ge=1)
    must_pass_file: FilePath
    behaviour_examples: int = Field(ge=1)
    golden_requests: int = Field(ge=0)
    calibration_bins: int = Field(ge=2, le=100)
    seed: int


class MarginConfig(_Section):
    """Non-regression margins: how much worse than the champion a candidate may be."""

    accuracy: Rate
    macro_f1: Rate
    class_recall: Rate  # each intent's recall, on the test examples both models are scored on
    behaviour: Rate  # each behavioural pass rate, against production's at its own evaluation


class BehaviourConfig(_Section):
    """Minimum pass rate of each behavioural test."""

    casing: Rate
    punctuation: Rate
    typos: Rate
    filler: Rate
    must_pass: Rate


class OutOfScopeGateConfig(_Section):
    """Floors on the served "unknown" answers, applied when data.out_of_scope_label is set."""

    min_in_scope_accuracy: Rate
    min_oos_recall: Rate
    min_oos_precision: Rate
    min_unknown_auroc: Rate


class GateConfig(_Section):
    min_accuracy: Rate
    min_macro_f1: Rate
    no_champion: Literal["pass", "fail"]
    margins: MarginConfig
    confidence: float = Field(gt=0.5, lt=1)
    bootstrap_resamples: int = Field(ge=100)
    min_class_recall: Rate
    class_recall_floors: dict[str, Rate]
    min_class_support: int = Field(ge=1)
    max_ece: Rate
    behaviour: BehaviourConfig
    out_of_scope: OutOfScopeGateConfig
    max_quantization_drop: Rate
    served_score_tolerance: float = Field(ge=0)
    max_p95_latency_ms: float = Field(gt=0)
    require_approval: bool
    approval_timeout_s: int = Field(ge=1)


class PackageConfig(_Section):
    model_name: str = Field(pattern=r"^[a-z0-9][a-z0-9_.-]*$")
    bentofile: FilePath  # the CPU bento: ONNX Runtime, no torch
    torch_bentofile: FilePath  # the PyTorch bento (GPU serving)
    runtime: Literal["auto", "onnx", "torch"]  # auto: onnx when the model has an ONNX export


class RegistryConfig(_Section):
    path: FilePath
    verdicts_dir: FilePath | None  # None: `verdicts/` next to the registry file


class ServeConfig(_Section):
    port: int = Field(ge=1, le=65535)
    # At least 1 MiB: the largest batch the service logs at once (128 texts of up to 2000
    # characters) is about 0.3 MB, and a file should hold several.
    request_log_max_bytes: int = Field(ge=1 << 20)
    request_log_backups: int = Field(ge=1)  # 0 would let the file grow without bound
    max_concurrency: int = Field(ge=1)  # API requests in flight per serving worker
    retry_after_s: int = Field(ge=1)  # Retry-After of a request refused as overload
    # `textgate serve` follows the registry (flows/serving.py).
    follow_poll_s: float = Field(gt=0)
    switch_ready_timeout_s: float = Field(gt=0)
    drain_timeout_s: float = Field(ge=0)
    standby_s: float = Field(ge=0)
    shadow: bool  # mirror sampled live requests to a shadow candidate (shadow section)


class ShadowConfig(_Section):
    """Shadow evaluation of a candidate on live traffic (textgate.shadow; `serve.shadow`)."""

    min_requests: int = Field(ge=1)
    max_hours: float = Field(gt=0)
    sample_rate: float = Field(gt=0, le=1)
    min_agreement: Rate
    max_abstention_increase: Rate
    max_p95_latency_ratio: float = Field(gt=0)
    max_error_rate: Rate


class DeployConfig(_Section):
    """Prefect deployments and the workspace lock every pipeline run takes."""

    work_pool: str = Field(min_length=1)
    pipeline_cron: str = Field(pattern=r"^\S+( \S+){4}$")  # five cron fields
    timezone: str
    monitor_interval_minutes: float = Field(gt=0)
    concurrency_limit: str | None = Field(min_length=1)
    lock_timeout_s: float = Field(gt=0)

    @model_validator(mode="after")
    def _known_timezone(self) -> DeployConfig:
        try:
            ZoneInfo(self.timezone)
        except (ZoneInfoNotFoundError, ValueError):
            raise ValueError(f"unknown time zone {self.timezone!r} (an IANA name)") from None
        return self


class MonitorConfig(_Section):
    """Drift monitoring of the serving request log; thresholds say when to retrain."""

    request_log: FilePath | None
    state_dir: FilePath
    min_requests: int = Field(ge=1)
    sample_size: int = Field(ge=10)
    batch_size: int = Field(ge=1)
    max_label_psi: float = Field(gt=0)
    mmd_p_value: float = Field(gt=0, lt=1)
    mmd_permutations: int = Field(ge=20)
    max_length_ks: float = Field(gt=0, le=1)
    max_abstention_increase: Rate
    retrain: bool
    retrain_cooldown_hours: float = Field(ge=0)
    seed: int

    @model_validator(mode="after")
    def _permutations_can_reach_the_threshold(self) -> MonitorConfig:
        # The smallest p-value a permutation test can give is 1 / (1 + permutations).
        if 1 / (1 + self.mmd_permutations) >= self.mmd_p_value:
            raise ValueError(
                f"mmd_permutations={self.mmd_permutations} can never give p < "
                f"mmd_p_value={self.mmd_p_value}: use at least {int(1 / self.mmd_p_value)}"
            )
        return self


class LabelConfig(_Section):
    """The labelling loop: what `textgate label export` picks from the request log for review,
    where labelled batches go, and how long the random sample is held out of training."""

    state_dir: FilePath  # the export cursor and what was exported (fingerprints)
    batch_dir: str = Field(min_length=1)  # inside data.raw_dir; data.train_file's glob reads it
    live_dir: str = Field(min_length=1)  # inside data.raw_dir: the labelled random sample
    max_tasks: int = Field(ge=1)  # texts per export, all reasons together
    random_share: Rate  # of max_tasks: the uniform random sample (live accuracy)
    abstained_share: Rate
    low_margin_share: Rate
    low_margin: Rate  # top-1 minus top-2 probability below which an answer is "low margin"
    novel_share: Rate
    novelty_quantile: float = Field(gt=0, lt=1)  # of training texts' own nearest-neighbour distance
    holdout_days: float = Field(ge=0)  # the random sample stays out of training this long
    seed: int

    @model_validator(mode="after")
    def _shares(self) -> LabelConfig:
        total = self.random_share + self.abstained_share + self.low_margin_share + self.novel_share
        if total > 1 + 1e-9:
            raise ValueError(f"the four *_share values add up to {total:g}; at most 1")
        return self


class NotifyConfig(_Section):
    block: str | None = Field(min_length=1)  # a Prefect notification block; None = off


class Params(_Section):
    data: DataConfig
    validate_: ValidateConfig = Field(alias="validate")
    prepare: PrepareConfig
    train: TrainConfig
    evaluate: EvaluateConfig
    gate: GateConfig
    package: PackageConfig
    registry: RegistryConfig
    serve: ServeConfig
    shadow: ShadowConfig
    deploy: DeployConfig
    monitor: MonitorConfig
    label: LabelConfig
    notify: NotifyConfig

    model_config = ConfigDict(frozen=True, extra="forbid", strict=True, populate_by_name=True)

    @model_validator(mode="after")
    def _classes_can_reach_every_split(self) -> Params:
        # prepare puts each class in train, val and (without a test file) test: one distinct
        # text per part at least, so validation must ask for that many.
        needed = 2 if self.data.test_file is not None else 3
        if self.validate_.min_examples_per_class < needed:
            raise ValueError(
                f"validate.min_examples_per_class={self.validate_.min_examples_per_class} lets "
                f"through classes that prepare cannot split: use at least {needed} (one text "
                "per class in each of train, val" + (")" if needed == 2 else " and test)")
            )
        return self


class ServiceSettings(_Section):
    """The params bentos/service.py serves with: tasks.package records them in each bento as
    bento arguments (a bento carries no params.yaml); served from source, it reads params.yaml.
    """

    model_name: str = Field(min_length=1)  # package.model_name: `<it>:latest` without a tag
    max_text_chars: int = Field(ge=1)  # validate.max_text_chars: the longest text accepted
    batch_size: int = Field(ge=1)  # evaluate.batch_size: texts per forward pass, as evaluated
    request_log_max_bytes: int = Field(ge=1 << 20)  # serve.*: as ServeConfig
    request_log_backups: int = Field(ge=1)
    max_concurrency: int = Field(ge=1)
    retry_after_s: int = Field(ge=1)

    @classmethod
    def from_params(cls, params: Params) -> ServiceSettings:
        """The service's settings, taken from their sections of `params`."""
        serve = params.serve
        return cls(
            model_name=params.package.model_name,
            max_text_chars=params.validate_.max_text_chars,
            batch_size=params.evaluate.batch_size,
            request_log_max_bytes=serve.request_log_max_bytes,
            request_log_backups=serve.request_log_backups,
            max_concurrency=serve.max_concurrency,
            retry_after_s=serve.retry_after_s,
        )


def _format_errors(error: ValidationError) -> str:
    lines = []
    for item in error.errors():
        where = ".".join(str(part) for part in item["loc"]) or "(top level)"
        where = where.replace("validate_", "validate")
        if item["type"] == "extra_forbidden":
            lines.append(f"  {where}: unknown key (misspelt or not supported)")
        elif item["type"] == "missing":
            lines.append(f"  {where}: required key is missing")
        else:
            # A section's or the whole file's mapping says nothing the message does not.
            got = "" if isinstance(item.get("input"), dict) else f" (got {item.get('input')!r})"
            lines.append(f"  {where}: {item['msg']}{got}")
    return "\n".join(lines)


def parse_params(raw: object, source: str = PARAMS_FILE) -> Params:
    """Validate an already-parsed params mapping; raise ConfigError naming every bad key."""
    if not isinstance(raw, dict):
        raise ConfigError(f"{source}: expected a mapping of sections, got {type(raw).__name__}")
    try:
        return Params.model_validate(raw)
    except ValidationError as error:
        raise ConfigError(f"{source} is invalid:\n{_format_errors(error)}") from None


class _ParamsLoader(yaml.SafeLoader):
    """YAML 1.2 floats: `2e-4` is a number (PyYAML's YAML 1.1 wants `2.0e-4`, else a string)."""


_ParamsLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(
        r"""^(?:[-+]?(?:[0-9][0-9_]*)\.[0-9_]*(?:[eE][-+]?[0-9]+)?
        |[-+]?(?:[0-9][0-9_]*)(?:[eE][-+]?[0-9]+)
        |\.[0-9_]+(?:[eE][-+]?[0-9]+)?
        |[-+]?\.(?:inf|Inf|INF)
        |\.(?:nan|NaN|NAN))$""",
        re.VERBOSE,
    ),
    list("-+0123456789."),
)


def load_params(path: str | Path = PARAMS_FILE) -> Params:
    """Read and validate params.yaml; raise ConfigError with the file and key at fault."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"params file not found: {path}")
    try:
        raw = yaml.load(path.read_text(encoding="utf-8"), Loader=_ParamsLoader)
    except (yaml.YAMLError, UnicodeDecodeError) as error:
        raise ConfigError(f"{path} is not valid YAML: {error}") from None
    return parse_params(raw, source=str(path))


def resolve_paths(params: Params, root: Path) -> Params:
    """The same params with every relative path made absolute under `root` (the repo)."""
    sections = {}
    for name in Params.model_fields:
        section = getattr(params, name)
        updates = {
            field: root / value
            for field, value in section
            if isinstance(value, Path) and not value.is_absolute()
        }
        sections[name] = section.model_copy(update=updates)
    return params.model_copy(update=sections)
