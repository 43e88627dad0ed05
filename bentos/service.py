"""The textgate HTTP service: classify and explain texts with one model from the BentoML store.

Endpoints (JSON in, JSON out; anything else is a 4xx naming the problem, never a 5xx):

- `POST /classify {"texts": [...]}` -> `[{"label", "score", "abstained"}, ...]`, one result per
  text, in order. 1 to 64 texts of 1 to `validate.max_text_chars` (2000) characters, none
  blank; no other fields. A text the model is not confident about gets the label "unknown"
  and `abstained: true` (when the model was trained with an abstention threshold). Requests
  are batched adaptively.
- `POST /explain {"text": "..."}` -> `{"label", "score", "abstained", "tokens",
  "attributions"}`: one attribution per model token. 1 to 500 characters, not blank.
- `GET /livez`, `/readyz`, `/healthz` (probes), `GET /metrics` (Prometheus) and the API docs
  (Swagger UI at `/`, OpenAPI at `/docs.json`) are always open. `/` is bentos/pages.py's page:
  local assets only, no third-party script (BentoML's own embeds Google Tag Manager).
- Every error is JSON `{"error": ...}`, 404 and 405 included; a rejected request is logged as
  one WARNING line with its route, status and the failing fields, never the text.
- Overload: at most `max_concurrency` full requests' worth of work in flight per worker (the
  bento argument, from `serve.max_concurrency` in params.yaml; a /classify request weighs its
  body size against a full one's, so one-text requests are light); more get 503 with
  `Retry-After` and `{"error": "overloaded: ..."}`, as does a request the batch queue cannot
  serve in time.

Which model: the bento argument `model_tag`, which `tasks.package` sets to the exact tag it
has just saved, so it is recorded in the bento and restored whenever that bento is served
(a newer model saved later does not change what an existing bento serves). Without the
argument (serving from source while developing) the tag comes from `TEXTGATE_MODEL_TAG`, and
else is `<package.model_name>:latest`. It is loaded with `textgate.runtime.load_classifier`, so
pre- and post-processing are the same cleaning, tokenisation and label mapping as evaluation.

Environment:

- `TEXTGATE_API_KEY`: when set and not empty, every API route needs `Authorization: Bearer
  <key>` or `X-API-Key: <key>`; otherwise 401 `{"error": ...}` with `WWW-Authenticate: Bearer`.
  A key of only whitespace is a startup error (it would otherwise turn authentication off);
  the server logs at start whether authentication is on, and the OpenAPI document declares
  both headers as security schemes when it is.
- `TEXTGATE_RUNTIME`: `auto`, `torch` or `onnx`; when unset, the bento argument `runtime`
  that tasks.package records (`onnx` in a CPU bento, which carries neither torch nor
  transformers: bentos/bentofile.yaml; `torch` in one built from bentos/bentofile.torch.yaml),
  else `auto`.
- `TEXTGATE_WORKERS`: worker processes (default min(2, CPUs)).
- `TEXTGATE_THREADS`: compute threads per worker (default: the CPUs shared out between the
  workers, 1 to 4 each, so workers x threads never exceeds the cores: see
  `textgate.runtime.default_threads`); `TEXTGATE_TORCH_THREADS`, its former name, is still
  read when it is not set. Measured with bench/serve.py on 2 cores: 2 workers x 1 thread
  served 146 req/s, 1 x 2 served 117.
- `TEXTGATE_REQUEST_LOG`: the request log (default `<BENTOML_HOME>/textgate/requests.jsonl`).
- `TEXTGATE_REQUEST_LOG_MAX_BYTES`, `TEXTGATE_REQUEST_LOG_BACKUPS`: its rotation (default: the
  bento's serve.request_log_*); `textgate serve` sets them from the current params.yaml.

Settings from params.yaml (package.model_name, validate.max_text_chars, evaluate.batch_size and
serve.request_log_*, max_concurrency, retry_after_s: `textgate.config.ServiceSettings`) are
bento arguments that `tasks.package` records in the bento; served from source without them,
they are read from the repository's params.yaml.

Metrics, besides BentoML's own on `/metrics`: `textgate_predictions_total{label}` (one per
classified text; label "unknown" for an abstention) and `textgate_abstentions_total`.

The request log is the contract with the drift monitor: one JSON object per classified text
(`/classify` only), appended as one line, with exactly these fields:

- `ts`: when the batch was classified, ISO-8601 in UTC (`2025-01-31T12:00:00.123+00:00`);
- `request_id`: the HTTP request's id, as in its `X-BentoML-Request-ID` response header;
- `model_tag`: the served model, `name:version`;
- `text`: the text as the model saw it: normalised (Chinese in one script if the model was
  trained so), with emails, phone, card, IBAN and resident ID numbers replaced by placeholders
  when the model was trained with PII redaction (as the training data was), so the log holds
  no more personal data than the training set;
- `label`: the answer ("unknown" when abstained); `best_label`: the most probable label;
- `score`: the probability of `best_label`; `abstained`: true or false;
- `bento_tag`: the bento that answered, as in the `X-Textgate-Model` header.

Which bento answered: every `/classify` and `/explain` response has the header
`X-Textgate-Model: <bento tag>` (as `textgate status --json` names it in
`production.bento_tag`); served from source, without a bento, it is `source:<model tag>`.

The log and its backups are owner-only (0600). A batch's lines are written at once under a
lock shared by the workers, which also rotate the file by size under it
(textgate.requestlog.RequestLogWriter), so lines from several workers never interleave; a
failed write is logged and never fails the request.
"""

