"""Test helpers that lb's tests (and users') reuse: real-socket backends, config builders,
bounded polling, fakes of the data path, and the reference-model driver that checks a
balancer pick by pick (``BalancerDriver``). Nothing here sleeps to wait for a condition."""

from __future__ import annotations

import random
import socket
from bisect import bisect_right
from collections import Counter, deque
from dataclasses import dataclass
from itertools import accumulate
from typing import (
    Any,
    Callable,
    Deque,
    Dict,
    FrozenSet,
    Iterator,
    List,
    Optional,
    Sequence,
    Set,
    Tuple,
    Union,
    overload,
)

from twisted.internet import defer, task
from twisted.internet.interfaces import IHalfCloseableProtocol, ITransport
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.testing import StringTransport
from zope.interface import implementer

from lb import config as lbconfig
from lb.interfaces import IBalancer, PickContext


@implementer(IHalfCloseableProtocol)
class HalfCloseEcho(Protocol):
    """Echoes everything and closes its side only after the client half-closes and every
    echoed byte is flushed (Twisted's plain Echo drops buffered writes on EOF)."""

    transport: ITransport  # connected: Twisted types it Optional for before the connection

    def connectionMade(self) -> None:
        self.factory.connections.append(self)

    def dataReceived(self, data: bytes) -> None:
        self.factory.bytes_received += len(data)
        self.transport.write(data)

    def readConnectionLost(self) -> None:
        self.transport.loseConnection()

    def writeConnectionLost(self) -> None:
        pass

    def connectionLost(self, reason: Any = None) -> None:
        if self in self.factory.connections:
            self.factory.connections.remove(self)


class EchoFactory(Factory):
    protocol = HalfCloseEcho
    noisy = False

    def __init__(self) -> None:
        self.connections: List[HalfCloseEcho] = []
        self.bytes_received = 0


class NamedServer(Protocol):
    """Answers every connection with its name and closes: shows who served a client."""

    transport: ITransport  # connected: Twisted types it Optional for before the connection

    def connectionMade(self) -> None:
        self.factory.hits += 1
        self.transport.write(self.factory.name.encode() + b"\n")
        self.transport.loseConnection()


class NamedFactory(Factory):
    protocol = NamedServer
    noisy = False

    def __init__(self, name: str) -> None:
        self.name = name
        self.hits = 0


class FakePeer:
    """A peer as a balancer sees it: a key, an effective weight and a load (connections or
    requests in flight). Balancer tests use it instead of a whole pool."""

    def __init__(self, key: str, weight: float = 1.0) -> None:
        self.key = key
        self.effective_weight = float(weight)
        self.load = 0

    def __repr__(self) -> str:
        return self.key


_GIVEN: Deque[int] = deque(maxlen=4096)  # ports free_port handed out lately


def _below_ephemeral() -> Tuple[int, int]:
    """Ports under the kernel's ephemeral range: no outgoing connection takes one of them
    between free_port and the bind it was picked for."""
    try:
        with open("/proc/sys/net/ipv4/ip_local_port_range") as f:
            low = int(f.read().split()[0])
    except (OSError, ValueError, IndexError):
        return (0, 0)
    return (10000, low - 1) if low > 12000 else (0, 0)


_PORTS = _below_ephemeral()
_PICK = random.Random()  # not the global one: tests seed that


