"""The corpus's own invariants: every case is well-formed data whose expectation can be judged
without guessing, and whose recorded observations have the recorded form."""

from __future__ import annotations

import re

import pytest

from tests.http.corpus import CANARY, CASES, HEADER_LIMIT, OUTCOMES, Case, by_id, counts, msg
from tests.http.peer import RequestFramer

MARGIN = 2048  # every size case keeps this far from max_header_size on its side


def head(raw: bytes) -> bytes:
    """The first request's line and fields (up to the first empty line)."""
    end = raw.find(b"\r\n\r\n")
    return raw if end < 0 else raw[:end + 2]


def test_ids_are_unique_and_plain() -> None:
    """Ids name cases in test ids and in corpus.py's records: unique, lowercase, dashes."""
    ids = [c.id for c in CASES]
    assert len(ids) == len(set(ids))
    assert all(re.fullmatch(r"[a-z0-9]+(-[a-z0-9]+)*", i) for i in ids)
    assert by_id().keys() == set(ids)


def test_every_outcome_is_allowed() -> None:
    assert {c.expect for c in CASES} <= set(OUTCOMES)
    assert set(OUTCOMES) <= {c.expect for c in CASES}


def test_every_refusal_has_a_reason_citing_its_source() -> None:
    """A case is either a control or says, in one line, which RFC section or SPEC rule
    refuses it."""
    for c in CASES:
        assert c.control or re.search(r"RFC \d+|SPEC", c.reason), c.id
        assert "\n" not in c.reason, c.id


def test_fields_fit_the_outcome() -> None:
    """``before`` and ``body_error`` belong to refusals; ``requests``, ``bodies`` and
    ``closes`` to controls; bodies are one per request."""
    for c in CASES:
        assert isinstance(c.raw, bytes) and c.raw, c.id
        if c.control:
            assert c.before == 0 and not c.body_error, c.id
            assert c.requests >= 1, c.id
            assert c.bodies is None or len(c.bodies) == c.requests, c.id
        else:
            assert c.requests == 1 and c.bodies is None and not c.closes, c.id
            assert c.before >= 0, c.id


def test_controls_frame_as_they_claim() -> None:
    """Read leniently, each control holds at least the requests it claims, with the bodies it
    claims: the expectation is about the bytes actually in the case."""
    for c in CASES:
        if not c.control:
            continue
        framed = RequestFramer().feed(c.raw)
        assert len(framed) >= c.requests, c.id
        if c.bodies is not None:
            assert tuple(body for *_, body, _ in framed[:c.requests]) == c.bodies, c.id


def test_canary_only_where_smuggling_is_tried() -> None:
    """The smuggled target appears only in refusals and in controls that must stop after a
    close, so its arrival at the peer always means something went wrong."""
    for c in CASES:
        if CANARY in c.raw and c.control:
            assert c.closes and c.requests == 1, c.id


def test_sizes_stay_clear_of_the_limit() -> None:
    """414 cases: the request line alone is far past max_header_size; 431 cases: the head is
    far past it but the line is not; every other case's head is far under it."""
    for c in CASES:
        line = c.raw.split(b"\r\n", 1)[0]
        size = len(head(c.raw))
        if c.expect == "414":
            assert len(line) > HEADER_LIMIT + MARGIN, c.id
        elif c.expect == "431":
            assert len(line) < HEADER_LIMIT - MARGIN < HEADER_LIMIT + MARGIN < size, c.id
        else:
            assert size < HEADER_LIMIT - MARGIN, c.id


def test_classes_cover_the_attack_families() -> None:
    """Each family has refusals and most have controls beside them."""
    table = counts()
    for family in ("cl-te", "te", "cl", "chunk", "line", "fold", "field", "request-line",
                   "version", "target", "host", "expect", "pipeline", "size"):
        assert sum(n for outcome, n in table[family].items() if outcome != "ok") > 0, family
    assert sum(c.control for c in CASES) >= 60
    assert sum(c.before > 0 for c in CASES) >= 8


def test_body_errors_come_after_a_whole_head() -> None:
    """A body_error case's first head is complete and (read leniently) asks for a body."""
    for c in CASES:
        if c.body_error:
            assert b"\r\n\r\n" in c.raw, c.id
            assert b"transfer-encoding: chunked" in head(c.raw).lower(), c.id


def test_observations_have_the_recorded_form() -> None:
    """haproxy/nginx: ``same: ...`` or ``differs: ...``; llhttp: ``accepts``/``refuses``."""
    for c in CASES:
        for seen in (c.haproxy, c.nginx):
            assert seen == "" or re.match(r"(same|differs): ", seen), c.id
        assert c.llhttp == "" or re.match(r"(accepts|refuses)", c.llhttp), c.id


def test_llhttp_records_are_current() -> None:
    """Where httptools is installed, it still accepts or refuses each case as recorded (a new
    llhttp that changes its mind shows up here, with the cases lb must now check itself)."""
    pytest.importorskip("httptools")
    from tests.http.run_corpus import llhttp_verdict
    changed = [c.id for c in CASES
               if c.llhttp and llhttp_verdict(c.raw).split()[0] != c.llhttp.split()[0]]
    assert changed == []


def test_msg_builds_crlf_messages() -> None:
    assert msg(b"GET / HTTP/1.1", b"Host: a", body=b"x") == b"GET / HTTP/1.1\r\nHost: a\r\n\r\nx"


def test_case_status() -> None:
    assert Case("a", "c", b"x", "431", "SPEC").status == 431
    assert Case("a", "c", b"x", "ok", "").status is None