from __future__ import annotations

import hmac
import json
import logging
import os
import sys
import time
import uuid
from collections.abc import Awaitable, Callable, Collection, MutableMapping, Sequence
from datetime import UTC, datetime
from functools import cache
from pathlib import Path
from typing import Annotated, Any

import bentoml
from bentoml.exceptions import InvalidArgument
from pydantic import AfterValidator, BaseModel, ConfigDict, Field, field_validator
from threadpoolctl import threadpool_limits

from bentos.pages import LocalIndexMiddleware


def _forget_a_foreign_textgate() -> None:
    """Make `import textgate` below load the bento's own copy, next to this file.

    `bentoml serve textgate:<version>` first tries `textgate` as a Python module path (the bento
    and the package share the name) and only then loads the bento; where a textgate package is
    installed (an editable install, the project's own environment), that attempt leaves the
    installed package in `sys.modules`, and the bento would serve its code instead of its own.
    """
    loaded = sys.modules.get("textgate")
    root = Path(__file__).resolve().parents[1]
    if loaded is None or Path(loaded.__file__ or "").resolve().parents[1] == root:
        return
    for name in [name for name in sys.modules if name.split(".")[0] == "textgate"]:
        del sys.modules[name]


_forget_a_foreign_textgate()

# The textgate imports come after that check.
from textgate.artifacts import request_record  # noqa: E402
from textgate.config import (  # noqa: E402
    API_KEY_ENV,
    PARAMS_FILE,
    ServiceSettings,
    api_key_from_env,
    load_params,
)
from textgate.errors import ConfigError  # noqa: E402
from textgate.requestlog import BACKUPS_ENV, MAX_BYTES_ENV, RequestLogWriter  # noqa: E402
from textgate.requestlog import request_log_path as configured_request_log  # noqa: E402
from textgate.reuseport import SHED_FILE_ENV, SUPERVISOR_ADDRESS_ENV  # noqa: E402
from textgate.runtime import (  # noqa: E402
    MAX_EXPLAIN_CHARS,
    default_threads,
    default_workers,
    load_classifier,
)
from textgate.text import normalise_text  # noqa: E402

logger = logging.getLogger("bentoml.textgate")

MODEL_TAG_ENV = "TEXTGATE_MODEL_TAG"
MODEL_HEADER = b"x-textgate-model"
RUNTIME_ENV = "TEXTGATE_RUNTIME"
WORKERS_ENV = "TEXTGATE_WORKERS"
# Serving from source, the settings that a bento records come from here.
SOURCE_PARAMS = Path(__file__).resolve().parents[1] / PARAMS_FILE


def service_settings() -> ServiceSettings:
    """The bento's recorded settings (bento arguments), each missing one from params.yaml.

    Raises:
        ConfigError: an argument is invalid, or one is missing and there is no params.yaml
            beside the source (a bento built by hand, not by tasks.package).
    """
    arguments = vars(bentoml.use_arguments())
    given = {name: arguments[name] for name in ServiceSettings.model_fields if arguments.get(name)}
    missing = [name for name in ServiceSettings.model_fields if name not in given]
    if missing:
        if not SOURCE_PARAMS.is_file():
            raise ConfigError(
                f"the bento arguments {missing} are not set and there is no {SOURCE_PARAMS} to "
                "take them from: build the bento with tasks.package, which records them"
            )
        given = {**ServiceSettings.from_params(load_params(SOURCE_PARAMS)).model_dump(), **given}
    try:
        return ServiceSettings.model_validate(given, strict=False)
    except ValueError as error:
        raise ConfigError(f"invalid bento arguments: {error}") from None


# Read once, when BentoML imports the service (also when it builds the bento).
SETTINGS = service_settings()

