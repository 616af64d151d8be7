"""The corpus runner: it reads answers right, and its verdicts fail a proxy that forwards
what lb must refuse, fail one that refuses what lb must pass, and pass the right behaviour."""

from __future__ import annotations

import json
import socket
import threading
from typing import Callable, Dict, Iterator, Optional

import pytest

from tests.http import record
from tests.http.corpus import CASES, Case, by_id
from tests.http.peer import RecordingPeer, Traffic
from tests.http.run_corpus import (
    ClientResult,
    Response,
    describe,
    judge,
    llhttp_verdict,
    main,
    parse_responses,
    run_case,
    run_corpus,
    summarize,
)

pytestmark = pytest.mark.integration

PEER = (b"X-Corpus-Peer", b"0-1")


# -- toy proxies ----------------------------------------------------------------------------
class ToyProxy:
    """A threaded TCP server on 127.0.0.1 handing each accepted client to ``handle``."""

    def __init__(self, handle: Callable[[socket.socket], None]) -> None:
        self.handle = handle
        self.server = socket.socket()
        self.server.bind(("127.0.0.1", 0))
        self.server.listen(64)
        self.port = self.server.getsockname()[1]
        self.thread = threading.Thread(target=self._accept, daemon=True)
        self.thread.start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self.server.accept()
            except OSError:
                return
            threading.Thread(target=self._serve, args=(client,), daemon=True).start()

    def _serve(self, client: socket.socket) -> None:
        try:
            self.handle(client)
        except OSError:
            pass
        finally:
            client.close()

    def close(self) -> None:
        self.server.shutdown(socket.SHUT_RDWR)
        self.server.close()
        self.thread.join(5)


def refuse_all(client: socket.socket) -> None:
    """Answers 400 to anything and closes: right for every plain refusal, wrong for controls."""
    client.recv(65536)
    client.sendall(b"HTTP/1.1 400 Bad Request\r\nContent-Length: 3\r\nConnection: close\r\n\r\nbad")


def relay_to(peer_port: int) -> Callable[[socket.socket], None]:
    """A byte relay: forwards everything to the peer and back, the worst possible 'proxy'."""

    def relay(client: socket.socket) -> None:
        upstream = socket.create_connection(("127.0.0.1", peer_port))

        def pump(src: socket.socket, dst: socket.socket) -> None:
            try:
                while True:
                    data = src.recv(65536)
                    if not data:
                        break
                    dst.sendall(data)
            except OSError:
                pass
            finally:
                try:
                    dst.shutdown(socket.SHUT_WR)
                except OSError:
                    pass

        back = threading.Thread(target=pump, args=(upstream, client), daemon=True)
        back.start()
        pump(client, upstream)
        back.join(5)
        upstream.close()

    return relay


@pytest.fixture(scope="module")
def peer() -> Iterator[RecordingPeer]:
    with RecordingPeer() as p:
        yield p


@pytest.fixture(scope="module")
def refuser() -> Iterator[ToyProxy]:
    proxy = ToyProxy(refuse_all)
    yield proxy
    proxy.close()


@pytest.fixture(scope="module")
def relay(peer: RecordingPeer) -> Iterator[ToyProxy]:
    proxy = ToyProxy(relay_to(peer.port))
    yield proxy
    proxy.close()


FAST = dict(timeout=1.0, grace=0.1, settle=0.05)


# -- reading answers ------------------------------------------------------------------------
def test_parse_responses_by_length_chunked_and_close() -> None:
    """CL and chunked answers are whole when their bytes are; a length-less one only at EOF;
    1xx answers have no body."""
    data = (b"HTTP/1.1 100 Continue\r\n\r\n"
            b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nhi\r\n0\r\n\r\n"
            b"HTTP/1.1 400 Bad Request\r\n\r\nbye")
    responses, rest = parse_responses(data, at_eof=False)
    assert [r.status for r in responses] == [100, 200, 200]
    assert [r.body for r in responses] == [b"", b"ok", b"hi"]
    assert rest.startswith(b"HTTP/1.1 400")
    responses, rest = parse_responses(data, at_eof=True)
    assert responses[-1].status == 400 and responses[-1].body == b"bye" and rest == b""


