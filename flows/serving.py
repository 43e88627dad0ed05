"""`textgate serve`: serve the production bento and follow the registry, switching live.

The supervisor owns the public port. On Linux with an IPv4 host it binds it as an
SO_REUSEPORT group steered by a BPF program (textgate.reuseport): each bento's `bentoml serve`
accepts on a slot of the port (textgate.bento_launch), and in steady state the kernel hands
new connections straight to the serving bento, with nothing in between. Elsewhere, and
whenever requests must be switched one by one, connections go to textgate.proxy (aiohttp, in
a thread), which forwards each request to the serving bento. Every `serve.follow_poll_s` the
supervisor reads the registry; when production changes (a pipeline promotion,
`textgate promote`, `textgate rollback`) it switches:

1. the bento is looked up in the BentoML store (tasks.promote.ensure_servable);
2. it is started beside the serving one and must answer `/readyz` within
   `serve.switch_ready_timeout_s`;
3. the golden requests (evaluate's golden.json texts) must be answered as the bento's model
   answers them offline (computed once per bento, in a child process, while it starts),
   within `gate.served_score_tolerance`;
4. new connections go to the proxy, and the old bento's directly connected clients are moved
   there (each answer it gives them says `Connection: close`; an idle one is closed by its
   keep-alive timeout); the proxy then sends new requests to the new bento and the old one
   drains (at most `serve.drain_timeout_s`); new connections go straight to the new bento,
   and the proxy's clients follow (its answers say `Connection: close` too). So no client
   gets an answer from the old model after one from the new. The old bento stays on standby
   for `serve.standby_s`: if the new one dies meanwhile (a crash under load), traffic goes
   straight back to it, with an alert; then it is stopped. While a shadow candidate is
   mirrored, all traffic goes through the proxy.

A candidate that fails any step is stopped, the old bento goes on serving, an alert goes to
the notification block, and the state file (read by `textgate status`) records the problem;
the supervisor tries again when production changes again. A corrupt registry is reported
the same way and the serving bento stays. If the serving bento dies, it is started again.

No orphans: the supervisor holds `serve-<port>.lock` (a second `textgate serve` on the
port is refused, naming the first), each bento gets SIGTERM from the kernel when the
supervisor dies (PR_SET_PDEATHSIG), and every bento process and worker is recorded in the
state file, so the next start stops whatever a supervisor killed with SIGKILL left.
"""

from __future__ import annotations

import asyncio
import fcntl
import json
import os
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import psutil

from flows.processes import die_with_parent
from tasks.served import GoldenCase, ServedCheckError, load_golden, replay
from textgate.config import ShadowConfig
from textgate.errors import TextgateError
from textgate.gate import Check
from textgate.io import write_json
from textgate.process import (
    ManagedProcess,
    ProcessStartError,
    free_port,
    start_process,
    stop,
    terminate_then_kill,
    url_ready,
    wait_ready,
)
from textgate.proxy import Backend, Proxy, Shadow
from textgate.registry import Registry, RegistryError, Release
from textgate.reuseport import (
    SHED_FILE_ENV,
    SUPERVISOR_ADDRESS_ENV,
    Slot,
    Steering,
    SteeringUnavailable,
    connect_host,
)
from textgate.shadow import read_shadow_log, shadow_checks, summarise

STOP_GRACE_S = 20.0
LAUNCHER = Path(__file__).resolve().parents[1] / "textgate" / "bento_launch.py"
# Texts for the switch check when the workspace has no golden.json (no evaluation yet).
FALLBACK_TEXTS = ["hello", "I lost my card", "please refund my order", "I cannot log in"]


class SwitchError(TextgateError):
    """A candidate bento cannot take traffic: missing, not starting, or answering wrongly."""


