"""twistd glue: ``twistd -n lb -c etc/lb.yaml``. The only module that imports the reactor."""

from __future__ import annotations

import signal
import sys
from typing import Any

from twisted.application.service import IService
from twisted.internet.interfaces import IReactorFromThreads
from twisted.python import usage

from lb import config as lbconfig
from lb.service import LBService, ReloadError


class Options(usage.Options):
    optParameters = [["config", "c", "etc/lb.yaml", "The YAML config file."]]


def makeService(options: Options) -> IService:
    if "twisted.internet.reactor" not in sys.modules:  # no --reactor given: lb's own
        from lb import reactor as lbreactor
        lbreactor.install()
    from twisted.internet import reactor

    try:
        config = lbconfig.load(options["config"])
    except lbconfig.ConfigError as e:
        for line in e.lines():
            print(line, file=sys.stderr)
        raise SystemExit(1) from None
    try:
        service = LBService(config, reactor)
    except ReloadError as e:  # a config this process cannot run (mode http, another reactor)
        print(f"{config.path}: {e}", file=sys.stderr)
        raise SystemExit(1) from None
    threads = IReactorFromThreads(reactor)  # the global reactor's static type lacks it

    def on_hup(signum: int, frame: Any) -> None:
        threads.callFromThread(service.reload)

    signal.signal(signal.SIGHUP, on_hup)
    return service
