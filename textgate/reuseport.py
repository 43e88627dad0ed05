"""The public port as a Linux SO_REUSEPORT group steered by a classic-BPF program.

`textgate serve` binds the public port several times with SO_REUSEPORT: once for its own
proxy (index 0 of the group), and once per *slot*, a listening socket handed to a
`bentoml serve` (textgate.bento_launch) as the socket its workers accept on. The kernel picks
the socket of each new connection by running the program the supervisor attached to the
group (SO_ATTACH_REUSEPORT_CBPF), so:

- in steady state new connections go straight to the serving bento's slot: no process
  between the client and the bento, no CPU spent following production;
- during a switch (or while a shadow candidate is mirrored) they go to the proxy, which
  switches per request;
- connections from a slot's own loopback source address (`Slot.source`, 127.0.0.2 and up)
  always reach that slot: the supervisor checks a candidate, and the proxy forwards to a
  bento, through them, on the same public port.

The group's order is the order the sockets started listening, and it changes when one is
closed; so all of them are opened at start, in order, checked (`Steering.verify`), and kept
open until the supervisor stops: a slot is reused, never closed. A steered connection to a
slot whose bento has gone waits in the slot's queue until `Steering.take_pending` hands it
to the proxy.

IPv4 only (the program reads the IPv4 source address); `Steering.open` says why it cannot
steer elsewhere, and `textgate serve` then keeps every connection on its proxy.
"""

from __future__ import annotations

import ctypes
import ipaddress
import select
import socket
import struct
import sys
import time
from contextlib import suppress
from dataclasses import dataclass

from textgate.errors import TextgateError

SO_ATTACH_REUSEPORT_CBPF = 51  # asm-generic/socket.h (Linux 4.5)
SKF_NET_OFF = -0x100000  # classic BPF: offsets from the network header
_BPF_LD_W_ABS = 0x00 | 0x00 | 0x20
_BPF_JEQ_K = 0x05 | 0x10 | 0x00
_BPF_RET_K = 0x06 | 0x00
IPV4_SOURCE_OFFSET = 12
FIRST_SOURCE = ipaddress.IPv4Address("127.0.0.2")  # slot i's source is FIRST_SOURCE + i
PROXY_INDEX = 0
SLOTS = 4  # serving, candidate, standby, shadow: the most bentos a supervisor runs at once
BACKLOG = 2048
# The environment of a bento on a slot (read by bentos.service.ShedMiddleware): the file whose
# existence says "move directly connected clients off", and the supervisor's own address.
SHED_FILE_ENV = "TEXTGATE_SHED_FILE"
SUPERVISOR_ADDRESS_ENV = "TEXTGATE_SUPERVISOR_ADDRESS"


class SteeringUnavailable(TextgateError):
    """The public port cannot be steered here (not Linux, not IPv4, or the check failed)."""


def _instruction(code: int, jt: int, jf: int, k: int) -> bytes:
    return struct.pack("HBBI", code, jt, jf, k & 0xFFFFFFFF)


def steering_program(routes: dict[str, int], default: int) -> list[bytes]:
    """A classic-BPF program: a connection from source address `a` goes to group index
    `routes[a]`; any other to `default`."""
    program = [_instruction(_BPF_LD_W_ABS, 0, 0, SKF_NET_OFF + IPV4_SOURCE_OFFSET)]
    for address, index in routes.items():
        program.append(_instruction(_BPF_JEQ_K, 0, 1, int(ipaddress.IPv4Address(address))))
        program.append(_instruction(_BPF_RET_K, 0, 0, index))
    program.append(_instruction(_BPF_RET_K, 0, 0, default))
    return program


def attach_program(sock: socket.socket, program: list[bytes]) -> None:
    """Attach `program` to the SO_REUSEPORT group of `sock` (replacing the one it had)."""
    code = ctypes.create_string_buffer(b"".join(program))
    fprog = struct.pack("HL", len(program), ctypes.addressof(code))
    sock.setsockopt(socket.SOL_SOCKET, SO_ATTACH_REUSEPORT_CBPF, fprog)  # the kernel copies it


def _member(host: str, port: int) -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    sock.bind((host, port))
    sock.listen(BACKLOG)
    sock.setblocking(False)
    return sock


def connect_host(host: str) -> str:
    """The address to connect to for a server bound on `host` (the wildcard: loopback)."""
    return "127.0.0.1" if host in ("", "0.0.0.0", "localhost") else host


@dataclass(eq=False)
class Slot:
    """One listening socket of the group, lent to one bento at a time."""

    index: int
    sock: socket.socket
    in_use: bool = False

    @property
    def source(self) -> str:
        """The loopback source address whose connections always reach this slot."""
        return str(FIRST_SOURCE + (self.index - 1))