def free_port(host: str = "127.0.0.1") -> int:
    """A port that was free a moment ago (for subprocesses that must be told a port), and
    not one this process was given lately: the kernel may hand the same free port out twice
    in a row (a config then got one port for two listeners and could not start). Taken
    below the ephemeral range where there is room, so that no outgoing connection takes it
    before the subprocess binds it."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    low, high = _PORTS
    for attempt in range(200):
        wanted = _PICK.randint(low, high) if high and attempt < 100 else 0
        with socket.socket(family, socket.SOCK_STREAM) as s:
            try:
                s.bind((host, wanted))
            except OSError:
                continue
            port: int = s.getsockname()[1]
        if port not in _GIVEN:
            _GIVEN.append(port)
            return port
    raise RuntimeError("no free port that was not handed out lately")


def tcp_pair() -> "tuple[socket.socket, socket.socket]":
    """Two ends of one TCP connection on 127.0.0.1, non-blocking, TCP_NODELAY on."""
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen(1)
        a = socket.create_connection(server.getsockname())
        b, _ = server.accept()
    for s in (a, b):
        s.setblocking(False)
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return a, b


def make_config(listeners: Dict[str, Dict[str, Any]], pools: Dict[str, Dict[str, Any]],
                path: str = "<test>", **top: Any) -> lbconfig.Config:
    """A validated Config from plain dicts (admin bound to an ephemeral port by default)."""
    raw: Dict[str, Any] = {"admin": {"bind": "127.0.0.1:0"}, "listeners": listeners,
                           "pools": pools}
    raw.update(top)
    return lbconfig.check(raw, path=path, environ={})


def poll_until(reactor: Any, condition: Callable[[], Any], timeout: float = 10.0,
               interval: float = 0.02, what: str = "condition") -> defer.Deferred[Any]:
    """Fire with the condition's truthy value, or fail once ``timeout`` passes."""
    deadline = reactor.seconds() + timeout

    def check() -> Any:
        value = condition()
        if value:
            return value
        if reactor.seconds() >= deadline:
            raise AssertionError(f"timed out after {timeout:g}s waiting for {what}")
        return task.deferLater(reactor, interval, check)

    return defer.maybeDeferred(check)


def listening_port(service: Any) -> int:
    """The port a started ListenerService (or an IListeningPort) is bound to."""
    port = getattr(service, "port", service)
    number: int = port.getHost().port
    return number


class FakeTCPTransport(StringTransport):
    """A StringTransport with the TCP extras the proxy uses (no-delay, half-close) and
    Twisted's lenient producer unregistering."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        StringTransport.__init__(self, *args, **kwargs)
        self.no_delay = False
        self.write_closed = False

    def setTcpNoDelay(self, enabled: bool) -> None:
        self.no_delay = enabled

    def loseWriteConnection(self) -> None:
        self.write_closed = True

    def unregisterProducer(self) -> None:
        self.producer = None
        self.streaming = None


# --- the data path in memory: a session's surroundings ------------------------------------


class FakeFront:
    """A session's client side before the join, recording what the session does to it."""

    eof = False

    def __init__(self, has_socket: bool = False) -> None:
        self.socket: Any = object() if has_socket else None
        self.closed = self.aborted = self.detached = False

    def take_pending(self) -> bytes:
        return b""

    def detach(self) -> None:
        self.detached = True

    def close(self) -> None:
        self.closed = True

    def abort(self) -> None:
        self.aborted = True


class FakeDial:
    """A dial the test answers: ``dials`` lists (address, timeout, first) in order; answer
    the latest with ``connect()`` or ``fail()``."""

    def __init__(self) -> None:
        self.dials: List[Any] = []
        self.cancelled: List[Any] = []
        self._callbacks: List[Any] = []

    def __call__(self, address: Any, timeout: float, first: bytes, connected: Any,
                 failed: Any) -> Any:
        self.dials.append((address, timeout, first))
        self._callbacks.append((connected, failed))
        dial = self

        class Handle:
            def cancel(self) -> None:
                dial.cancelled.append(address)
        return Handle()

    def connect(self, channel: Any = "channel", unsent: bytes = b"") -> None:
        self._callbacks[-1][0](channel, unsent)

    def fail(self, reason: Exception) -> None:
        self._callbacks[-1][1](reason)


class FakeCarrier:
    """A carrier that moves nothing: the test reports its facts to the session."""

    def __init__(self, session: Any, channel: Any, unsent: bytes) -> None:
        self.session = session
        self.channel = channel
        self.unsent = unsent
        self.aborted = False

    def abort(self) -> None:
        self.aborted = True
        self.session.carrier_closed("aborted", None, False, False)

    def buffered(self) -> int:
        return 0