def test_parse_responses_leaves_a_partial_answer() -> None:
    """Half an answer is left over, not guessed at."""
    responses, rest = parse_responses(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nab", False)
    assert responses == [] and rest.endswith(b"ab")


# -- judging synthetic outcomes -------------------------------------------------------------
def traffic(requests: int = 0, data: bytes = b"", leftover: Optional[bytes] = None,
            ended: Optional[str] = None) -> Traffic:
    from tests.http.peer import PeerRequest
    reqs = [PeerRequest(0, b"GET", b"/", b"HTTP/1.1", [], b"", b"", i) for i in range(requests)]
    return Traffic(data, reqs, {0: leftover} if leftover else {}, {0: ended}, {}, 0)


def client(*statuses: int, end: str = "eof", peer_statuses: int = 0) -> ClientResult:
    responses = [Response(s, [PEER] if i < peer_statuses else [], b"")
                 for i, s in enumerate(statuses)]
    return ClientResult(responses, end, b"")


def case(**kw: object) -> Case:
    fields: Dict[str, object] = dict(id="x", cls="t", raw=b"GET / HTTP/1.1\r\n\r\n",
                                     expect="400", reason="r")
    fields.update(kw)
    return Case(**fields)  # type: ignore[arg-type]


def test_refusal_as_lb_should() -> None:
    """400, closed, nothing at the peer: no problem."""
    assert judge(case(), client(400), traffic()) == []


@pytest.mark.parametrize("got,seen,problem", [
    (client(400, end="open"), traffic(), "left open"),
    (client(200, peer_statuses=1), traffic(1, b"GET / ..."), "expected 400"),
    (client(400), traffic(0, b"GET / HTTP/1.1\r\n", b"GET / HTTP/1.1\r\n"), "bytes of a refused"),
    (client(400, peer_statuses=1), traffic(), "came from the peer"),
    (client(), traffic(), "client got nothing"),
])
def test_refusal_problems(got: ClientResult, seen: Traffic, problem: str) -> None:
    """Each way of getting a refusal wrong is named."""
    assert any(problem in p for p in judge(case(), got, seen))


def test_pipelined_refusal_answers_the_valid_requests_before() -> None:
    """before=1: one 200 from the peer and one request there, then the 400 (RFC 9112
    §9.3.2: the valid request ahead of the bad one is answered, in order)."""
    c = case(before=1)
    assert judge(c, client(200, 400, peer_statuses=1), traffic(1, b"GET / ...")) == []
    assert any("expected 1 x 200" in p for p in judge(c, client(400), traffic()))
    assert judge(c, client(200, 200, 400, peer_statuses=2), traffic(2, b"..."))


def test_canary_reaching_the_peer_is_named() -> None:
    """The smuggled request's target anywhere at the peer is a problem of its own."""
    from tests.http.peer import PeerRequest
    seen = traffic(1, b"GET /smuggled HTTP/1.1\r\n\r\n")
    seen.requests[0] = PeerRequest(0, b"GET", b"/smuggled", b"HTTP/1.1", [], b"", b"", 1)
    assert any("as a request" in p for p in judge(case(before=1), client(200, 400), seen))


def test_trickled_body_error_may_leave_a_cut_partial_request() -> None:
    """Trickled, a bad chunk can arrive after lb began streaming: part of the request at the
    peer is fine if lb cut that connection; left open, it is not; whole, it never is."""
    c = case(body_error=True)
    partial = b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhel"
    assert judge(c, client(400), traffic(0, partial, partial, "eof"), trickled=True) == []
    assert judge(c, client(400), traffic(0, partial, partial, None), trickled=True)
    assert judge(c, client(400), traffic(0, partial, partial, "eof"), trickled=False)


def test_control_problems() -> None:
    """A control needs its answers from the peer, the right requests and bodies there, no
    stray bytes, and a close when asked."""
    c = case(expect="ok", requests=1, bodies=(b"",), closes=True)
    assert judge(c, client(200, peer_statuses=1), traffic(1)) == []
    assert judge(c, client(200, end="open", peer_statuses=1), traffic(1))
    assert judge(c, client(400), traffic(0))
    assert judge(c, client(200, peer_statuses=1), traffic(1, b"x", b"junk"))
    assert judge(case(expect="ok", bodies=(b"hello",)), client(200, peer_statuses=1), traffic(1))


def test_no_1xx_for_http10() -> None:
    """A 100 Continue sent to an HTTP/1.0 client is a problem (RFC 9110 §15.2)."""
    c = by_id()["expect-100-http10"]
    got = ClientResult([Response(100, [], b""), Response(200, [PEER], b"")], "eof", b"")
    assert any("1xx" in p for p in judge(c, got, traffic(1)))


# -- against toy proxies --------------------------------------------------------------------
def test_a_refusing_proxy_passes_plain_refusals_and_fails_controls(
        refuser: ToyProxy, peer: RecordingPeer) -> None:
    """Against a proxy that answers 400 to all, every single-request 400 case passes and
    every control fails, so a refuse-everything lb cannot pass the corpus."""
    picked = [c for c in CASES if c.expect == "400" and c.before == 0][:12]
    picked += [c for c in CASES if c.control][:6]
    for result in run_corpus(refuser.port, peer, picked, **FAST):
        assert result.passed == (result.case.expect == "400"), describe(result)


def test_a_byte_relay_fails_every_kind_of_refusal(relay: ToyProxy, peer: RecordingPeer) -> None:
    """A proxy that forwards bytes blindly fails refusals (the peer got bytes, or the peer's
    own 200 came back), so the corpus catches forwarding; plain controls pass through it."""
    ids = ["clte-classic", "tecl-classic", "chunk-size-0x", "host-twice-differ",
           "pipe-get-then-tecl", "line-lf-only", "size-field-20k"]
    for result in run_corpus(relay.port, peer, [by_id()[i] for i in ids], **FAST):
        assert not result.passed, describe(result)
        assert any("peer got" in p or "as a request" in p for p in result.problems)
    for cid in ["te-chunked", "cl-body", "pipe-three-mixed", "chunk-trailers"]:
        result = run_case(by_id()[cid], relay.port, peer, **FAST)  # type: ignore[arg-type]
        assert result.passed, describe(result)


def test_trickled_sends_arrive_whole(relay: ToyProxy, peer: RecordingPeer) -> None:
    """In trickle mode the bytes still reach the other end intact and in order."""
    c = by_id()["chunk-many-small"]
    result = run_case(c, relay.port, peer, trickle=True, **FAST)  # type: ignore[arg-type]
    assert result.passed, describe(result)
    assert result.traffic.data == c.raw


def test_summary_reads_well() -> None:
    """The recorded form: statuses (p = from the peer), how it ended, what the peer got."""
    assert (summarize(client(200, 400, peer_statuses=1), traffic(1, b"x"))
            == "200p 400 closed; peer 1")
    assert summarize(client(end="open"), traffic(0, b"abc", b"abc")) == "no answer open; peer 0 +3B"


def test_command_line_against_a_refusing_proxy(refuser: ToyProxy,
                                               capsys: pytest.CaptureFixture[str]) -> None:
    """``--only`` picks cases; the exit status says whether all passed; ``--emit`` prints the
    JSON that record.py writes into corpus.py."""
    assert main(["--proxy-port", str(refuser.port), "--only", "^host-missing$",
                 "--timeout", "1"]) == 0
    assert "PASS host-missing" in capsys.readouterr().out
    assert main(["--proxy-port", str(refuser.port), "--only", "^cl-body$", "--timeout", "1",
                 "--emit"]) == 1
    assert json.loads(capsys.readouterr().out) == {"cl-body": "differs: 400 closed; peer 0"}


def test_llhttp_verdict() -> None:
    """The parser-alone probe tells accepted from refused."""
    pytest.importorskip("httptools")
    assert llhttp_verdict(b"GET / HTTP/1.1\r\nHost: a\r\n\r\n") == "accepts 1"
    assert llhttp_verdict(b"GET / HTTP/1.1\r\nHost : a\r\n\r\n").startswith("refuses after 0")


# -- recording into corpus.py ---------------------------------------------------------------
def test_record_adds_then_replaces_a_field() -> None:
    """record.rewrite inserts the keyword on first use and replaces its value later, leaving
    every other byte (and non-ASCII text) alone."""
    source = ('CASES = [\n    Case("a", "c", b"x", "400", "§ one"),\n'
              '    Case("b", "c", b"(y)", "ok", "two",\n         bodies=(b"",)),\n]\n')
    once = record.rewrite(source, "nginx", {"a": "same: 400", "b": 'said "hi"'})
    assert once == ('CASES = [\n    Case("a", "c", b"x", "400", "§ one",\n'
                    '         nginx="same: 400"),\n'
                    '    Case("b", "c", b"(y)", "ok", "two",\n         bodies=(b"",),\n'
                    '         nginx="said \\"hi\\""),\n]\n')
    twice = record.rewrite(once, "nginx", {"a": "differs: 200p"})
    assert twice == once.replace('nginx="same: 400"', 'nginx="differs: 200p"')