# Request limits: they bound the tokenizer and model work one request can cause. Texts are
# truncated to the model's max_length tokens anyway, so longer input carries no signal.
MAX_TEXTS_PER_REQUEST = 64
# Far above the largest valid body (64 texts of 2000 characters, each escaped as \uXXXX).
MAX_BODY_BYTES = 1 << 20

# Always reachable without the API key: probes, Prometheus, and the API's documentation.
OPEN_PATHS = frozenset({"/livez", "/readyz", "/healthz", "/metrics", "/", "/docs.json"})
OPEN_PATH_PREFIXES = ("/static_content/", "/assets/")


def _visible(text: str) -> str:
    # The same normalisation as training: a text that cleans to nothing is blank.
    if not normalise_text(text):
        raise ValueError("text must contain at least one non-whitespace, visible character")
    return text


Text = Annotated[
    str, Field(min_length=1, max_length=SETTINGS.max_text_chars), AfterValidator(_visible)
]
Texts = Annotated[list[Text], Field(min_length=1, max_length=MAX_TEXTS_PER_REQUEST)]
ExplainText = Annotated[
    str, Field(min_length=1, max_length=MAX_EXPLAIN_CHARS), AfterValidator(_visible)
]


class RequestText(str):
    """A text that carries the id of the request it came in, through adaptive batching.

    A batch mixes texts from several requests and is classified outside any of them, so the
    id is attached to each text while its request is validated.
    """

    request_id: str

    def __new__(cls, text: str, request_id: str) -> RequestText:
        tagged = super().__new__(cls, text)
        tagged.request_id = request_id
        return tagged


def current_request_id() -> str:
    """The id BentoML gives the current request (its `X-BentoML-Request-ID`), else a new one."""
    from bentoml._internal.context import trace_context

    request_id = trace_context.request_id
    return format(request_id, "016x") if request_id is not None else uuid.uuid4().hex[:16]


class ClassifyRequest(BaseModel):
    """The body of `POST /classify`."""

    # The title names the model in validation errors (BentoML wraps it in an internal class).
    model_config = ConfigDict(extra="forbid", title="ClassifyRequest")

    texts: Texts

    @field_validator("texts")
    @classmethod
    def _tag_with_request_id(cls, texts: list[str]) -> list[str]:
        request_id = current_request_id()
        return [RequestText(text, request_id) for text in texts]


class ExplainRequest(BaseModel):
    """The body of `POST /explain`."""

    model_config = ConfigDict(extra="forbid", title="ExplainRequest")

    text: ExplainText


class Classification(BaseModel):
    """The answer for one text: its label ("unknown" when abstained) and probability."""

    label: str
    score: float = Field(ge=0.0, le=1.0)
    abstained: bool


class Explanation(Classification):
    """A classification with one attribution per model token (positive: towards `label`)."""

    tokens: list[str]
    attributions: list[float]


def configured_model_tag() -> str:
    """The model this service serves: bento argument, then environment, then latest (dev)."""
    arguments = bentoml.use_arguments()
    return (
        getattr(arguments, "model_tag", None)
        or os.environ.get(MODEL_TAG_ENV)
        or f"{SETTINGS.model_name}:latest"
    )


def configured_runtime() -> str:
    """The runtime to load the model with: `TEXTGATE_RUNTIME` when set, else the bento
    argument `runtime` that tasks.package records (onnx for a CPU bento, which carries no
    torch), else auto (textgate.runtime.load_classifier)."""
    arguments = bentoml.use_arguments()
    return os.environ.get(RUNTIME_ENV, "").strip() or getattr(arguments, "runtime", None) or "auto"


def configured_api_key() -> str | None:
    """`TEXTGATE_API_KEY` without surrounding whitespace; None when unset or empty.

    Raises:
        ConfigError: the variable is set to whitespace only (textgate.config.api_key_from_env).
            Not a ValueError: BentoML reads that, raised while it loads a bento, as "not a
            bento tag" and shows another error instead.
    """
    return api_key_from_env(os.environ)


def _positive_env_int(name: str, default: int) -> int:
    """A positive integer from the environment variable `name`, else `default`."""
    raw = os.environ.get(name, "").strip()
    if not raw:
        return default
    if not raw.isdigit() or int(raw) < 1:
        raise ValueError(f"{name} must be a positive integer, got {raw!r}")
    return int(raw)


def request_log_path() -> Path:
    """Where the request log goes: `TEXTGATE_REQUEST_LOG`, else under BentoML's home."""
    from bentoml._internal.configuration.containers import BentoMLContainer

    return configured_request_log(Path(BentoMLContainer.bentoml_home.get()))


