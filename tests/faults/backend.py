"""A backend for fault tests, run as its own process so a test can kill or stop it alone.

``python -m tests.faults.backend --port P`` serves HTTP/1.1 (keep-alive) on 127.0.0.1:

- ``GET /`` answers ``backend P``;
- ``GET /health`` answers 200, or 503 after ``GET /fail`` (``GET /recover`` undoes it);
- ``GET /slow?ms=N`` answers after N milliseconds;
- ``GET /big?bytes=N`` streams N bytes as fast as the client takes them (flow-controlled).
"""

from __future__ import annotations

import argparse
import sys
from typing import Any, List, Optional

from twisted.internet import interfaces
from twisted.web import resource, server
from zope.interface import implementer

CHUNK = b"x" * 65536


@implementer(interfaces.IPushProducer)
class _Stream:
    """Writes ``left`` bytes to a request, pausing when the client stops reading."""

    def __init__(self, request: Any, left: int) -> None:
        self.request = request
        self.left = left
        self.paused = False
        self.done = False
        request.registerProducer(self, True)
        request.notifyFinish().addBoth(self._gone)
        self.resumeProducing()

    def _gone(self, _: Any) -> None:
        self.done = True

    def pauseProducing(self) -> None:
        self.paused = True

    def resumeProducing(self) -> None:
        self.paused = False
        while not self.paused and not self.done and self.left > 0:
            n = min(self.left, len(CHUNK))
            self.left -= n
            self.request.write(CHUNK[:n])
        if self.left == 0 and not self.done:
            self.done = True
            self.request.unregisterProducer()
            self.request.finish()

    def stopProducing(self) -> None:
        self.done = True


class Backend(resource.Resource):
    isLeaf = True

    def __init__(self, name: str, reactor: Any) -> None:
        super().__init__()
        self.name = name
        self.reactor = reactor
        self.healthy = True

    def render_GET(self, request: Any) -> Any:
        path = request.path
        if path == b"/health":
            if not self.healthy:
                request.setResponseCode(503)
                return b"unhealthy\n"
            return b"ok\n"
        if path in (b"/fail", b"/recover"):
            self.healthy = path == b"/recover"
            return f"healthy={self.healthy}\n".encode()
        if path == b"/slow":
            ms = int(request.args.get(b"ms", [b"500"])[0])
            call = self.reactor.callLater(ms / 1000, self._finish_slow, request)
            request.notifyFinish().addErrback(lambda _: call.active() and call.cancel())
            return server.NOT_DONE_YET
        if path == b"/big":
            size = int(request.args.get(b"bytes", [b"1048576"])[0])
            request.setHeader(b"content-length", str(size).encode())
            _Stream(request, size)
            return server.NOT_DONE_YET
        return f"backend {self.name}\n".encode()

    def _finish_slow(self, request: Any) -> None:
        request.write(f"backend {self.name} (slow)\n".encode())
        request.finish()


def main(argv: Optional[List[str]] = None) -> int:
    from twisted.internet import reactor

    parser = argparse.ArgumentParser(prog="python -m tests.faults.backend")
    parser.add_argument("--port", type=int, required=True)
    args = parser.parse_args(argv)
    site = server.Site(Backend(str(args.port), reactor))
    site.noisy = False
    site.log = lambda request: None  # no access log line per request
    reactor.listenTCP(args.port, site, interface="127.0.0.1", backlog=1024)
    print(f"fault backend on 127.0.0.1:{args.port}", flush=True)
    reactor.run()
    return 0


if __name__ == "__main__":
    sys.exit(main())