class FakeListener:
    """What a session needs from its listener, recording what the session reports: a pool,
    a clock, a ``FakeDial`` and ``FakeCarrier`` joins."""

    def __init__(self, pool: Any, clock: Any, name: str = "l") -> None:
        from types import SimpleNamespace

        self.pool = pool
        self.clock = clock
        self.config = SimpleNamespace(name=name, accept_proxy=False)
        self.pump = None
        self.dial = FakeDial()
        self.carriers: List[FakeCarrier] = []
        self.ended: List[Any] = []  # (session, reason)
        self.connected: List[Any] = []

    def dial_for(self, front: Any) -> FakeDial:
        return self.dial

    def join(self, session: Any, channel: Any, unsent: bytes) -> FakeCarrier:
        carrier = FakeCarrier(session, channel, unsent)
        self.carriers.append(carrier)
        return carrier

    def peer_connected(self, peer: Any) -> None:
        self.connected.append(peer)

    def session_ended(self, session: Any, reason: str) -> None:
        self.ended.append((session, reason))


class RecordingSession:
    """The session's side of the carrier contract (lb/proxy/carriers/__init__.py), recording
    what a carrier reports: bytes each way, FINs, and how the pair closed."""

    def __init__(self, clock: Any) -> None:
        from types import SimpleNamespace

        self.listener = SimpleNamespace(clock=clock, config=SimpleNamespace(
            accept_proxy=False, name="contract"), session_for=self._session_for)
        self.peer = SimpleNamespace(bytes_in=0, bytes_out=0)
        self.last_active = 0.0
        self.bytes_in = self.bytes_out = self.fins = 0
        self.closed: List[Tuple[str, Optional[str], bool, bool]] = []  # carrier_closed's arguments

    def _session_for(self, front: Any, client: Any, destination: Any) -> "RecordingSession":
        return self

    def start(self, pending: bytes = b"") -> None:
        pass  # the test joins the carrier itself

    def moved_in(self, n: int) -> None:
        self.bytes_in += n

    def moved_out(self, n: int) -> None:
        self.bytes_out += n

    def fin_received(self) -> None:
        self.fins += 1

    def carrier_closed(self, kind: str, side: Optional[str], answer_done: bool,
                       request_pending: bool) -> None:
        self.closed.append((kind, side, answer_done, request_pending))

    def front_closed(self, reset: bool = False) -> None:
        pass


class PumpClock(task.Clock):
    """A Clock whose epoll set a ``Pump`` can share (as lb's reactor does): the test runs
    the pump's events itself with ``run_pump()``, one batch at a time."""

    def __init__(self) -> None:
        import select

        super().__init__()
        self.epoll = select.epoll()
        self.handler: Optional[Callable[[Any], None]] = None

    def share_poller(self, handler: Callable[[Any], None]) -> Any:
        self.handler = handler
        return self.epoll

    def run_pump(self) -> int:
        """Hand the pump every event ready now, as one batch; how many there were."""
        events = self.epoll.poll(0)
        if events and self.handler is not None:
            self.handler(events)
        return len(events)


# --- balancers: a seeded random run of pool operations, every pick checked ----------------


class ReferenceModel:
    """What a balancer's picks must be, computed the plain way (nginx's O(n) scan, a ring
    built from scratch): the oracle a ``BalancerDriver`` compares every pick with, by
    identity.

    The driver tells the model each change it tells the balancer, in the same order (never
    the redundant ones a balancer must ignore), and asks it for each pick right after the
    balancer picked for the same context. The hooks here ignore the change: a model
    overrides those its answer depends on, and ``pick``.
    """

    def add(self, peer: Any) -> None:
        """``peer`` came into rotation (its ``effective_weight`` is set)."""

    def remove(self, peer: Any) -> None:
        """``peer`` left rotation (its load stays: it drains)."""

    def reweight(self, peer: Any) -> None:
        """``peer.effective_weight`` changed while in rotation."""

    def load_added(self, peer: Any) -> None:
        """``peer.load`` went up by one; ``peer`` is in rotation."""

    def load_removed(self, peer: Any) -> None:
        """``peer.load`` went down by one; ``peer`` is in rotation."""

    def pick(self, context: PickContext) -> Optional[Any]:
        """The peer the balancer must have returned for ``context``; None: no peer."""
        raise NotImplementedError


