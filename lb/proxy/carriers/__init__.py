"""Carriers: what moves a joined connection's bytes. Bytes only: they report raw facts
(bytes moved, a FIN, which side failed and how) to the session, which decides what they mean.

- ``pump``: lb's epoll loop, copy or splice(2), for sockets (the fast path).
- ``transports``: the same contract over two Twisted transports (anything that must see the
  bytes first, host-name peers, or a reactor other than lb's own).

The contract a carrier keeps with its session (``lb.proxy.session.Session``):

- it stamps ``session.last_active`` (reactor seconds) whenever either side is ready;
- ``session.moved_in(n)`` / ``session.moved_out(n)`` for every read (client -> peer / back);
- ``session.fin_received()`` when either side sends its FIN;
- exactly one ``session.carrier_closed(kind, side, answer_done, request_pending)`` when it has
  closed both sockets: ``kind`` is ``"done"`` (both directions finished), ``"reset"`` or
  ``"error"`` (``side`` = ``"client"`` or ``"peer"`` failed) or ``"aborted"`` (the session asked);
  ``answer_done``: the peer's FIN was passed to the client; ``request_pending``: client bytes had
  not all reached the peer;
- it offers ``abort()`` (close both now, with a reset) and ``buffered()`` (bytes held).

Before closing a pair because its peer failed, a carrier passes on to the client what the peer
had already sent and it still held.
"""

from __future__ import annotations

from typing import Optional, Protocol


class CarrierEvents(Protocol):
    """What a carrier reports to its session (the contract above)."""

    last_active: float
    half_closed: bool

    def moved_in(self, n: int) -> None: ...

    def moved_out(self, n: int) -> None: ...

    def fin_received(self) -> None: ...

    def carrier_closed(self, kind: str, side: Optional[str], answer_done: bool,
                       request_pending: bool) -> None: ...
