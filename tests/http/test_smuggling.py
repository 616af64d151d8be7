"""lb's HTTP mode against the smuggling corpus: every request that could be framed two ways
gets lb's own 400 (414/431 when too large) and a close, and nothing of it reaches the peer;
every valid control reaches the peer intact (SPEC "HTTP mode", "Strict parsing, no smuggling").

The corpus runs twice against one lb: each case in one write, then trickled in 5-byte writes
(1 KiB for the large ones), which puts CR and LF, names and colons, chunk sizes and their
CRLF in different reads.

The fixture ``http_lb`` (tests/http/conftest.py) runs lb as a process with one ``mode: http``
listener whose default pool is the recording peer, with default ``http`` settings
(``max_header_size`` 16 KiB, as ``corpus.HEADER_LIMIT`` assumes). The corpus runs in a thread
(``deferToThread``), so the reactor keeps turning.
"""

from __future__ import annotations

from typing import Any, Callable, Dict, Iterator

import pytest
import pytest_twisted
from twisted.internet import threads

from tests.http.corpus import CASES, Case
from tests.http.peer import RecordingPeer
from tests.http.run_corpus import CaseResult, describe, run_corpus

pytestmark = [pytest.mark.integration, pytest.mark.timeout(900)]


@pytest.fixture(scope="module")
def recording_peer() -> Iterator[RecordingPeer]:
    with RecordingPeer() as peer:
        yield peer


@pytest.fixture(scope="module", params=["one-write", "trickled"])
def corpus_results(request: Any, recording_peer: RecordingPeer,
                   http_lb: Callable[[int], int]) -> Dict[str, CaseResult]:
    """The results against lb of the cases selected for this run (``-k`` picks a few), sent
    as the parameter says."""
    wanted = {item.callspec.params["case"].id for item in request.session.items
              if item.module is request.module and hasattr(item, "callspec")
              and item.callspec.params.get("corpus_results") == request.param}
    proxy_port = http_lb(recording_peer.port)
    results = pytest_twisted.blockon(threads.deferToThread(
        run_corpus, proxy_port, recording_peer, [c for c in CASES if c.id in wanted],
        trickle=request.param == "trickled"))
    return {r.case.id: r for r in results}


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_case(corpus_results: Dict[str, CaseResult], case: Case) -> None:
    """lb meets the case's expectation (see the case's reason in tests/http/corpus.py)."""
    result = corpus_results[case.id]
    if not result.passed:
        pytest.fail(describe(result) + f"\n       reason: {case.reason}", pytrace=False)