def request_log_rotation() -> tuple[int, int]:
    """The request log's size limit and backups: as `textgate serve` passed them, else the
    bento's (serve.request_log_max_bytes and serve.request_log_backups)."""
    return (
        _positive_env_int(MAX_BYTES_ENV, SETTINGS.request_log_max_bytes),
        _positive_env_int(BACKUPS_ENV, SETTINGS.request_log_backups),
    )


def _check_recorded_in_bento(tag: str) -> None:
    """Refuse to serve a model other than the one the bento was built with.

    A bento built by hand without `--arg model_tag=...` would otherwise resolve `latest`
    again at serve time and silently serve whatever model was saved last.
    """
    bento = TextgateService.bento  # set by BentoML when serving a built bento, else None
    if bento is None:
        return
    recorded = sorted(str(model.tag) for model in bento.info.all_models)
    if tag not in recorded:
        raise RuntimeError(
            f"bento {bento.tag} was built with model(s) {recorded} but would serve {tag}; "
            "build it with `--arg model_tag=<name:version>` (tasks.package does)"
        )


def served_bento_tag() -> str:
    """The tag of the bento being served (`source:<model tag>` when serving from source)."""
    bento = TextgateService.bento  # set by BentoML when serving a built bento, else None
    return str(bento.tag) if bento is not None else f"source:{configured_model_tag()}"


class RequestLog:
    """Appends JSON lines to the rotating, owner-only request log; never raises."""

    def __init__(self, path: Path, *, max_bytes: int, backups: int) -> None:
        self.path = path
        self._writer = RequestLogWriter(path, max_bytes=max_bytes, backups=backups)
        self._failing = False

    def append(self, records: Sequence[dict[str, Any]]) -> None:
        """Append one line per record; a failure is logged (once until writes work again)."""
        try:
            data = "".join(json.dumps(record, ensure_ascii=False) + "\n" for record in records)
            self._writer.write(data)
        except (OSError, TypeError, ValueError) as error:
            if not self._failing:
                logger.error("could not append to the request log %s: %s", self.path, error)
            self._failing = True
            return
        if self._failing:
            logger.info("the request log %s is written again", self.path)
            self._failing = False


