"""`bentoml serve` on a listening socket it is handed: a slot of textgate.reuseport.

    python bento_launch.py FD serve BENTO_TAG --host HOST --port PORT ...

BentoML's `serve` binds its API socket itself (circus' CircusSocket, shared by its workers).
This launcher has that socket made from descriptor FD instead, already bound to the public
port and listening in the supervisor's SO_REUSEPORT group, and then runs BentoML's own
command line with the rest of the arguments. `textgate serve` runs a copy of this file as a
script, not as part of the textgate package: a bento is served with its own code only.
"""

import os
import socket
import stat
import sys

import circus.sockets

API_SOCKET = "_bento_api_server"  # _bentoml_impl.server.serving.API_SERVER_NAME (BentoML 1.4)


def socket_class(fd: int) -> type:
    base = circus.sockets.CircusSocket

    class HandedSocket(base):
        """CircusSocket of the API server made from `fd`; any other as circus makes it."""

        def __init__(self, name="", *args, **kwargs):
            if name != API_SOCKET:
                super().__init__(name, *args, **kwargs)
                return
            socket.socket.__init__(self, fileno=os.dup(fd))
            self.name, self.socktype, self.path = name, socket.SOCK_STREAM, None
            self.umask, self.replace, self.interface = None, False, None
            self.is_unix, self.so_reuseport, self.blocking = False, False, False
            self.host, self.port = self.getsockname()[:2]
            self.backlog = kwargs.get("backlog", 2048)
            self.handed = True
            self.set_inheritable(True)

        def bind_and_listen(self):
            if getattr(self, "handed", False):  # bound and listening already
                self.setblocking(False)
                return
            super().bind_and_listen()

        def close(self):
            socket.socket.close(self)
            if self.path and os.path.exists(self.path):
                os.remove(self.path)

    return HandedSocket


def main(argv):
    fd, rest = int(argv[0]), argv[1:]
    if not stat.S_ISSOCK(os.fstat(fd).st_mode):
        raise SystemExit(f"descriptor {fd} is not a socket")
    circus.sockets.CircusSocket = socket_class(fd)
    sys.argv = ["bentoml", *rest]
    from bentoml_cli.cli import cli

    cli()


if __name__ == "__main__":
    main(sys.argv[1:])
