"""The reactor lb runs on: Twisted's epoll reactor, sharing its epoll set with the pump.

The pump (``lb/proxy/carriers/pump.py``) moves the bytes of joined connections outside Twisted's
per-event dispatch. As one more reader nested in the reactor, it cost a second epoll_wait and a
pass through Twisted's logging-context wrappers on every wakeup. Here the pump's sockets sit in
the reactor's own epoll set: one epoll_wait per loop serves both, and the events whose file
descriptor Twisted does not know go to the pump in one call.

``lb/tap.py`` installs it unless twistd was told to use another reactor (then the proxy falls
back to Twisted's transports); the tests install it in ``tests/conftest.py``.
"""

from __future__ import annotations

from typing import Callable, List, Optional, Tuple

from twisted.internet.epollreactor import EPollReactor
from twisted.internet.main import installReactor
from twisted.python import log

from lb.proxy.carriers.pump import Pump

PUMP_EVENTS = 256  # pump events taken per wakeup, besides one per Twisted selectable

Events = List[Tuple[int, int]]


class Reactor(EPollReactor):
    """An EPollReactor whose poll also serves the pump's sockets. It makes its one pump (a
    reactor's epoll set can feed one pump), which the composition root hands to listeners."""

    def __init__(self) -> None:
        EPollReactor.__init__(self)
        self.pump_events: Optional[Callable[[Events], None]] = None
        self._pump: Optional[Pump] = None

    @property
    def pump(self) -> Pump:
        if self._pump is None:
            self._pump = Pump(self)
        return self._pump

    def share_poller(self, handler: Callable[[Events], None]) -> object:
        """Hand events on descriptors Twisted does not track to ``handler``; the caller
        registers those descriptors in the returned epoll object itself."""
        self.pump_events = handler
        return self._poller

    def doPoll(self, timeout: Optional[float]) -> None:
        try:
            events = self._poller.poll(-1 if timeout is None else timeout,
                                       len(self._selectables) + PUMP_EVENTS)
        except InterruptedError:
            return
        selectables = self._selectables
        pump = []
        for fd, event in events:
            selectable = selectables.get(fd)
            if selectable is None:
                pump.append((fd, event))
            else:
                log.callWithLogger(selectable, self._doReadOrWrite, selectable, fd, event)
        if pump and self.pump_events is not None:
            self.pump_events(pump)

    doIteration = doPoll


def install() -> Reactor:
    """Install lb's reactor as the global one (before anything imports
    ``twisted.internet.reactor``)."""
    reactor = Reactor()
    installReactor(reactor)
    return reactor