class RejectionLogFilter(logging.Filter):
    """Turn BentoML's ERROR traceback for a rejected request into one WARNING line.

    A request rejected as invalid (a pydantic ValidationError, or a BentoML error with a 4xx
    status) is the client's error, and its traceback would quote the start of the text. The
    line keeps the route, the status, the error type and the failing fields' locations.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        error = record.exc_info[1] if record.exc_info else None
        status = _client_error_status(error)
        if status is None:
            return True
        route = record.args[0] if isinstance(record.args, tuple) and record.args else "?"
        record.msg = "rejected %s: %d %s%s"
        record.args = (route, status, type(error).__name__, _error_locations(error))
        record.levelno, record.levelname = logging.WARNING, "WARNING"
        record.exc_info, record.exc_text, record.stack_info = None, None, None
        return True


def _client_error_status(error: BaseException | None) -> int | None:
    """400 for a validation error, the status of a 4xx BentoML error, else None."""
    from bentoml.exceptions import BentoMLException
    from pydantic import ValidationError

    if isinstance(error, ValidationError):
        return 400
    if isinstance(error, BentoMLException) and 400 <= error.error_code.value < 500:
        return error.error_code.value
    return None


def _error_locations(error: BaseException) -> str:
    from pydantic import ValidationError

    if not isinstance(error, ValidationError):
        return ""
    problems = {
        f"{'.'.join(str(part) for part in problem['loc']) or 'body'} ({problem['type']})"
        for problem in error.errors(include_input=False, include_url=False)
    }
    return " at " + ", ".join(sorted(problems))


def _install_rejection_log_filter() -> None:
    # The logger BentoML's API wrapper logs request errors on (`log_exception`).
    http_logger = logging.getLogger("bentoml._internal.server.http_app")
    if not any(isinstance(f, RejectionLogFilter) for f in http_logger.filters):
        http_logger.addFilter(RejectionLogFilter())


@cache
def _counters() -> tuple[Any, Any]:
    """The service's Prometheus counters, created once per worker.

    prometheus_client is imported here, in the worker, not with the module: BentoML sets the
    multiprocess directory after importing the service, and the client reads it on import.
    """
    from prometheus_client import Counter

    predictions = Counter(
        "textgate_predictions", "Texts classified, by answered label.", labelnames=["label"]
    )
    abstentions = Counter("textgate_abstentions", "Texts the model abstained on.")
    return predictions, abstentions


# Refuse a blank key when `bentoml serve` loads the service, before any worker starts.
configured_api_key()


@bentoml.service(
    name="textgate",
    # Worker processes (each with its own model and TEXTGATE_THREADS compute threads): read
    # when the bento is served, so one bento fits any machine.
    workers=_positive_env_int(WORKERS_ENV, default_workers()),
    # BentoML's own traffic.max_concurrency answers 429 without Retry-After from outside our
    # middleware, so the limit is OverloadMiddleware's (below); the timeout is BentoML's (504).
    traffic={"timeout": 30},
    # textgate writes its own request log (below); a second line per request costs CPU.
    logging={"access": {"enabled": False}},
)
class TextgateService:
    """Classify short support texts with a textgate model, and explain single answers."""

    model_ref = bentoml.models.BentoModel(configured_model_tag())

    def __init__(self) -> None:
        stored = self.model_ref  # resolved from the model store: a bentoml Model
        self.model_tag = str(stored.tag)
        _check_recorded_in_bento(self.model_tag)
        self.bento_tag = served_bento_tag()
        threads = default_threads(_positive_env_int(WORKERS_ENV, default_workers()))
        # numpy's BLAS (the unknown score's products) would otherwise start a thread per core
        # in every worker and spin them for each text: measured on 2 cores with 2 workers,
        # one text's prediction cost 10.6 ms of CPU against 5.4 ms of wall time.
        threadpool_limits(limits=threads, user_api="blas")
        runtime = configured_runtime()
        self.classifier = load_classifier(stored.path, runtime=runtime, threads=threads)
        max_bytes, backups = request_log_rotation()
        self.request_log = RequestLog(request_log_path(), max_bytes=max_bytes, backups=backups)
        self.predictions, self.abstentions = _counters()
        _install_rejection_log_filter()
        if configured_api_key() is None:
            logger.warning("authentication is off: %s is not set", API_KEY_ENV)
        else:
            logger.info("authentication is on: API routes need the key in %s", API_KEY_ENV)
        logger.info(
            "textgate serves %s with runtime %s (requested %s), %d threads; request log %s",
            self.model_tag,
            self.classifier.runtime,
            runtime,
            threads,
            self.request_log.path,
        )

    # Adaptive batching: requests are validated one by one (the limits above), then their
    # lists are concatenated along dimension 0, classified together and split back in order.
    # On CPUs (one text per forward pass) the dispatcher still pays: it queues requests for the
    # worker's one compute thread (without it, 32 clients on the bento got 164-269 against
    # 311-346 req/s, each request in its own thread contending for the cores).
    @bentoml.api(
        input_spec=ClassifyRequest,
        batchable=True,
        batch_dim=0,
        max_batch_size=128,
        max_latency_ms=10_000,
    )
    def classify(self, texts: Texts) -> list[Classification]:
        """Classify each text; one result per text, in the order given."""
        # Cleaned once: the model's input is also what the request log records.
        cleaned = self.classifier.clean([str(text) for text in texts])
        predictions = self.classifier.predict(cleaned, batch_size=SETTINGS.batch_size, cleaned=True)
        ts = datetime.now(UTC).isoformat(timespec="milliseconds")
        records = []
        for text, seen, prediction in zip(texts, cleaned, predictions, strict=True):
            self.predictions.labels(label=prediction.label).inc()
            if prediction.abstained:
                self.abstentions.inc()
            records.append(
                request_record(
                    ts=ts,
                    request_id=getattr(text, "request_id", None),
                    model_tag=self.model_tag,
                    text=seen,
                    label=prediction.label,
                    best_label=prediction.best_label,
                    score=prediction.score,
                    abstained=prediction.abstained,
                    margin=prediction.margin,
                    bento_tag=self.bento_tag,
                )
            )
        self.request_log.append(records)
        return [
            Classification(label=p.label, score=p.score, abstained=p.abstained) for p in predictions
        ]

    @bentoml.api(input_spec=ExplainRequest)
    def explain(self, text: ExplainText) -> Explanation:
        """Classify one text and attribute the answer to its tokens."""
        try:
            explained = self.classifier.explain(text)
        except ValueError as error:  # the input limits above should keep this from happening
            raise InvalidArgument(str(error)) from error
        return Explanation(
            label=explained.label,
            score=explained.score,
            abstained=explained.abstained,
            tokens=list(explained.tokens),
            attributions=[float(value) for value in explained.attributions],
        )


# ASGI middleware, around the API routes (BentoML's metrics, tracing and access log come first,
# so refused requests are still counted and logged).

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]


async def _send_json_error(
    send: Send, status: int, message: str, headers: Sequence[tuple[bytes, bytes]] = ()
) -> None:
    body = json.dumps({"error": message}).encode("utf-8")
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [
                (b"content-type", b"application/json"),
                (b"content-length", str(len(body)).encode("ascii")),
                *headers,
            ],
        }
    )
    await send({"type": "http.response.body", "body": body})


class JsonErrorsMiddleware:
    """Answer 404 and 405 with `{"error": ...}` like every other error, not Starlette's text."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        replaced = False

        async def json_errors(message: Message) -> None:
            nonlocal replaced
            if message["type"] == "http.response.start" and message["status"] in (404, 405):
                content_type = _header({"headers": message.get("headers", ())}, b"content-type")
                if content_type is None or not content_type.startswith(b"application/json"):
                    replaced = True
                    await _send_route_error(send, scope, message)
                    return
            if not replaced:
                await send(message)

        await self.app(scope, receive, json_errors)


