"""Demo backends for the README's run command and for process-level tests.

``python -m lb.demo --ports 9001,9002 [--consul URL --register 9003,9004 --service web]
[--announce 9005 --announce-service api --announce-tag 'urlprefix-/api strip=/api']``
serves small HTTP backends on 127.0.0.1 that answer ``GET /`` with their own address and
``GET /health`` with 200, and optionally registers some of them in a Consul agent (with an
HTTP check) until stopped: ``--register`` as instances of ``--service``, ``--announce`` as
instances of ``--announce-service`` carrying a route tag for http listeners.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any, List, NoReturn, Optional

from twisted.internet import defer, task
from twisted.web import resource, server


class Backend(resource.Resource):
    isLeaf = True

    def __init__(self, name: str) -> None:
        resource.Resource.__init__(self)
        self.name = name
        self.healthy = True

    def render_GET(self, request: Any) -> bytes:
        request.setHeader(b"content-type", b"text/plain")
        if request.path == b"/health":
            if not self.healthy:
                request.setResponseCode(503)
                return b"unhealthy\n"
            return b"ok\n"
        if request.path == b"/fail":  # flips health: lets a demo show a check failing
            self.healthy = not self.healthy
            return f"healthy={self.healthy}\n".encode()
        path = request.path.decode("latin-1")
        where = "" if path == "/" else f" (path {path})"  # shows what strip= removed
        return f"hello from backend {self.name}{where}\n".encode()


def _ports(text: str) -> List[int]:
    return [int(p) for p in text.split(",") if p.strip()]


@defer.inlineCallbacks
def _register(reactor: Any, consul: str, service: str, ports: List[int],
              tags: Optional[List[str]] = None) -> Any:
    import treq

    for port in ports:
        body = {
            "ID": f"{service}-{port}", "Name": service, "Address": "127.0.0.1", "Port": port,
            "Tags": tags or [],
            "Check": {"HTTP": f"http://127.0.0.1:{port}/health", "Interval": "2s",
                      "Timeout": "1s"},
        }
        response = yield treq.put(f"{consul}/v1/agent/service/register",
                                  data=json.dumps(body).encode())
        yield response.content()
        if response.code != 200:
            raise RuntimeError(f"Consul refused registration of port {port}: {response.code}")
        print(f"registered {service}-{port} in Consul at {consul}", flush=True)


@defer.inlineCallbacks
def _deregister(consul: str, service: str, ports: List[int]) -> Any:
    import treq

    for port in ports:
        try:
            response = yield treq.put(f"{consul}/v1/agent/service/deregister/{service}-{port}")
            yield response.content()
        except Exception:
            pass


def serve(reactor: Any, argv: Optional[List[str]] = None) -> defer.Deferred[None]:
    """Run the demo on ``reactor`` until it stops (SIGTERM, SIGINT)."""
    parser = argparse.ArgumentParser(prog="python -m lb.demo", description=__doc__)
    parser.add_argument("--ports", default="9001,9002", help="backends to serve")
    parser.add_argument("--register", default="", help="ports to serve AND register in Consul")
    parser.add_argument("--consul", default="http://127.0.0.1:8500")
    parser.add_argument("--service", default="web")
    parser.add_argument("--announce", default="",
                        help="ports to serve AND register as --announce-service with the "
                             "route tag --announce-tag (for an http listener's consul_routes)")
    parser.add_argument("--announce-service", default="api")
    parser.add_argument("--announce-tag", default="urlprefix-/api strip=/api")
    args = parser.parse_args(argv)
    served = _ports(args.ports)
    registered = _ports(args.register)
    announced = _ports(args.announce)
    for port in served + registered + announced:
        reactor.listenTCP(port, server.Site(Backend(f"127.0.0.1:{port}")),
                          interface="127.0.0.1")
        print(f"demo backend listening on 127.0.0.1:{port}", flush=True)

    def failed(f: Any) -> None:
        print(f"demo: {f.getErrorMessage()}", file=sys.stderr, flush=True)

    for service, ports, tags in ((args.service, registered, []),
                                 (args.announce_service, announced, [args.announce_tag])):
        if ports:
            _register(reactor, args.consul, service, ports, tags).addErrback(failed)
            reactor.addSystemEventTrigger("before", "shutdown", _deregister, args.consul,
                                          service, ports)
    return defer.Deferred()  # never fires: the signal that stops the reactor ends the demo


def main(argv: Optional[List[str]] = None) -> NoReturn:
    # react() runs the reactor for serve(); registrations are removed on the way out, and it
    # exits the process
    task.react(serve, [argv])


if __name__ == "__main__":
    main()
