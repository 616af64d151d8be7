"""A listener: accepts clients for one pool, refuses what it must, and drains on stop."""

from __future__ import annotations

import ipaddress
import os
import socket
from collections import Counter
from typing import Any, Dict, List, Optional, Set

from twisted.application.service import Service
from twisted.internet import defer
from twisted.internet.address import IPv4Address, IPv6Address
from twisted.internet.interfaces import IListeningPort
from twisted.internet.protocol import Factory
from twisted.internet.task import LoopingCall
from twisted.logger import Logger

from lb.config import ListenerConfig
from lb.net import Address, host_port
from lb.peer import Peer
from lb.pool import Pool
from lb.proxy.accept import RawClient, RawPort
from lb.proxy.carriers import transports
from lb.proxy.carriers.pump import Pump
from lb.proxy.carriers.transports import TransportClient
from lb.proxy.connector import Dial
from lb.proxy.connlog import ConnectionLog
from lb.proxy.session import Session
from lb.stats import HTTPStats, ListenerStats

BACKLOG = 1024
IDLE_SWEEP = 1.0  # at most this long between idle checks (less for short idle timeouts)


class Listener(Factory):
    """Accepts clients for one pool: refuses what it must, starts a ``Session`` per client
    (from a raw socket, or as a Twisted transport's protocol) and keeps the counters."""

    log = Logger()
    noisy = False

    def __init__(self, config: ListenerConfig, pool: Pool, reactor: Any,
                 pump: Optional[Pump] = None,
                 connection_log: Optional[ConnectionLog] = None) -> None:
        self.config = config
        self.pool = pool
        self.reactor = reactor
        self.clock = reactor
        self.pump = pump  # the fast data path; None where it cannot run
        self.connection_log = connection_log or ConnectionLog(reactor)
        self.sessions: Set[Session] = set()
        self.total = 0
        self.refused: Counter[str] = Counter()  # reason → count
        self.ended: Counter[str] = Counter()  # how connections ended → count
        self.per_peer: Dict[str, List[int]] = {}  # peer key → [total, active]
        self._idle_waiters: List[defer.Deferred[None]] = []
        self._idle_sweep: Optional[LoopingCall] = None

    @property
    def raw_accept(self) -> bool:
        """Clients are accepted as bare sockets (``accept_raw``) rather than as Twisted
        transports: when the pump carries every byte from the start."""
        return self.pump is not None and not self.config.accept_proxy

    def drain_sessions(self) -> None:
        """Shutdown has begun; TCP connections simply run to their end."""

    def http_stats(self) -> Optional[HTTPStats]:
        """An http listener's request counters (none here)."""
        return None

    @property
    def no_peer(self) -> int:
        """Clients closed because no peer could take them."""
        return self.ended["no_peer"]

    def reconfigure(self, config: ListenerConfig, pool: Pool) -> None:
        """New settings for new clients; the idle timeout applies to open connections too."""
        self.config = config
        self.pool = pool
        self.stop_idle_sweep()
        self._sweep_idle()

    def stop_idle_sweep(self) -> None:
        """Stop the idle sweep now (it also stops itself once no connection is open)."""
        if self._idle_sweep is not None:
            self._idle_sweep.stop()
            self._idle_sweep = None

    def _sweep_period(self) -> float:
        """A tenth of the shortest timeout in force, at most IDLE_SWEEP; 0: none is."""
        timeouts = [t for t in (self.config.idle_timeout, self.config.fin_timeout) if t > 0]
        return min([IDLE_SWEEP] + [t / 10 for t in timeouts]) if timeouts else 0.0

    def _sweep_idle(self) -> None:
        period = self._sweep_period()
        if self._idle_sweep is None and self.sessions and period > 0:
            sweep = self._idle_sweep = LoopingCall(self._close_idle)
            sweep.clock = self.clock
            sweep.start(period, now=False)

    # --- accepting -------------------------------------------------------------------------

    def _refuse(self, addr: Any) -> Optional[str]:
        """Why a new client must be closed at once (allow list, max_connections), if so."""
        reason = None
        if self.config.allow and not self._allowed(addr):
            reason = "allow"
        elif len(self.sessions) >= self.config.max_connections:
            reason = "max_connections"
        if reason is not None:
            self.refused[reason] += 1
            self.log.info("client {client} refused by listener {listener} ({reason})",
                          client=host_port(addr), listener=self.config.name, reason=reason)
        return reason

    def _allowed(self, addr: Any) -> bool:
        host = getattr(addr, "host", None)
        if not isinstance(host, str):
            return False
        try:
            ip = ipaddress.ip_address(host)
        except ValueError:
            return False
        if ip.version == 6 and ip.ipv4_mapped is not None:
            ip = ip.ipv4_mapped
        return any(ip in net for net in self.config.allow)

    def accept_raw(self, sock: socket.socket, addr: Any, host: Any) -> None:
        """A client accepted as a bare socket (``RawPort``): its bytes go through the pump
        from the start."""
        if self._refuse(addr) is not None:
            sock.close()
            return
        front = RawClient(sock)
        session = self.session_for(front, addr, host)
        try:
            early = front.read_early()
        except OSError:
            session.abort("client_reset")
            return
        session.start(early)

    def buildProtocol(self, addr: Any) -> Optional[TransportClient]:
        """A client accepted by Twisted (``listenTCP``: PROXY headers, no pump)."""
        if self._refuse(addr) is not None:
            return None  # Twisted closes the socket at once
        protocol = TransportClient(self)
        protocol.factory = self
        return protocol

    def session_for(self, front: Any, client: Any, destination: Any) -> Session:
        session = Session(self, front, client, destination, self.clock.seconds())
        self.sessions.add(session)
        self.total += 1
        if self._idle_sweep is None:
            self._sweep_idle()
        return session

    def dial_for(self, front: Any) -> Dial:
        """How a session connects to peers: the pump's own connect for an IP peer when the
        client is a socket the pump can own, else a Twisted endpoint."""
        pump = self.pump if front.socket is not None else None  # direct: the pump's connect
        reactor = self.reactor

        def dial(address: Address, timeout: float, first: bytes, connected: Any,
                 failed: Any) -> Any:
            if pump is not None and address.is_ip:
                return pump.connect(address.host, address.port,
                                    timeout, address.is_ipv6, first, connected, failed)
            return transports.connect(reactor, address, timeout, first, connected, failed)
        return dial

    def join(self, session: Session, channel: Any, unsent: bytes) -> Any:
        """Hand a connected session to a carrier: the pump when both sides are sockets it
        can own, else the two Twisted transports joined. ``channel`` is what the dial gave:
        a socket (the pump's own connect) or a ``PeerProtocol`` (an endpoint's)."""
        front = session.front
        early = front.take_pending()  # read after the opening was built (rare)
        if early:
            session.moved_in(len(early))
            unsent += early
        pump = self.pump
        client_sock = front.socket
        if pump is not None and client_sock is not None:
            if isinstance(channel, socket.socket):
                front.detach()
                return pump.adopt(session, client_sock, channel, unsent, peer_registered=True)
            peer_sock = getattr(channel.transport, "socket", None)
            if peer_sock is not None and not front.eof:
                front.detach()
                channel.transport.stopReading()
                channel.transport.stopWriting()
                return pump.adopt(session, client_sock, peer_sock, unsent)
        return transports.TransportJoin(session, front, channel, unsent, self.clock)

    # --- what sessions report --------------------------------------------------------------

    def _close_idle(self) -> None:
        """Cut connections idle for ``idle_timeout``, or for ``fin_timeout`` once one side
        has sent its FIN (HAProxy's ``timeout client-fin``/``server-fin``: a half-closed
        pair to a hung peer must not hold two sockets for the whole idle timeout). One sweep
        over all sessions costs less than a timer per connection (set up and cancelled on
        every short one); a connection goes at most a tenth of the timeout (and at most a
        second) late. The sweep stops when no connection is open."""
        idle, fin = self.config.idle_timeout, self.config.fin_timeout
        if not self.sessions or (idle <= 0 and fin <= 0):
            self.stop_idle_sweep()
            return
        now = self.clock.seconds()
        idle_limit = now - idle if idle > 0 else float("-inf")
        fin_limit = now - fin if fin > 0 else float("-inf")
        for session in list(self.sessions):
            if session.last_active <= idle_limit:
                session.abort("idle_timeout")
            elif session.half_closed and session.last_active <= fin_limit:
                session.abort("fin_timeout")

    def peer_connected(self, peer: Peer) -> None:
        counts = self.per_peer.get(peer.key)
        if counts is None:
            counts = self.per_peer[peer.key] = [0, 0]
        counts[0] += 1
        counts[1] += 1

    def session_ended(self, session: Session, reason: str) -> None:
        self.sessions.discard(session)
        self.ended[reason] += 1
        if session.peer is not None:
            counts = self.per_peer.get(session.peer.key)
            if counts is not None:
                counts[1] -= 1
        info = session.describe(reason)
        line = (f"{info['client']} -> {info['listener']} -> {info['peer']}: "
                f"in={info['bytes_in']} out={info['bytes_out']} "
                f"duration={info['duration']:.3f}s end={reason}")
        if info["failures"]:
            line += f" failures=[{info['failures']}]"
        self.connection_log.add(line, info)
        if not self.sessions and self._idle_waiters:
            waiters, self._idle_waiters = self._idle_waiters, []
            for d in waiters:
                d.callback(None)

    def prune_peer_counts(self, live_keys: Any) -> None:
        """Forget counters of peers that left the pool (bounded metric labels)."""
        for key in [k for k, c in self.per_peer.items() if k not in live_keys and c[1] <= 0]:
            del self.per_peer[key]

    def wait_idle(self) -> defer.Deferred[None]:
        """Fires once no connection is open."""
        if not self.sessions:
            return defer.succeed(None)
        d: defer.Deferred[None] = defer.Deferred()
        self._idle_waiters.append(d)
        return d