async def _send_route_error(send: Send, scope: Scope, start: Message) -> None:
    """The JSON 404 or 405 for the request `scope`, whose plain-text answer began with `start`."""
    method, path = scope.get("method", "?"), scope.get("path", "?")
    if start["status"] == 404:
        await _send_json_error(send, 404, f"not found: no route {path}")
        return
    allow = _header({"headers": start.get("headers", ())}, b"allow") or b""
    message = f"method not allowed: {method} {path}; allowed: {allow.decode('latin-1')}"
    await _send_json_error(send, 405, message, [(b"allow", allow)] if allow else [])


class ModelHeaderMiddleware:
    """Name the bento that computed each API answer in `X-Textgate-Model`."""

    def __init__(self, app: ASGIApp, routes: Collection[str]) -> None:
        self.app = app
        self.routes = frozenset(routes)
        self.header: tuple[bytes, bytes] | None = None  # built at the first request

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope.get("path") not in self.routes:
            await self.app(scope, receive, send)
            return
        if self.header is None:
            self.header = (MODEL_HEADER, served_bento_tag().encode("latin-1"))
        header = self.header

        async def with_model(message: Message) -> None:
            if message["type"] == "http.response.start":
                message = {**message, "headers": [*message.get("headers", ()), header]}
            await send(message)

        await self.app(scope, receive, with_model)