class Steering:
    """The public port's SO_REUSEPORT group: the proxy's socket and `SLOTS` slots."""

    def __init__(self, host: str, proxy: socket.socket, slots: list[Slot]) -> None:
        self.host = host
        self.proxy = proxy
        self.slots = slots
        self.port = proxy.getsockname()[1]
        self.default: Slot | None = None  # None: new connections go to the proxy
        self._steer()

    @classmethod
    def open(cls, host: str, port: int) -> Steering:
        """Bind the group on (host, port), steer everything to the proxy, and check it.

        Raises:
            SteeringUnavailable: not Linux, not an IPv4 host, or the kernel did not steer as
                programmed (the caller serves through its proxy alone).
            OSError: the port cannot be bound (the caller names the problem).
        """
        if not sys.platform.startswith("linux") or not hasattr(socket, "SO_REUSEPORT"):
            raise SteeringUnavailable("steering connections needs Linux")
        try:
            ipaddress.IPv4Address(connect_host(host))
        except ValueError:
            raise SteeringUnavailable(f"{host} is not an IPv4 address") from None
        proxy = _member(host, port)
        members = [proxy]
        try:
            try:
                attach_program(proxy, steering_program({}, PROXY_INDEX))
            except OSError as error:
                raise SteeringUnavailable(f"the kernel refused the program: {error}") from None
            port = proxy.getsockname()[1]
            members += [_member(host, port) for _ in range(SLOTS)]
            steering = cls(host, proxy, [Slot(i, s) for i, s in enumerate(members[1:], 1)])
            steering.verify()
        except BaseException:
            for sock in members:
                sock.close()
            raise
        return steering

    def _steer(self) -> None:
        routes = {slot.source: slot.index for slot in self.slots}
        default = PROXY_INDEX if self.default is None else self.default.index
        attach_program(self.proxy, steering_program(routes, default))

    def verify(self, timeout_s: float = 2.0) -> None:
        """Connect once from each slot's source and once from elsewhere; each must land on
        its socket (the group holds ours alone, in order). SteeringUnavailable if not."""
        target = (connect_host(self.host), self.port)
        expected = [(slot.source, slot.sock) for slot in self.slots]
        expected.append(("127.0.0.1", self.sock_of(self.default)))
        members = [self.proxy, *(slot.sock for slot in self.slots)]
        for source, sock in expected:
            with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as client:
                try:
                    client.bind((source, 0))
                    client.settimeout(timeout_s)
                    client.connect(target)
                except OSError as error:
                    raise SteeringUnavailable(f"cannot connect from {source}: {error}") from None
                deadline = time.monotonic() + timeout_s
                landed: list[socket.socket] = []
                while not landed and time.monotonic() < deadline:
                    landed, _, _ = select.select(members, [], [], 0.05)
                for member in landed:
                    with suppress(OSError):
                        member.accept()[0].close()
                if landed != [sock]:
                    raise SteeringUnavailable(
                        f"a connection from {source} did not reach the socket it was steered to "
                        "(another program shares the port?)"
                    )

    def sock_of(self, slot: Slot | None) -> socket.socket:
        return self.proxy if slot is None else slot.sock

    def take(self) -> Slot:
        """A free slot for a bento to listen on."""
        for slot in self.slots:
            if not slot.in_use:
                slot.in_use = True
                return slot
        raise TextgateError(f"all {len(self.slots)} bento slots of the port are in use")

    def give_back(self, slot: Slot) -> list[socket.socket]:
        """Free `slot` (its bento stopped); the clients' connections waiting in its queue,
        to be served elsewhere (the supervisor's own, from slot sources, are closed)."""
        if self.default is slot:
            self.route(None)
        slot.in_use = False
        sources = {s.source for s in self.slots}
        clients = []
        for connection, peer in self.take_pending(slot):
            if peer[0] in sources:
                connection.close()
            else:
                clients.append(connection)
        return clients

    @staticmethod
    def take_pending(slot: Slot) -> list[tuple[socket.socket, tuple[str, int]]]:
        """Accept what waits in `slot`'s queue, and from where each came."""
        pending = []
        while True:
            try:
                pending.append(slot.sock.accept())
            except OSError:  # BlockingIOError: nothing more
                return pending

    def route(self, slot: Slot | None) -> None:
        """New connections (other than the slots' own) go to `slot`, or to the proxy."""
        self.default = slot
        self._steer()

    def close(self) -> None:
        for sock in (self.proxy, *(slot.sock for slot in self.slots)):
            sock.close()