@dataclass(frozen=True)
class ServeOptions:
    """What `textgate serve` was asked for, resolved from params and the command line."""

    host: str
    port: int
    registry: Registry
    state_dir: Path
    env: dict[str, str]  # the bentos' environment
    golden_file: Path
    score_tolerance: float
    poll_s: float
    ready_timeout_s: float
    drain_timeout_s: float
    standby_s: float = 0.0  # how long the old bento stays ready to take traffic back
    shadow: bool = False  # serve.shadow: follow shadow.json too
    shadow_sample_rate: float = 1.0


@dataclass(eq=False)
class Served:
    """A running `bentoml serve` of one bento, with the workers it started."""

    release: Release
    process: ManagedProcess
    backend: Backend
    workers: dict[int, psutil.Process] = field(default_factory=dict)
    slot: Slot | None = None  # the slot of the public port it accepts on (None: a private port)
    shed_file: Path | None = None  # exists while its direct clients are moved off

    @property
    def tag(self) -> str:
        return self.release.bento_tag

    def note_workers(self) -> None:
        """Remember the server's descendants (its workers leave its process group)."""
        with suppress(psutil.Error):
            for child in psutil.Process(self.process.pid).children(recursive=True):
                self.workers.setdefault(child.pid, child)

    def record(self) -> dict[str, Any]:
        """The processes to stop after a crash of the supervisor: pid and start time each."""
        processes = [self.process.pid, *self.workers]
        processes_started = [[pid, _started(pid)] for pid in processes]
        record = {"tag": self.tag, "url": self.backend.url, "processes": processes_started}
        if self.backend.local_addr is not None:
            record["source"] = self.backend.local_addr  # its slot's: connect from it to reach it
        return record

    def stop(self) -> None:
        stop(self.process, STOP_GRACE_S)
        terminate_then_kill([w for w in self.workers.values() if w.is_running()], STOP_GRACE_S)
        self.shed(False)

    def shed(self, on: bool) -> None:
        """Have the bento close its direct clients' connections after each answer (or not)."""
        if self.shed_file is None:
            return
        if on:
            self.shed_file.touch()
        else:
            self.shed_file.unlink(missing_ok=True)

    def direct_clients(self) -> int:
        """Connections to its slot from anything but the supervisor (its slot's source)."""
        if self.slot is None:
            return 0
        port, own = self.slot.sock.getsockname()[1], self.slot.source
        count = 0
        for process in [psutil.Process(self.process.pid), *self.workers.values()]:
            with suppress(psutil.Error):
                for connection in process.net_connections(kind="tcp4"):
                    if (
                        connection.status == psutil.CONN_ESTABLISHED
                        and connection.laddr.port == port
                        and connection.raddr
                        and connection.raddr.ip != own
                    ):
                        count += 1
        return count


def _started(pid: int) -> float | None:
    with suppress(psutil.Error):
        return psutil.Process(pid).create_time()
    return None


def now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


def launch_bento(
    release: Release, options: ServeOptions, workdir: Path, slot: Slot | None = None
) -> Served:
    """Start `bentoml serve` of the release's bento (not yet ready): on `slot` of the public
    port (textgate.bento_launch), or without one on a free loopback port.

    It gets SIGTERM from the kernel if this process dies (start it from the main thread).
    """
    env = {**options.env, "BENTOML_DO_NOT_TRACK": "True"}
    env.pop("PYTHONPATH", None)  # a bento is self-contained
    workdir.mkdir(parents=True, exist_ok=True)
    shed_file = None
    if slot is None:
        port = free_port()
        command = [sys.executable, "-m", "bentoml", "serve", release.bento_tag]
        backend = Backend(release.bento_tag, f"http://127.0.0.1:{port}")
        log_name = f"bentoml-serve-{port}.log"
    else:
        port = slot.sock.getsockname()[1]
        launcher = workdir / LAUNCHER.name  # run as a script: a bento imports only its own code
        if not launcher.is_file():
            launcher.write_text(LAUNCHER.read_text(encoding="utf-8"), encoding="utf-8")
        command = [sys.executable, str(launcher), str(slot.sock.fileno())]
        command += ["serve", release.bento_tag]
        url = f"http://{connect_host(options.host)}:{port}"
        backend = Backend(release.bento_tag, url, local_addr=slot.source)
        shed_file = workdir / f"shed-slot-{slot.index}-{time.time_ns()}"
        env.update({SHED_FILE_ENV: str(shed_file), SUPERVISOR_ADDRESS_ENV: slot.source})
        log_name = f"bentoml-serve-slot-{slot.index}.log"
    command += ["--host", "127.0.0.1" if slot is None else options.host, "--port", str(port)]
    process = start_process(
        command,
        env=env,
        cwd=workdir,
        log_path=workdir / log_name,
        name=f"bentoml serve {release.bento_tag}",
        preexec_fn=die_with_parent(),
        pass_fds=() if slot is None else (slot.sock.fileno(),),
    )
    return Served(release, process, backend, slot=slot, shed_file=shed_file)