class ShedMiddleware:
    """While `textgate serve` moves traffic off this bento (its shed file exists), each answer
    to a client connected directly says `Connection: close`: the client's next request opens a
    new connection, which the port steers to the supervisor's proxy (textgate.reuseport).
    Connections from the supervisor's own address stay open. The file is looked at once per
    `CHECK_EVERY_S` at most; without the variable (a bento served otherwise) nothing changes.
    """

    CHECK_EVERY_S = 0.05

    def __init__(
        self, app: ASGIApp, path: str | None = None, supervisor: str | None = None
    ) -> None:
        self.app = app
        self.path = os.environ.get(SHED_FILE_ENV, "") if path is None else path
        self.supervisor = (
            os.environ.get(SUPERVISOR_ADDRESS_ENV, "") if supervisor is None else supervisor
        )
        self.checked = -1.0
        self.shedding = False

    def _shedding(self) -> bool:
        now = time.monotonic()
        if now - self.checked >= self.CHECK_EVERY_S or now < self.checked:
            self.checked = now
            self.shedding = os.path.exists(self.path)
        return self.shedding

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if not self.path or scope["type"] != "http" or not self._shedding():
            await self.app(scope, receive, send)
            return
        client = scope.get("client")
        if client and client[0] == self.supervisor:
            await self.app(scope, receive, send)
            return

        async def closing(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = [*message.get("headers", ()), (b"connection", b"close")]
                message = {**message, "headers": headers}
            await send(message)

        await self.app(scope, receive, closing)


class OverloadMiddleware:
    """At most `max_concurrency` full requests' worth of work in flight on the API routes,
    per worker.

    A request on a `weighed_routes` route (/classify) weighs its declared body size over
    `full_request_bytes`, the body of a full request (64 texts of 2000 characters), at most 1:
    one short text is a small fraction of a full request's tokenizer and model work, so many
    clients sending one text each are all served, while eight full requests fill a worker.
    Other routes (/explain: one forward pass per token), and a body of unknown size, weigh 1.
    A worker with nothing in flight always takes the request. Beyond the limit, or when
    BentoML's batch queue refuses a request it cannot serve within the API's max_latency_ms
    (a 503 with a generic body), the answer is 503 with `Retry-After` and
    `{"error": "overloaded: ..."}`: the client should retry, nothing is wrong with it.
    """

    def __init__(
        self,
        app: ASGIApp,
        routes: Collection[str],
        max_concurrency: int,
        retry_after_s: int,
        full_request_bytes: int = MAX_TEXTS_PER_REQUEST * 2000,
        weighed_routes: Collection[str] = ("/classify",),
    ) -> None:
        self.app = app
        self.routes = frozenset(routes)
        self.max_concurrency = max_concurrency
        self.retry_after_s = retry_after_s
        self.full_request_bytes = full_request_bytes
        self.weighed_routes = frozenset(weighed_routes)
        # One event loop per worker: no lock needed. The count bounds the requests held.
        self.in_flight = 0
        self.load = 0.0

    def weight(self, scope: Scope) -> float:
        """The share of a full request's work this request declares (see the class)."""
        if scope.get("path") not in self.weighed_routes:
            return 1.0
        for name, value in scope.get("headers", ()):
            if name == b"content-length":
                try:
                    size = int(value)
                except ValueError:
                    return 1.0
                return min(1.0, max(size, 1) / self.full_request_bytes)
        return 1.0

    def admits(self, weight: float) -> bool:
        """Whether a request of `weight` fits beside the work in flight."""
        if self.in_flight == 0:
            return True
        if self.in_flight >= self.max_concurrency * MAX_TEXTS_PER_REQUEST:
            return False
        return self.load + weight <= self.max_concurrency + 1e-9

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope.get("path") not in self.routes:
            await self.app(scope, receive, send)
            return
        weight = self.weight(scope)
        if not self.admits(weight):
            why = f"{self.max_concurrency} full requests' worth of work in flight per worker"
            await self._refuse(send, why)
            return
        refused = False

        async def overload_aware(message: Message) -> None:
            nonlocal refused
            if message["type"] == "http.response.start" and message["status"] == 503:
                refused = True
                await self._refuse(send, "the batch queue cannot serve it in time")
                return
            if not refused:
                await send(message)

        self.in_flight += 1
        self.load += weight
        try:
            await self.app(scope, receive, overload_aware)
        finally:
            self.in_flight -= 1
            self.load -= weight

    async def _refuse(self, send: Send, why: str) -> None:
        message = f"overloaded: {why}; retry after {self.retry_after_s} s"
        retry_after = str(self.retry_after_s).encode("ascii")
        await _send_json_error(send, 503, message, [(b"retry-after", retry_after)])


class OpenApiSecurityMiddleware:
    """Declare the API key in `/docs.json` when one is required, so Swagger UI can send it.

    BentoML's OpenAPI model has no security schemes, so they are added to its JSON.
    """

    SCHEMES = {
        "ApiKeyHeader": {"type": "apiKey", "in": "header", "name": "X-API-Key"},
        "BearerAuth": {"type": "http", "scheme": "bearer"},
    }

    def __init__(self, app: ASGIApp, routes: Collection[str]) -> None:
        self.app = app
        self.routes = frozenset(routes)
        self.enabled = configured_api_key() is not None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if not self.enabled or scope["type"] != "http" or scope.get("path") != "/docs.json":
            await self.app(scope, receive, send)
            return
        start: Message = {}
        chunks: list[bytes] = []

        async def collect(message: Message) -> None:
            nonlocal start
            if message["type"] == "http.response.start":
                start = message
            else:
                chunks.append(message.get("body", b""))

        await self.app(scope, receive, collect)
        body = b"".join(chunks)
        if start.get("status") == 200:
            body = json.dumps(self.secured(json.loads(body))).encode("utf-8")
        headers = [(k, v) for k, v in start.get("headers", ()) if k.lower() != b"content-length"]
        headers.append((b"content-length", str(len(body)).encode("ascii")))
        await send({**start, "headers": headers})
        await send({"type": "http.response.body", "body": body})

    def secured(self, spec: dict[str, Any]) -> dict[str, Any]:
        """`spec` with the schemes, required (either one) on every API route's operations."""
        spec.setdefault("components", {})["securitySchemes"] = self.SCHEMES
        for path, operations in spec.get("paths", {}).items():
            if path in self.routes:
                for operation in operations.values():
                    operation["security"] = [{name: []} for name in self.SCHEMES]
        return spec


def _header(scope: Scope, name: bytes) -> bytes | None:
    for key, value in scope.get("headers", ()):
        if key.lower() == name:
            return value
    return None


class ApiKeyMiddleware:
    """Require `TEXTGATE_API_KEY` on every route but probes, metrics and docs, when it is set.

    The key is read when the server builds its app (in the worker), not at import.
    """

    def __init__(self, app: ASGIApp, api_key: str | None = None) -> None:
        self.app = app
        key = configured_api_key() if api_key is None else api_key.strip()
        self.key = key.encode("utf-8") if key else None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        path = scope.get("path", "")
        if (
            self.key is None
            or scope["type"] not in ("http", "websocket")  # lifespan events
            or path in OPEN_PATHS
            or path.startswith(OPEN_PATH_PREFIXES)
        ):
            await self.app(scope, receive, send)
            return
        offered = self._offered_keys(scope)
        # Each comparison in constant time; all of them, not up to the first match.
        if any([hmac.compare_digest(key, self.key) for key in offered]):
            await self.app(scope, receive, send)
            return
        if scope["type"] == "websocket":
            await send({"type": "websocket.close", "code": 1008})  # policy violation
            return
        problem = "invalid API key" if offered else "missing API key"
        await _send_json_error(
            send,
            401,
            f"{problem}: send 'Authorization: Bearer <key>' or 'X-API-Key: <key>'",
            [(b"www-authenticate", b'Bearer realm="textgate"')],
        )

    @staticmethod
    def _offered_keys(scope: Scope) -> list[bytes]:
        offered = []
        authorization = _header(scope, b"authorization")
        if authorization is not None:
            scheme, _, credentials = authorization.strip().partition(b" ")
            if scheme.lower() == b"bearer" and credentials.strip():
                offered.append(credentials.strip())
        api_key = _header(scope, b"x-api-key")
        if api_key is not None and api_key.strip():
            offered.append(api_key.strip())
        return offered


class JsonBodyMiddleware:
    """Let only bounded JSON bodies reach the API routes: else 415 (media type) or 413 (size).

    BentoML would parse `multipart/form-data` and form bodies too (outside the documented
    schema, with errors that become 500s), and reads a body whole, however large. A request
    without a Content-Type is JSON, as BentoML takes it.
    """

    def __init__(
        self, app: ASGIApp, routes: Collection[str], max_bytes: int = MAX_BODY_BYTES
    ) -> None:
        self.app = app
        self.routes = frozenset(routes)
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope.get("path") not in self.routes:
            await self.app(scope, receive, send)
            return
        content_type = _header(scope, b"content-type")
        if content_type is not None:
            media_type = content_type.split(b";")[0].strip().lower()
            if media_type != b"application/json":
                shown = content_type.decode("latin-1")[:100]
                await _send_json_error(
                    send, 415, f"Content-Type must be application/json, not {shown!r}"
                )
                return
        too_large = f"the request body must be at most {self.max_bytes} bytes"
        length = _header(scope, b"content-length")
        if length is not None and length.strip().isdigit() and int(length) > self.max_bytes:
            await _send_json_error(send, 413, too_large)
            return
        # Read the body here (the API reads it whole anyway), so a chunked upload is bounded
        # too, then hand it on as one message.
        chunks: list[bytes] = []
        size = 0
        while True:
            message = await receive()
            if message["type"] != "http.request":  # the client went away
                return
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.max_bytes:
                await _send_json_error(send, 413, too_large)
                return
            chunks.append(chunk)
            if not message.get("more_body", False):
                break
        body = b"".join(chunks)
        replayed = False

        async def replay() -> Message:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()  # after the body: wait for the disconnect, as a server does

        await self.app(scope, replay, send)


API_ROUTES = [api.route for api in TextgateService.apis.values()]
for _api in TextgateService.apis.values():
    # Declared, so BentoML does not derive each response's media type from the output's JSON
    # schema (generated anew per response: 0.9 ms of a 13 ms request in a py-spy profile).
    _api.output_spec.media_type = "application/json"
# The first added is the outermost.
TextgateService.add_asgi_middleware(ShedMiddleware)
TextgateService.add_asgi_middleware(JsonErrorsMiddleware)
TextgateService.add_asgi_middleware(OpenApiSecurityMiddleware, routes=API_ROUTES)
TextgateService.add_asgi_middleware(ApiKeyMiddleware)
TextgateService.add_asgi_middleware(ModelHeaderMiddleware, routes=API_ROUTES)
TextgateService.add_asgi_middleware(
    OverloadMiddleware,
    routes=API_ROUTES,
    max_concurrency=SETTINGS.max_concurrency,
    retry_after_s=SETTINGS.retry_after_s,
    full_request_bytes=MAX_TEXTS_PER_REQUEST * SETTINGS.max_text_chars,
    weighed_routes=[TextgateService.apis["classify"].route],
)
TextgateService.add_asgi_middleware(LocalIndexMiddleware)
TextgateService.add_asgi_middleware(JsonBodyMiddleware, routes=API_ROUTES)
