"""textgate.reuseport: the public port as an SO_REUSEPORT group steered by a BPF program,
with real sockets on loopback."""

from __future__ import annotations

import os
import select
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from textgate.process import free_port
from textgate.reuseport import SLOTS, Steering, SteeringUnavailable

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="Linux only")


@pytest.fixture
def steering() -> Iterator[Steering]:
    steering = Steering.open("127.0.0.1", free_port())
    try:
        yield steering
    finally:
        steering.close()


def landed(steering: Steering, source: str) -> socket.socket:
    """Connect from `source`; the group's socket the connection reached (accepted, closed)."""
    members = [steering.proxy, *(slot.sock for slot in steering.slots)]
    with socket.create_connection(("127.0.0.1", steering.port), source_address=(source, 0)):
        ready, _, _ = select.select(members, [], [], 2.0)
        assert len(ready) == 1, ready
        ready[0].accept()[0].close()
        return ready[0]


def test_new_connections_go_where_they_are_steered_and_slot_sources_to_their_slot(
    steering: Steering,
) -> None:
    assert len(steering.slots) == SLOTS
    first, second = steering.slots[0], steering.slots[1]
    assert [landed(steering, "127.0.0.1") for _ in range(5)] == [steering.proxy] * 5
    steering.route(second)
    assert [landed(steering, "127.0.0.1") for _ in range(5)] == [second.sock] * 5
    assert landed(steering, first.source) is first.sock  # checks reach a slot unsteered
    assert landed(steering, second.source) is second.sock
    steering.route(None)
    assert landed(steering, "127.0.0.1") is steering.proxy


def test_a_port_another_program_shares_is_not_steered() -> None:
    port = free_port()
    foreign = socket.socket()
    foreign.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    foreign.bind(("127.0.0.1", port))
    foreign.listen()
    try:
        with pytest.raises(SteeringUnavailable, match="did not reach the socket"):
            Steering.open("127.0.0.1", port)
    finally:
        foreign.close()


def test_only_ipv4_hosts_are_steered() -> None:
    with pytest.raises(SteeringUnavailable, match="not an IPv4 address"):
        Steering.open("::1", free_port())
    for host in ("0.0.0.0", "localhost"):  # reached on loopback
        Steering.open(host, free_port()).close()


def test_slots_are_lent_once_and_a_freed_slot_hands_over_its_waiting_clients(
    steering: Steering,
) -> None:
    slots = [steering.take() for _ in range(SLOTS)]
    with pytest.raises(Exception, match="slots of the port are in use"):
        steering.take()
    slot = slots[1]
    steering.route(slot)
    client = socket.create_connection(("127.0.0.1", steering.port))
    own = socket.create_connection(("127.0.0.1", steering.port), source_address=(slot.source, 0))
    try:
        select.select([slot.sock], [], [], 2.0)
        waiting = steering.give_back(slot)
        assert steering.default is None  # nothing new goes to a freed slot
        assert [c.getpeername() for c in waiting] == [client.getsockname()]
        own.settimeout(2.0)
        assert own.recv(1) == b""  # the supervisor's own connection is closed, not handed on
        assert steering.take() is slot
        for connection in waiting:
            connection.close()
    finally:
        client.close()
        own.close()


def test_the_launcher_refuses_a_descriptor_that_is_not_a_socket() -> None:
    launcher = Path(__file__).resolve().parents[2] / "textgate" / "bento_launch.py"
    with open(os.devnull, "rb") as devnull:
        done = subprocess.run(
            [sys.executable, str(launcher), "0", "serve", "textgate:any"],
            stdin=devnull,
            capture_output=True,
            text=True,
            timeout=60,
        )
    assert done.returncode == 1
    assert "descriptor 0 is not a socket" in done.stderr
