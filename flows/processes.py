"""Every process a textgate command starts stops when the command stops, whatever the signal.

SIGTERM, SIGINT and SIGHUP (`stop_on_signals`): the command unwinds with exit status
128 + signum, as if the signal had killed it, but first Prefect records the flow run as
crashed and `finally` blocks run; at exit every process below it (the temporary Prefect
server, `dvc repro` and its stage, `bentoml serve`) is stopped. SIGKILL cannot be caught: on Linux
the processes textgate starts itself (the temporary server, `dvc repro`) are sent SIGTERM by
the kernel when it dies (`die_with_parent`); their own children are theirs to stop.
"""

from __future__ import annotations

import atexit
import ctypes
import ctypes.util
import os
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from types import FrameType

import psutil

from textgate.process import terminate_then_kill

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)
# How long each process gets to exit after SIGTERM before it is killed.
STOP_TIMEOUT_S = 5.0
# After a signal, how long the command may unwind (Prefect reports the crash to its server,
# which can retry) before its processes are stopped and it exits regardless.
UNWIND_TIMEOUT_S = 20.0

_PR_SET_PDEATHSIG = 1  # <linux/prctl.h>


def stop_descendants(timeout_s: float = STOP_TIMEOUT_S) -> None:
    """SIGTERM every process below this one, then SIGKILL those alive after `timeout_s`.

    The whole tree is listed first, so a child's children are stopped even once the child
    is gone and they have been re-parented.
    """
    with suppress(psutil.Error):
        terminate_then_kill(psutil.Process().children(recursive=True), timeout_s)


def _stop_now(signum: int) -> None:
    stop_descendants()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(128 + signum)


def _stop_after_unwind_timeout(signum: int) -> None:
    time.sleep(UNWIND_TIMEOUT_S)
    print(
        f"textgate: still stopping {UNWIND_TIMEOUT_S:.0f} s after signal {signum}: exiting now",
        file=sys.stderr,
    )
    _stop_now(signum)


@contextmanager
def stop_on_signals() -> Iterator[None]:
    """Within the block, SIGTERM, SIGINT and SIGHUP raise SystemExit(128 + signum); once one
    has, every process below this one is stopped at exit.

    At exit, not on leaving the block: Prefect first sends its last logs to the temporary
    server, which is stopped after that (flows/server.py). A second signal, or an unwind
    longer than UNWIND_TIMEOUT_S, stops them and exits at once. Outside the main thread
    (where handlers cannot be set) the block runs as it is.
    """
    received: list[int] = []

    def handle(signum: int, frame: FrameType | None) -> None:
        if received:
            _stop_now(signum)
        received.append(signum)
        threading.Thread(target=_stop_after_unwind_timeout, args=(signum,), daemon=True).start()
        raise SystemExit(128 + signum)

    def stop_if_signalled() -> None:
        if received:
            stop_descendants()

    try:
        previous = {signum: signal.signal(signum, handle) for signum in STOP_SIGNALS}
    except ValueError:  # not the main thread
        yield
        return
    # Registered before the temporary server's and Prefect's exit handlers: runs after them.
    atexit.register(stop_if_signalled)
    try:
        yield
    finally:
        if not received:  # signalled, the handlers stay: a second signal stops at once
            atexit.unregister(stop_if_signalled)
            for signum, handler in previous.items():
                signal.signal(signum, handler)


def _load_prctl() -> Callable[..., int] | None:
    if not sys.platform.startswith("linux"):
        return None
    try:
        return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True).prctl
    except (OSError, AttributeError):
        return None


def die_with_parent() -> Callable[[], None] | None:
    """A `preexec_fn` that has the kernel send the child SIGTERM when textgate dies, even of
    SIGKILL (Linux; None elsewhere).

    The signal comes when the thread that started the child ends: start long-lived children
    from the main thread.
    """
    prctl = _load_prctl()  # resolved here: the child, a fork of a threaded process, only calls
    if prctl is None:
        return None
    parent = os.getpid()

    def preexec() -> None:
        prctl(_PR_SET_PDEATHSIG, int(signal.SIGTERM))
        if os.getppid() != parent:  # textgate died before the request was made
            os.kill(os.getpid(), signal.SIGTERM)

    return preexec