Invariant = Callable[[Optional[Any], Sequence[Any], PickContext], bool]
"""The other kind of oracle: true when a pick (or None) is acceptable given the peers it
may return (in rotation, not excluded, with weight; in no particular order) and the
context. It may raise AssertionError with its own message instead of returning False;
its name and the first sentence of its docstring go into the failure message."""


@dataclass(frozen=True)
class Mix:
    """How often each operation of a ``BalancerDriver`` run comes up: relative weights, 0
    leaves an operation out. One that cannot happen at its step (no peer in rotation to
    reweight, no load held) is a pick instead.

    ``pick``: a pick for a PickContext; the peer picked takes load (see ``hold``).
    ``toggle``: a peer of the pool leaves rotation if it is in it (its load stays: it
    drains), or else comes in, half the time with a new weight; about half the pool is in.
    ``reweight``: a peer in rotation gets a new effective weight.
    ``close``: a held load ends (told to the balancer if its peer is still in rotation).
    ``open``: load starts on a peer in rotation without a pick.
    ``repeat``: an add of a peer in rotation or a remove of one out of it, which the pool
    never does and a balancer must shrug off (the model is not told).
    """

    pick: float = 90.0
    toggle: float = 4.0
    reweight: float = 4.0
    close: float = 0.0
    open: float = 0.0
    repeat: float = 0.0


_CHANGES = ("toggle", "reweight", "repeat")  # what a burst is made of


class _Bag:
    """Peers with O(1) add, discard, membership and random choice (deterministic order)."""

    __slots__ = ("items", "index")

    def __init__(self) -> None:
        self.items: List[Any] = []
        self.index: Dict[Any, int] = {}

    def add(self, peer: Any) -> None:
        self.index[peer] = len(self.items)
        self.items.append(peer)

    def discard(self, peer: Any) -> None:
        i = self.index.pop(peer)
        last = self.items.pop()
        if last is not peer:
            self.items[i] = last
            self.index[last] = i

    def choice(self, rng: random.Random) -> Any:
        return self.items[rng.randrange(len(self.items))]


class _Allowed(Sequence[Any]):
    """The peers a pick may return, listed only if an invariant looks (cheap in a big pool)."""

    def __init__(self, inside: _Bag, exclude: FrozenSet[Any]) -> None:
        self._inside = inside
        self._exclude = exclude
        self._peers: Optional[List[Any]] = None

    def _list(self) -> List[Any]:
        if self._peers is None:
            exclude = self._exclude
            self._peers = [p for p in self._inside.items
                           if p.effective_weight > 0 and p not in exclude]
        return self._peers

    @overload
    def __getitem__(self, i: int) -> Any: ...

    @overload
    def __getitem__(self, i: slice) -> Sequence[Any]: ...

    def __getitem__(self, i: Union[int, slice]) -> Any:
        return self._list()[i]

    def __len__(self) -> int:
        return len(self._list())

    def __iter__(self) -> Iterator[Any]:
        return iter(self._list())

    def __contains__(self, peer: object) -> bool:
        return peer in self._list()

    def __repr__(self) -> str:
        return repr(self._list())


def _allowed(inside: _Bag, exclude: FrozenSet[Any]) -> Sequence[Any]:
    """The peers a pick may return: listed now in a small pool, on first use in a big one."""
    if len(inside.items) > 32:
        return _Allowed(inside, exclude)
    return [p for p in inside.items if p.effective_weight > 0 and p not in exclude]