class ListenerService(Service):
    """Listens while running; on stop, closes the socket and lets connections finish for
    up to ``shutdown_timeout`` before cutting them."""

    log = Logger()

    def __init__(self, listener: Listener, shutdown_timeout: float) -> None:
        self.listener = listener
        self.shutdown_timeout = shutdown_timeout
        self.port: Optional[IListeningPort] = None
        self.name = f"listener:{listener.config.name}"

    def listen(self, taking_over: Optional["ListenerService"] = None) -> None:
        """Bind now (a reload binds new sockets before it changes anything else). With
        ``taking_over``, a listener on the same address that is about to stop (a reload
        changing its mode): accept on a copy of its socket instead, so the port never
        closes and no bind can fail."""
        if self.port is None:
            listener = self.listener
            bind = listener.config.bind
            inherited = taking_over.share_socket() if taking_over is not None else None
            if listener.raw_accept:
                # every byte goes through the pump: accept without Twisted transports
                self.port = RawPort(listener.reactor, listener, bind.host, bind.port, BACKLOG,
                                    inherited)
            elif inherited is not None:
                with inherited:  # the reactor makes its own copy of the descriptor
                    self.port = listener.reactor.adoptStreamPort(
                        inherited.fileno(), inherited.family, listener)
            else:
                self.port = listener.reactor.listenTCP(bind.port, listener, backlog=BACKLOG,
                                                       interface=bind.host)

    def share_socket(self) -> Optional[socket.socket]:
        """A copy of the listening socket for a listener taking over this one; closing
        this one's port afterwards leaves the copy listening."""
        port = self.port
        if port is None:
            return None
        if isinstance(port, RawPort):
            fd = port.fileno()
            family = port.family
        else:  # a Twisted port would shut the socket down, for every copy, when it closes
            port._shouldShutdown = False  # type: ignore[attr-defined]
            fd = port.fileno()  # type: ignore[attr-defined]
            family = port.addressFamily  # type: ignore[attr-defined]
        if fd < 0:
            return None
        return socket.socket(family, socket.SOCK_STREAM, 0, os.dup(fd))

    def startService(self) -> None:
        self.listen()
        Service.startService(self)
        config = self.listener.config
        routes = len(config.routes) + (config.consul_routes is not None)
        self.log.info("listener {name} ({mode}) on {bind} -> {to}", name=config.name,
                      mode=config.mode, bind=self.address(),
                      to=(f"pool {config.pool}" if config.pool else "no default pool")
                      + (", routes" if routes else ""))

    @property
    def accepting(self) -> bool:
        """The listening socket is open and in the reactor (``lb_listener_up``, /healthz)."""
        port = self.port
        if port is None:
            return False
        if isinstance(port, RawPort):
            return port.socket is not None
        return bool(getattr(port, "connected", False))

    def address(self) -> str:
        if self.port is None:
            return str(self.listener.config.bind)
        host = self.port.getHost()
        assert isinstance(host, (IPv4Address, IPv6Address)), "a TCP port"
        return f"[{host.host}]:{host.port}" if ":" in host.host else f"{host.host}:{host.port}"

    def stats(self) -> ListenerStats:
        """What the admin server shows: config, counters, whether it accepts. The address
        is the configured bind once the socket is gone (a closed Twisted port raises when
        asked, and the admin pages, /healthz above all, must still answer)."""
        listener = self.listener
        config = listener.config
        try:
            address = self.address()
        except Exception:
            address = str(config.bind)
        pool = listener.pool
        live = pool.peers if pool is not None else {}
        refused = dict.fromkeys(("allow", "max_connections"), 0)  # every reason, zeros too
        refused.update(listener.refused)
        return ListenerStats(
            name=config.name, bind=str(config.bind), address=address,
            pool=pool.name if pool is not None else config.pool, mode=config.mode,
            accepting=self.accepting, active_connections=len(listener.sessions),
            total_connections=listener.total, max_connections=config.max_connections,
            no_peer=listener.no_peer, refused=dict(sorted(refused.items())),
            ended=dict(sorted(listener.ended.items())),
            # a peer that left the pool goes once its last connection ends
            per_peer={key: (total, max(active, 0))
                      for key, (total, active) in list(listener.per_peer.items())
                      if key in live or active > 0},
            http=listener.http_stats())

    def stop_accepting(self) -> defer.Deferred[None]:
        port, self.port = self.port, None
        if port is None:
            return defer.succeed(None)
        # maybeDeferred waits for the Deferred stopListening may return; its types do not
        # say so (they make it a Deferred of that Deferred or None)
        stopped = defer.maybeDeferred(port.stopListening)
        return stopped  # type: ignore[return-value]

    @defer.inlineCallbacks
    def stopService(self) -> Any:
        Service.stopService(self)
        yield self.stop_accepting()
        yield self.drain(self.shutdown_timeout)
        self.listener.stop_idle_sweep()

    def drain(self, timeout: float) -> defer.Deferred[None]:
        """Wait for open connections to finish; cut what is left after ``timeout``."""
        listener = self.listener
        listener.drain_sessions()
        if not listener.sessions:
            return defer.succeed(None)
        self.log.info("listener {name}: waiting up to {timeout:g}s for {n} connection(s)",
                      name=listener.config.name, timeout=timeout, n=len(listener.sessions))
        done = listener.wait_idle()

        def cut() -> None:
            for session in list(listener.sessions):
                session.abort("shutdown")

        timer = listener.reactor.callLater(timeout, cut)

        def finished(result: Any) -> Any:
            if timer.active():
                timer.cancel()
            return result
        return done.addBoth(finished)