def wait_bento_ready(served: Served, timeout_s: float) -> None:
    """Wait until the bento answers `/readyz`, noting its workers as they start.

    Raises:
        SwitchError: it exited or was not ready in time (with the end of its log).
    """

    def ready() -> bool:
        served.note_workers()
        return url_ready(f"{served.backend.url}/readyz", local_address=served.backend.local_addr)

    try:
        wait_ready(served.process, ready, timeout_s)
    except ProcessStartError as error:
        raise SwitchError(str(error)) from None
    served.note_workers()


def golden_texts(options: ServeOptions) -> list[str]:
    """The texts a candidate must answer as offline: golden.json's, else a few fixed ones."""
    if not options.golden_file.is_file():
        return list(FALLBACK_TEXTS)
    return [case.text for case in load_golden(options.golden_file)]


def offline_answers_command(bento_tag: str, texts: Path, out: Path) -> list[str]:
    """The child process that writes the bento's model's offline answers (see `main`)."""
    return [sys.executable, "-m", "flows.serving", bento_tag, str(texts), str(out)]


@contextmanager
def offline_answers(bento_tag: str, options: ServeOptions, cache: Path) -> Iterator[Callable]:
    """Start computing the golden cases of `bento_tag` in a child; yield a function that
    waits for them (cached in `cache` per bento, so a rollback computes nothing)."""
    out = cache / f"{bento_tag.replace(':', '-')}.json"
    if out.is_file():
        yield lambda: load_golden(out)
        return
    cache.mkdir(parents=True, exist_ok=True)
    texts = cache / f".{out.stem}.texts.json"
    write_json(texts, golden_texts(options))
    env = {**options.env, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    process = start_process(
        offline_answers_command(bento_tag, texts, out),
        env=env,
        log_path=cache / f".{out.stem}.log",
        name=f"offline answers of {bento_tag}",
        preexec_fn=die_with_parent(),
    )

    def wait() -> list[GoldenCase]:
        try:
            code = process.popen.wait(timeout=options.ready_timeout_s)
        except subprocess.TimeoutExpired:
            raise SwitchError(
                f"{process.name} took over serve.switch_ready_timeout_s="
                f"{options.ready_timeout_s:g} s; {process.log_tail()}"
            ) from None
        if code != 0 or not out.is_file():
            raise SwitchError(f"{process.name} failed (exit {code}); {process.log_tail()}")
        return load_golden(out)

    try:
        yield wait
    finally:
        stop(process, 1.0)


def check_answers(served: Served, golden: list[GoldenCase], tolerance: float) -> None:
    """Replay the golden cases on the candidate; SwitchError unless every one matches."""
    report = replay(
        served.backend.url,
        golden,
        score_tolerance=tolerance,
        bento_tag=served.tag,
        local_address=served.backend.local_addr,
    )
    if not report.passed:
        problems = [*report.errors, *(json.dumps(m) for m in report.mismatches)]
        raise SwitchError(
            f"{served.tag} answered {report.matched}/{report.n} golden requests as offline "
            f"(tolerance gate.served_score_tolerance={tolerance}); first: {problems[:2]}"
        )


SHADOW_TARGET = "shadow.json"
SHADOW_LOG = "shadow.jsonl"


def read_shadow_target(state_dir: Path) -> Release | None:
    """The candidate `textgate shadow` named (`<state_dir>/shadow.json`), or None.

    Raises:
        TextgateError: the file is not a release.
    """
    path = state_dir / SHADOW_TARGET
    try:
        return Release.model_validate_json(path.read_bytes())
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as error:
        raise TextgateError(
            f"{path} is not a shadow candidate ({error}); set one with `textgate shadow TAG`"
        ) from None


def write_shadow_target(state_dir: Path, release: Release | None) -> None:
    """Name the shadow candidate (None: no shadow); a new candidate starts a new log."""
    path = state_dir / SHADOW_TARGET
    if release is None:
        path.unlink(missing_ok=True)
        return
    write_json(path, release.model_dump(mode="json"))


def shadow_sink(path: Path) -> Callable[[dict[str, Any]], None]:
    """Append each shadow record to `path` as one JSON line (one writer: the proxy)."""
    path.parent.mkdir(parents=True, exist_ok=True)

    def append(record: dict[str, Any]) -> None:
        try:
            with path.open("a", encoding="utf-8") as handle:
                handle.write(json.dumps(record) + "\n")
        except OSError as error:
            print(f"textgate: serve: cannot append to {path}: {error}", file=sys.stderr)

    return append


def shadow_evidence(
    state_dir: Path,
    release: Release,
    config: ShadowConfig,
    log: Callable[[str], None],
    poll_s: float = 30.0,
) -> list[Check]:
    """Serve `release` in shadow until `config.min_requests` mirrored requests (or
    `config.max_hours`), then the shadow checks; the shadow is ended either way.

    Needs a `textgate serve` with serve.shadow on, which mirrors to the candidate named here.
    """
    (state_dir / SHADOW_LOG).unlink(missing_ok=True)
    write_shadow_target(state_dir, release)
    started = time.monotonic()
    try:
        while True:
            records = read_shadow_log(state_dir / SHADOW_LOG, release.bento_tag)
            waited_hours = (time.monotonic() - started) / 3600
            if len(records) >= config.min_requests or waited_hours >= config.max_hours:
                return shadow_checks(summarise(records), config, waited_hours)
            log(
                f"waiting for shadow evidence on {release.bento_tag}: {len(records)}/"
                f"{config.min_requests} mirrored requests after {waited_hours:.2f} h "
                f"(shadow.max_hours={config.max_hours})"
            )
            time.sleep(poll_s)
    finally:
        write_shadow_target(state_dir, None)


class ServeState:
    """`<state_dir>/serve-<port>.json`: what this supervisor serves, its processes, problems.

    `textgate status` reads it; the next `textgate serve` on the port reads `bentos` to stop
    what a killed supervisor left.
    """

    def __init__(self, state_dir: Path, port: int) -> None:
        self.path = state_dir / f"serve-{port}.json"
        self.data: dict[str, Any] = {"pid": os.getpid(), "port": port, "serving": None}
        self.data.update(since=None, problem=None, problem_at=None, bentos=[])

    def write(self, **changes: Any) -> None:
        self.data.update(changes)
        write_json(self.path, self.data)


def read_serve_states(state_dir: Path) -> list[dict[str, Any]]:
    """The state of every `textgate serve` whose supervisor is alive, for `textgate status`."""
    states = []
    for path in sorted(state_dir.glob("serve-*.json")):
        with suppress(OSError, ValueError):
            state = json.loads(path.read_text(encoding="utf-8"))
            if isinstance(state, dict) and psutil.pid_exists(int(state.get("pid", 0))):
                states.append(state)
    return states


@contextmanager
def port_lock(state_dir: Path, port: int) -> Iterator[None]:
    """Hold `serve-<port>.lock` for the block; TextgateError if another supervisor holds it."""
    state_dir.mkdir(parents=True, exist_ok=True)
    path = state_dir / f"serve-{port}.lock"
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "?"
            raise TextgateError(
                f"another `textgate serve` (pid {holder}) already serves port {port}: stop it, "
                "or pass --port (serve.port) to serve on another"
            ) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, str(os.getpid()).encode(), 0)
        yield
    finally:
        os.close(fd)