class BalancerCheckFailed(AssertionError):
    """A check of a ``BalancerDriver`` run failed (the message says where and how)."""


def _key(peer: Any) -> str:
    return str(getattr(peer, "key", peer))


def _keys(peers: Any) -> str:
    return "{" + ", ".join(sorted(_key(p) for p in peers)) + "}"


def _oracle_name(oracle: Any) -> str:
    """A function's or model's name, with the first sentence of its docstring."""
    name = getattr(oracle, "__name__", None) or type(oracle).__name__
    doc = " ".join((getattr(oracle, "__doc__", None) or "").split("\n\n")[0].split())
    return f"{name} ({doc.split('. ')[0].rstrip('.')})" if doc else name


class BalancerDriver:
    """The reference-model driver: a seeded random run of what a pool does to its balancer
    (peers coming into rotation and leaving it, weights changing, slow-start fractions
    included, connections or requests starting and ending, picks skipping peers already
    tried), with every pick checked.

    Every pick is held to the ``IBalancer`` contract: a peer in rotation, not excluded, with
    weight, and None only when there is no such peer; after every step ``len(balancer)``
    counts the peers in rotation (``len_counts_weightless``: True, those without weight
    too; False, not them; None, either). On top of that, the oracles given:

    * ``model``, a ``ReferenceModel``: the pick must be the very peer it names (smooth
      weighted round-robin against nginx's O(n) scan);
    * ``invariant``, a predicate over (pick, allowed peers, context) (leastconn: no allowed
      peer has a lower load per weight).

    The peers are ``FakePeer``s named ``key(i)``, ``peers`` of them, the first ``start`` in
    rotation to begin with, with weights drawn from ``weights`` (later ones from
    ``reweights``). Weights are 0 or at least 0.001: balancers count thousandths. A pick
    excludes as many peers of the whole pool (in rotation or not) as a draw from
    ``exclude`` says and names a client and hash key drawn from ``clients`` and
    ``hash_keys``; its peer takes load, which a share ``hold`` of picks keeps until a
    ``close`` operation, the others end at once (a short connection; ``hold`` None: picks
    take no load, for a balancer that ignores it). A change operation comes as a burst of
    as many changes as a draw from ``burst`` (a discovery snapshot replacing many peers at
    once).

    Everything is a function of ``seed`` (and of the balancer's own rng, if it has one). A
    failed check raises ``BalancerCheckFailed`` (an AssertionError) naming the step, the
    seed, the peers' state and the last ``history`` operations; an exception from the
    balancer or an oracle is wrapped the same way. ``counts`` tells how often each thing
    happened ("add", "remove", "reweight", "add again", "remove again", "open", "close",
    "pick", "pick (none)") and ``picks`` lists every pick's result.
    """

    def __init__(self, balancer: IBalancer, *, model: Optional[ReferenceModel] = None,
                 invariant: Optional[Invariant] = None, seed: int = 0, peers: int = 12,
                 start: int = 6, weights: Sequence[float] = (1.0,),
                 reweights: Optional[Sequence[float]] = None, mix: Mix = Mix(),
                 hold: Optional[float] = 1.0, burst: Sequence[int] = (1,),
                 exclude: Sequence[int] = (0,), clients: Sequence[Optional[str]] = (None,),
                 hash_keys: Sequence[Optional[str]] = (None,),
                 len_counts_weightless: Optional[bool] = None,
                 key: Callable[[int], str] = "p{}".format, history: int = 16) -> None:
        reweights = weights if reweights is None else reweights
        for w in (*weights, *reweights):
            if w < 0 or 0 < w < 0.001:
                raise ValueError(f"weight {w}: balancers count thousandths, use 0 or >= 0.001")
        if not 0 <= start <= peers or peers < 1:
            raise ValueError(f"{peers} peers, {start} in rotation at the start: no sense")
        # FakePeer stands in for lb.peer.Peer: the balancer is driven duck-typed
        self.balancer: Any = balancer
        self.model = model
        self.invariant = invariant
        self.seed = seed
        self.rng = random.Random(seed)
        self.reweights = list(reweights)
        self.hold = hold
        self.burst = list(burst)
        self.exclude_sizes = list(exclude)
        self.clients = list(clients)
        self.hash_keys = list(hash_keys)
        self.len_counts_weightless = len_counts_weightless
        ops = [(name, float(getattr(mix, name))) for name in Mix.__dataclass_fields__]
        ops = [(name, w) for name, w in ops if w > 0]
        if not ops:
            raise ValueError("the mix has no operation")
        self._ops = [name for name, _ in ops]
        self._cumulative = list(accumulate(w for _, w in ops))
        changes = [(name, w) for name, w in ops if name in _CHANGES]
        self._change_ops = [name for name, _ in changes]
        self._change_cumulative = list(accumulate(w for _, w in changes))
        self.pool: List[FakePeer] = [FakePeer(key(i), self._choice(weights))
                                     for i in range(peers)]
        self.inside = _Bag()
        self.outside = _Bag()
        for peer in self.pool:
            self.outside.add(peer)
        self.held: List[FakePeer] = []  # one entry per load a close operation will end
        self._weightless = 0  # peers in rotation without weight
        self.step = 0  # step 0: the first ``start`` peers come in
        self.counts: Counter[str] = Counter()
        self.picks: List[Optional[FakePeer]] = []
        self._history: Deque[Tuple[int, str, Any, Any]] = deque(maxlen=history)
        self._guarded(lambda: self._start(start))

    # --- running -----------------------------------------------------------------------------

    def run(self, steps: int) -> "BalancerDriver":
        """Run ``steps`` more operations (a burst of changes is one step)."""
        self._guarded(lambda: self._run(steps))
        return self

    def _guarded(self, operation: Callable[[], None]) -> None:
        try:
            operation()
        except BalancerCheckFailed:
            raise
        except Exception as e:  # the balancer or an oracle broke: say where
            raise BalancerCheckFailed(self._report(f"{type(e).__name__}: {e}")) from e

    def _start(self, start: int) -> None:
        for peer in self.pool[:start]:
            self._add(peer)
        self._check_len()

    def _run(self, steps: int) -> None:
        random, ops, cumulative = self.rng.random, self._ops, self._cumulative
        total, pick, other = cumulative[-1], self._pick, self._other
        balancer, inside, mode = self.balancer, self.inside.items, self.len_counts_weightless
        for _ in range(steps):
            self.step += 1
            op = ops[bisect_right(cumulative, random() * total)]
            if op == "pick":
                pick()
            else:
                other(op)
            n, everyone = len(balancer), len(inside)
            if mode:  # len counts every peer in rotation
                wrong = n != everyone
            else:  # only those with weight (False), or either way (None)
                weighted = everyone - self._weightless
                wrong = n != weighted if mode is False else not weighted <= n <= everyone
            if wrong:
                self._check_len()  # says what is wrong

    def _other(self, op: str) -> None:
        if op in _CHANGES:
            random, burst = self.rng.random, self.burst
            done = self._change(op)
            for _ in range(burst[int(random() * len(burst))] - 1):
                self._change(self._change_ops[bisect_right(
                    self._change_cumulative, random() * self._change_cumulative[-1])])
            if not done:
                self._pick()
        elif op == "close" and self.held:
            self._close()
        elif op == "open" and self.inside.items:
            self._open(self.inside.choice(self.rng))
        else:
            self._pick()

    def _choice(self, among: Sequence[Any]) -> Any:
        return among[int(self.rng.random() * len(among))]

    def _record(self, op: str, a: Any = None, b: Any = None) -> None:
        self.counts[op] += 1
        self._history.append((self.step, op, a, b))

    # --- operations --------------------------------------------------------------------------

    def _change(self, op: str) -> bool:
        rng = self.rng
        if op == "toggle":
            peer = self.pool[rng.randrange(len(self.pool))]
            if peer in self.inside.index:
                self._remove(peer)
            else:
                if rng.random() < 0.5:  # back with another weight (slow start, Consul)
                    peer.effective_weight = float(self._choice(self.reweights))
                self._add(peer)
        elif op == "reweight":
            if not self.inside.items:
                return False
            peer = self.inside.choice(rng)
            before = peer.effective_weight > 0
            peer.effective_weight = float(self._choice(self.reweights))
            self._weightless += before - (peer.effective_weight > 0)
            self._record("reweight", peer, peer.effective_weight)
            self.balancer.reweight(peer)
            if self.model is not None:
                self.model.reweight(peer)
        else:  # repeat: the pool never does it, a balancer must shrug it off
            if self.inside.items and (rng.random() < 0.5 or not self.outside.items):
                peer = self.inside.choice(rng)
                self._record("add again", peer)
                self.balancer.add(peer)
            elif self.outside.items:
                peer = self.outside.choice(rng)
                self._record("remove again", peer)
                self.balancer.remove(peer)
            else:
                return False
        return True

    def _add(self, peer: FakePeer) -> None:
        self.outside.discard(peer)
        self.inside.add(peer)
        if not peer.effective_weight > 0:
            self._weightless += 1
        self._record("add", peer, peer.effective_weight)
        self.balancer.add(peer)
        if self.model is not None:
            self.model.add(peer)

    def _remove(self, peer: FakePeer) -> None:
        self.inside.discard(peer)
        self.outside.add(peer)
        if not peer.effective_weight > 0:
            self._weightless -= 1
        self._record("remove", peer)
        self.balancer.remove(peer)
        if self.model is not None:
            self.model.remove(peer)

    def _open(self, peer: FakePeer) -> None:
        peer.load += 1
        self._record("open", peer, peer.load)
        self.balancer.load_added(peer)
        if self.model is not None:
            self.model.load_added(peer)
        self.held.append(peer)

    def _close(self) -> None:
        held, i = self.held, self.rng.randrange(len(self.held))
        peer = held[i]
        held[i] = held[-1]
        held.pop()
        peer.load -= 1
        inside = peer in self.inside.index
        self._record("close", peer, (peer.load, inside))
        if inside:  # a drained peer's load is the pool's business only
            self.balancer.load_removed(peer)
            if self.model is not None:
                self.model.load_removed(peer)

    def _pick(self) -> None:
        random, pool, model = self.rng.random, self.pool, self.model
        sizes = self.exclude_sizes
        size = min(sizes[int(random() * len(sizes))], len(pool))
        exclude: FrozenSet[Any] = frozenset()
        if size:  # peers of the whole pool, in rotation or not (cheaper than rng.sample)
            tried: Set[Any] = set()
            while len(tried) < size:
                tried.add(pool[int(random() * len(pool))])
            exclude = frozenset(tried)
        clients, hash_keys = self.clients, self.hash_keys
        context = PickContext(clients[int(random() * len(clients))],
                              hash_keys[int(random() * len(hash_keys))], exclude)
        got = self.balancer.pick(context)
        self.picks.append(got)
        hold = self.hold
        held = got is not None and hold is not None and random() < hold
        op = "pick" if got is not None else "pick (none)"
        self.counts[op] += 1
        self._history.append((self.step, op, context, (got, held)))
        expected = model.pick(context) if model is not None else got
        if (expected is not got or got is None or got not in self.inside.index
                or got in exclude or not got.effective_weight > 0):
            self._check_pick(got, expected, exclude, context)
        elif self.invariant is not None:
            allowed = _allowed(self.inside, exclude)
            if not self.invariant(got, allowed, context):
                self._broken(got, allowed)
        if got is None or hold is None:
            return
        got.load += 1  # what the pool does at pick time: count first, then tell
        self.balancer.load_added(got)
        if model is not None:
            model.load_added(got)
        if held:
            self.held.append(got)
            return
        got.load -= 1  # a short connection (or request): over before the next step
        self.balancer.load_removed(got)
        if model is not None:
            model.load_removed(got)

    # --- checks ------------------------------------------------------------------------------

    def _check_pick(self, got: Optional[FakePeer], expected: Optional[FakePeer],
                    exclude: FrozenSet[Any], context: PickContext) -> None:
        """Every check of a pick (``expected``: the reference model's answer, if any)."""
        if got is not None:
            if got not in self.inside.index:
                self._fail(f"picked {_key(got)}, which is not in rotation")
            if got in exclude:
                self._fail(f"picked {_key(got)}, which the context excludes")
            if not got.effective_weight > 0:
                self._fail(f"picked {_key(got)}, which has no weight")
        allowed = _allowed(self.inside, exclude)
        if got is None and allowed:
            self._fail(f"picked nothing, though it may pick any of {_keys(allowed)}")
        if self.invariant is not None and not self.invariant(got, allowed, context):
            self._broken(got, allowed)
        if expected is not got:
            self._fail(f"picked {_key(got)} where the reference "
                       f"{_oracle_name(self.model)} picks {_key(expected)}")

    def _broken(self, got: Optional[FakePeer], allowed: Sequence[Any]) -> None:
        self._fail(f"picked {_key(got)} among {_keys(allowed)}, which breaks "
                   f"{_oracle_name(self.invariant)}")

    def _check_len(self) -> None:
        n, everyone = len(self.balancer), len(self.inside.items)
        weighted = everyone - self._weightless
        if self.len_counts_weightless is None:
            ok = weighted <= n <= everyone
        else:
            ok = n == (everyone if self.len_counts_weightless else weighted)
        if not ok:
            self._fail(f"len(balancer) is {n} with {everyone} peers in rotation, "
                       f"{weighted} of them with weight")

    def _fail(self, what: str) -> None:
        raise BalancerCheckFailed(self._report(what))

    def _report(self, what: str) -> str:
        balancer = type(self.balancer)
        lines = [f"{balancer.__module__}.{balancer.__qualname__}, seed {self.seed}, "
                 f"step {self.step}: {what}"]
        inside = [p for p in self.pool if p in self.inside.index]
        shown = ", ".join(f"{_key(p)} (weight {p.effective_weight:g}, load {p.load})"
                          for p in inside[:40])
        more = f" and {len(inside) - 40} more" if len(inside) > 40 else ""
        lines.append(f"  in rotation: {shown or 'nobody'}{more}")
        draining = [p for p in self.pool if p not in self.inside.index and p.load]
        if draining:
            lines.append("  out of rotation with load: " + ", ".join(
                f"{_key(p)} ({p.load})" for p in draining[:40]))
        lines.append(f"  last {len(self._history)} operations:")
        lines += [f"    {step:>6} {_describe(op, a, b)}" for step, op, a, b in self._history]
        return "\n".join(lines)


def _describe(op: str, a: Any, b: Any) -> str:
    if op.startswith("pick"):
        context: PickContext = a
        got, held = b
        parts = ["pick"]
        if context.client is not None:
            parts.append(f"client={context.client}")
        if context.hash_key is not None:
            parts.append(f"hash_key={context.hash_key}")
        if context.exclude:
            parts.append(f"exclude={_keys(context.exclude)}")
        return " ".join(parts) + f" -> {_key(got) if got is not None else 'None'}" + (
            ", its load held" if held else "")
    if op == "add":
        return f"add {_key(a)} (weight {b:g})"
    if op == "reweight":
        return f"reweight {_key(a)} to {b:g}"
    if op == "open":
        return f"load on {_key(a)} (now {b})"
    if op == "close":
        load, inside = b
        return f"load off {_key(a)} (now {load}{'' if inside else ', out of rotation'})"
    return f"{op} {_key(a)}"