def stop_leftovers(state: ServeState) -> int:
    """Stop the bento processes a killed supervisor recorded (same pid and start time)."""
    try:
        old = json.loads(state.path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return 0
    left = []
    for bento in old.get("bentos", []) if isinstance(old, dict) else []:
        for pid, started in bento.get("processes", []):
            with suppress(psutil.Error):
                process = psutil.Process(pid)
                if started is not None and abs(process.create_time() - started) < 0.01:
                    left.append(process)
    terminate_then_kill(left, STOP_GRACE_S)
    return len(left)


def listen(host: str, port: int) -> socket.socket:
    """The public socket, bound before any bento starts (a busy port fails first)."""
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as error:
        sock.close()
        raise TextgateError(
            f"cannot listen on {host}:{port}: {error.strerror}; another program uses the port: "
            "stop it, or pass --port (serve.port)"
        ) from None
    sock.listen(2048)
    sock.set_inheritable(False)
    return sock


def open_port(
    host: str, port: int, say: Callable[[str], None]
) -> tuple[socket.socket, Steering | None]:
    """The public port: a steered SO_REUSEPORT group (textgate.reuseport) where the kernel
    allows, so bentos take their connections directly; else one socket for the proxy."""
    listen(host, port).close()  # a busy port fails here, with the message that says so
    try:
        steering = Steering.open(host, port)
    except SteeringUnavailable as error:
        say(f"textgate: serve: every request goes through the proxy: {error}")
        return listen(host, port), None
    except OSError as error:
        raise TextgateError(f"cannot listen on {host}:{port}: {error}") from None
    return steering.proxy, steering


def new_event_loop() -> asyncio.AbstractEventLoop:
    """The proxy's event loop: uvloop's where it is installed (not on Windows).

    uvloop (libuv, as Node.js uses) runs the proxy's I/O in C: the supervisor spent about 20%
    less CPU per proxied request with it than with asyncio's own loop (0.42 against 0.52 ms
    in a paired run over bench/serve.py's alternating rounds; README "Following production").
    """
    try:
        import uvloop
    except ImportError:
        return asyncio.new_event_loop()
    return uvloop.new_event_loop()


class ProxyThread:
    """The proxy's aiohttp server on the public socket, in a thread with its own loop."""

    def __init__(self, proxy: Proxy, sock: socket.socket) -> None:
        from aiohttp import web

        self.proxy = proxy
        self.loop = new_event_loop()

        async def start() -> web.ServerRunner:  # aiohttp's server is made in its loop
            runner = web.ServerRunner(proxy.server(), handle_signals=False)
            await runner.setup()
            await web.SockSite(runner, sock).start()
            return runner

        self.runner = self.loop.run_until_complete(start())
        self.thread = threading.Thread(
            target=self.loop.run_forever, name="textgate-proxy", daemon=True
        )
        self.thread.start()

    def call(self, coroutine: Any, timeout_s: float | None = None) -> Any:
        """Run `coroutine` in the proxy's loop; its result."""
        return asyncio.run_coroutine_threadsafe(coroutine, self.loop).result(timeout_s)

    def adopt(self, connections: list[socket.socket]) -> None:
        """Serve connections accepted elsewhere (what waited in a freed slot's queue)."""
        if not connections:
            return
        server = self.runner.server
        assert server is not None

        async def adopt_all() -> None:
            for connection in connections:
                try:
                    await self.loop.connect_accepted_socket(server, connection)
                except OSError:
                    connection.close()

        self.call(adopt_all(), timeout_s=10)

    def stop(self) -> None:
        with suppress(Exception):  # stopping: what is left goes with the process
            self.call(self.runner.cleanup(), timeout_s=10)
            self.call(self.proxy.close(), timeout_s=10)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(timeout=10)


Alert = Callable[[str, str], None]
CheckServable = Callable[[Release], None]


class Supervisor:
    """Serves production through the proxy and follows the registry (module docstring)."""

    def __init__(self, options: ServeOptions, alert: Alert, servable: CheckServable) -> None:
        self.options = options
        self.alert = alert
        self.servable = servable
        self.proxy = Proxy()
        self.state = ServeState(options.state_dir, options.port)
        self.workdir = Path(tempfile.mkdtemp(prefix="textgate-serve-"))
        self.serving: Served | None = None
        self.candidates: list[Served] = []
        self.tried: tuple[str, str] | None = None  # the release last switched to, or tried
        self.problem: str | None = None
        self.shadowing: Served | None = None
        self.shadow_tried: tuple[str, str] | None = None
        self.standby: Served | None = None
        self.standby_until = 0.0
        self.steering: Steering | None = None  # None: every connection goes to the proxy

    def run(self, on_ready: Callable[[str], None] = print) -> None:
        """Serve until a signal; TextgateError if the first production bento cannot serve."""
        options = self.options
        with port_lock(options.state_dir, options.port):
            stopped = stop_leftovers(self.state)
            if stopped:
                on_ready(f"stopped {stopped} bento process(es) a killed `textgate serve` left")
            self.state.write()
            sock, self.steering = open_port(options.host, options.port, on_ready)
            proxy_thread = ProxyThread(self.proxy, sock)
            try:
                self._serve(proxy_thread, on_ready)
            finally:
                proxy_thread.stop()
                for served in self._running():
                    served.stop()
                if self.steering is not None:
                    self.steering.close()
                sock.close()
                self.state.write(serving=None, bentos=[])

    def _serve(self, proxy_thread: ProxyThread, on_ready: Callable[[str], None]) -> None:
        self.proxy_thread = proxy_thread
        release = self.options.registry.production()
        if release is None:
            raise TextgateError("no production model to serve: run `textgate run` first")
        self.switch(release)
        if self.serving is None:
            raise TextgateError(f"cannot serve production {release.bento_tag}: {self.problem}")
        where = f"http://{self.options.host}:{self.options.port}"
        on_ready(f"textgate serves {self.serving.tag} on {where}, following the registry")
        while True:
            time.sleep(self.options.poll_s)
            self.follow()

    def follow(self) -> None:
        """One poll: replace a dead serving bento; switch if production changed."""
        if self.serving is not None and not self.serving.process.running():
            self._serving_died()
        if self.standby is not None and time.monotonic() >= self.standby_until:
            self._stop(self.standby)
            self.standby = None
            self._record()
        try:
            release = self.options.registry.production()
        except RegistryError as error:
            problem = f"{error}; still serving {self._serving_tag()}"
            if self.problem != problem:
                self._fail(None, problem)
            return
        if self.problem is not None and self.problem.startswith("registry "):
            print("textgate: serve: the registry is readable again", flush=True)
            self._record(problem=None)
        if release is not None and _key(release) != self.tried:
            self.switch(release)
        if self.options.shadow:
            self.follow_shadow()

    def _serving_died(self) -> None:
        """Back to the standby bento if there is one (the release that died is not tried
        again until production changes); else start production again."""
        dead, self.serving = self.serving, None
        assert dead is not None
        self._via_proxy()
        why = f"{dead.tag} exited (code {dead.process.popen.returncode})"
        standby, self.standby = self.standby, None
        if standby is not None and standby.process.running():
            self.serving = standby
            self.proxy_thread.call(self.proxy.switch(standby.backend))
            self._direct(standby)
            self._stop(dead)  # its workers, and what waits in its slot's queue
            self._fail(dead.release, f"{why}; back to serving {standby.tag}")
            return
        if dead.slot is not None:  # on a slot, a dead bento's connections wait, unrefused
            self.proxy_thread.call(self.proxy.switch(None))
        self._stop(dead)
        self._fail(dead.release, why)
        self.tried = None  # start production again

    def follow_shadow(self) -> None:
        """Start the shadow candidate `textgate shadow` named, or stop the one no longer named."""
        try:
            target = read_shadow_target(self.options.state_dir)
        except TextgateError as error:
            target = None
            if self.problem != str(error):
                self._fail(None, str(error))
        key = _key(target) if target is not None else None
        if key == self.shadow_tried:
            return
        self.shadow_tried = key
        if self.shadowing is not None:
            old, self.shadowing = self.shadowing, None
            self.proxy_thread.call(self._set_shadow(None))
            self._stop(old)
        if target is None:
            self._direct(self.serving)
            return
        try:
            self.shadowing = self._start_checked(target)
        except (TextgateError, OSError) as error:
            self._fail(target, f"shadow candidate not started: {error}")
            self._direct(self.serving)
            return
        # Mirrored requests go through the proxy: so does all traffic while it lasts.
        self._via_proxy()
        self._shed(self.serving)
        sink = shadow_sink(self.options.state_dir / SHADOW_LOG)
        shadow = Shadow(self.shadowing.backend, sink, self.options.shadow_sample_rate)
        self.proxy_thread.call(self._set_shadow(shadow))
        self._record()
        print(f"textgate: {target.bento_tag} answers in shadow", flush=True)

    async def _set_shadow(self, shadow: Shadow | None) -> None:
        previous, self.proxy.shadow = self.proxy.shadow, shadow
        if previous is not None:
            await self.proxy.drain(previous.backend, self.options.drain_timeout_s)

    def switch(self, release: Release) -> bool:
        """Start `release`'s bento, check it, send traffic to it, drain and stop the old one."""
        self.tried = _key(release)
        if self.serving is not None and self.serving.tag == release.bento_tag:
            self.serving.release = release
            self._record(problem=None)  # production is served (again)
            return True
        started = time.monotonic()
        try:
            candidate = self._start_checked(release)
        except (TextgateError, OSError) as error:
            self._fail(release, f"{error}; still serving {self._serving_tag()}")
            return False
        previous = self.serving
        if previous is not None:  # its clients move to the proxy, which switches per request
            self._via_proxy()
            self._shed(previous)
        self.serving = candidate
        old = self.proxy_thread.call(self.proxy.switch(candidate.backend))
        self._record(problem=None)
        if old is not None:  # a dead bento's pool is closed too
            self.proxy_thread.call(self.proxy.drain(old, self.options.drain_timeout_s))
        self._direct(candidate)
        if self.standby is not None:
            self._stop(self.standby)
        self.standby, self.standby_until = previous, time.monotonic() + self.options.standby_s
        self._record()
        print(
            f"textgate: now serving {release.bento_tag} "
            f"({time.monotonic() - started:.1f} s after the registry change was seen)",
            flush=True,
        )
        return True

    def _start_checked(self, release: Release) -> Served:
        """The release's bento, started and checked; SwitchError (and nothing left) if not."""
        try:
            self.servable(release)
        except TextgateError as error:
            raise SwitchError(str(error)) from None
        cache = self.options.state_dir / "serve-golden"
        with offline_answers(release.bento_tag, self.options, cache) as golden:
            served = self._launch(release)
            self.candidates.append(served)  # recorded at once: a crash here leaves no orphan
            self._record()
            try:
                wait_bento_ready(served, self.options.ready_timeout_s)
                self._record()  # with its workers
                check_answers(served, golden(), self.options.score_tolerance)
            except (TextgateError, ServedCheckError, OSError, ValueError) as error:
                self._stop(served)
                raise SwitchError(str(error)) from None
            finally:
                self.candidates.remove(served)
        return served

    def _launch(self, release: Release) -> Served:
        if self.steering is None:
            return launch_bento(release, self.options, self.workdir)
        slot = self.steering.take()
        try:
            return launch_bento(release, self.options, self.workdir, slot)
        except BaseException:
            self._give_back(slot)
            raise

    def _stop(self, served: Served) -> None:
        """Stop a bento; its slot is free again, and what waited in its queue goes to the
        proxy."""
        served.stop()
        if served.slot is not None:
            self._give_back(served.slot)

    def _give_back(self, slot: Slot) -> None:
        assert self.steering is not None
        if self.steering.default is slot:
            self._via_proxy()
        self.proxy_thread.adopt(self.steering.give_back(slot))

    def _direct(self, served: Served | None) -> None:
        """New connections straight to `served`'s slot (none while a shadow is mirrored)."""
        if served is None or served.slot is None or self.shadowing is not None:
            return
        served.shed(False)
        self._route(served.slot)

    def _via_proxy(self) -> None:
        """New connections to the proxy (which switches per request)."""
        if self.steering is not None and self.steering.default is not None:
            self._route(None)

    def _route(self, slot: Slot | None) -> None:
        """Steer new connections to `slot` (None: the proxy). While they go to a slot, the
        proxy's answers close their connections, so its clients move there too."""
        assert self.steering is not None
        self.steering.route(slot)
        self.proxy.release = slot is not None
        self._record()

    def _shed(self, served: Served | None) -> None:
        """Move `served`'s direct clients to the proxy: each gets one more answer with
        `Connection: close` (an idle one is closed by the bento's keep-alive timeout);
        wait until none is left, or `serve.drain_timeout_s`."""
        if served is None or served.slot is None:
            return
        served.shed(True)
        deadline = time.monotonic() + self.options.drain_timeout_s
        while served.direct_clients() and time.monotonic() < deadline:
            time.sleep(0.02)

    def _fail(self, release: Release | None, problem: str) -> None:
        self._record(problem=problem, problem_at=now())  # first: status says so at once
        print(f"textgate: serve: {problem}", file=sys.stderr, flush=True)
        subject = f"textgate serve: {release.bento_tag if release else 'registry'} not served"
        self.alert(subject, problem)

    def _connections(self) -> str:
        """Where new connections go, for `textgate status`."""
        if self.steering is None:
            return "proxy"  # every request through the proxy (the port is not steered)
        return "proxy" if self.steering.default is None else "direct"

    def _serving_tag(self) -> str:
        return self.serving.tag if self.serving else "nothing"

    def _running(self) -> list[Served]:
        others = [s for s in (self.serving, self.shadowing, self.standby) if s is not None]
        return [*self.candidates, *others]

    def _record(self, **changes: Any) -> None:
        if "problem" in changes:
            self.problem = changes["problem"]
        running = self._running()
        changes["shadow"] = self.shadowing.tag if self.shadowing else None
        changes["connections"] = self._connections()
        serving = self.serving.tag if self.serving else None
        if serving != self.state.data.get("serving"):
            changes["since"] = now()
        self.state.write(serving=serving, bentos=[s.record() for s in running], **changes)


def _key(release: Release) -> tuple[str, str]:
    return (release.bento_tag, release.promoted_at.isoformat())


def main(argv: list[str]) -> int:
    """`python -m flows.serving BENTO_TAG TEXTS_JSON OUT_JSON`: the bento's model's offline
    answer to each text, one at a time (as the switch check sends them), as a golden file."""
    import bentoml

    from tasks.package import local_bento
    from tasks.served import write_golden
    from textgate.runtime import load_classifier

    bento_tag, texts_path, out = argv
    texts = json.loads(Path(texts_path).read_text(encoding="utf-8"))
    model_tag = str(local_bento(bento_tag).info.all_models[0].tag)
    runtime = os.environ.get("TEXTGATE_RUNTIME", "").strip() or "auto"
    classifier = load_classifier(bentoml.models.get(model_tag).path, runtime=runtime, threads=1)
    cases = []
    for text in texts:
        prediction = classifier.predict([text], batch_size=1)[0]
        cases.append(GoldenCase(text=text, label=prediction.label, score=prediction.score))
    write_golden(out, cases)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
