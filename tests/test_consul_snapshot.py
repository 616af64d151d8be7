"""The on-disk snapshot of a pool's last good Consul set: atomic, validated, per pool."""

import json
import os
from typing import Any

import pytest

from lb.config import parse_address
from lb.discovery.consul import ConsulRoute, snapshot
from lb.discovery.consul.snapshot import SnapshotError
from lb.peer import DRAIN, PeerSpec


def doc(peers: Any) -> dict:
    return {"version": snapshot.FORMAT_VERSION, "query": {"service": "web"}, "peers": peers}


def test_round_trip(tmp_path: Any) -> None:
    """Saved peers (address, weight, state) load back equal, sorted by address; the folder
    is created on demand and no temporary file is left."""
    specs = [PeerSpec(parse_address("10.0.0.2:80"), 3, DRAIN),
             PeerSpec(parse_address("[::1]:81"), 1),
             PeerSpec(parse_address("10.0.0.1:80"), 0)]
    path = snapshot.path_for(str(tmp_path / "var" / "lb"), "web")
    snapshot.save(path, doc(snapshot.encode_peers(specs)))
    loaded = snapshot.load(path)
    assert loaded is not None
    assert snapshot.decode_peers(loaded["peers"]) == sorted(
        specs, key=lambda s: (s.address.host, s.address.port))
    assert os.listdir(os.path.dirname(path)) == ["web.consul.json"]


def test_path_is_one_safe_file_per_pool(tmp_path: Any) -> None:
    """Any pool name maps to one file inside state_dir (no path traversal)."""
    assert snapshot.path_for("/s", "web") == "/s/web.consul.json"
    assert snapshot.path_for("/s", "../etc/x") == "/s/..%2Fetc%2Fx.consul.json"


def test_missing_file_is_none(tmp_path: Any) -> None:
    """No snapshot yet is not an error."""
    assert snapshot.load(str(tmp_path / "nope.consul.json")) is None


@pytest.mark.parametrize("content", [b"{", b"[]", b'{"version": 99}', b"\xff\xfe"])
def test_unusable_file_raises(tmp_path: Any, content: bytes) -> None:
    """Truncated, foreign or other-version files are refused, not half-used."""
    path = tmp_path / "web.consul.json"
    path.write_bytes(content)
    with pytest.raises(SnapshotError):
        snapshot.load(str(path))


@pytest.mark.parametrize("peers", [
    "x", [1], [{"weight": 1}], [{"address": "nope"}], [{"address": "1.2.3.4:80", "weight": -1}],
    [{"address": "1.2.3.4:80", "weight": True}], [{"address": "1.2.3.4:80", "state": "gone"}]])
def test_bad_peers_are_refused(peers: Any) -> None:
    """A snapshot is only trusted if every peer entry is well formed."""
    with pytest.raises(SnapshotError):
        snapshot.decode_peers(peers)


def test_failed_write_keeps_the_old_snapshot(tmp_path: Any, monkeypatch: Any) -> None:
    """If writing fails midway (fsync error, disk full) the previous file is untouched and
    the temporary file is removed."""
    path = snapshot.path_for(str(tmp_path), "web")
    snapshot.save(path, doc([{"address": "10.0.0.1:80", "weight": 1, "state": "ready"}]))

    def broken_fsync(fd: int) -> None:
        raise OSError(28, "No space left on device")
    monkeypatch.setattr(os, "fsync", broken_fsync)
    with pytest.raises(OSError):
        snapshot.save(path, doc([]))
    monkeypatch.undo()
    assert json.loads(open(path).read())["peers"][0]["address"] == "10.0.0.1:80"
    assert os.listdir(tmp_path) == ["web.consul.json"]


def test_remove_is_idempotent(tmp_path: Any) -> None:
    """Forgetting a snapshot twice is fine."""
    path = snapshot.path_for(str(tmp_path), "web")
    snapshot.save(path, doc([]))
    snapshot.remove(path)
    snapshot.remove(path)
    assert not os.path.exists(path)


# --- a routes watch's routes -----------------------------------------------------------------


def test_routes_file_sits_beside_the_pools_files(tmp_path: Any) -> None:
    """A routes watch's file is ``<name>.routes.json``: the name percent-encoded like a
    pool's, and never the file of a pool of the same name."""
    assert snapshot.path_for("/s", "www", snapshot.ROUTES_SUFFIX) == "/s/www.routes.json"
    assert snapshot.path_for("/s", "../x", snapshot.ROUTES_SUFFIX) == "/s/..%2Fx.routes.json"
    assert snapshot.path_for("/s", "www") != snapshot.path_for("/s", "www",
                                                               snapshot.ROUTES_SUFFIX)


def test_routes_round_trip(tmp_path: Any) -> None:
    """Saved routes load back equal and in match order, an international host (stored in
    its IDNA form) included."""
    routes = (ConsulRoute("shop", "*.example.com", "/static", "/static"),
              ConsulRoute("www", "example.com", "/", None), ConsulRoute("api", None, "/api"),
              ConsulRoute("books", "xn--bcher-kva.example", "/", None))
    path = snapshot.path_for(str(tmp_path), "www", snapshot.ROUTES_SUFFIX)
    snapshot.save(path, snapshot.make_routes_document("www", {"tag_prefix": "urlprefix-"}, 5,
                                                      routes, saved_at=0.0))
    loaded = snapshot.load(path)
    assert loaded is not None and loaded["index"] == 5
    assert snapshot.decode_routes(loaded["routes"]) == (routes[1], routes[3], routes[0],
                                                        routes[2])


@pytest.mark.parametrize("routes", [
    "x", [1], [{"path_prefix": "/"}], [{"service": "web"}],
    [{"service": "web", "path_prefix": "api"}],
    [{"service": "web", "path_prefix": "/", "host": "bad..host"}],
    [{"service": "web", "path_prefix": "/", "host": "h.example:80"}],
    [{"service": "web", "path_prefix": "/a", "strip": "/b"}],
    [{"service": "web", "path_prefix": "/", "strip": 1}],
    [{"service": "", "path_prefix": "/"}], [{"service": 7, "path_prefix": "/"}],
    [{"service": "web", "path_prefix": 7}]])
def test_bad_routes_are_refused(routes: Any) -> None:
    """A routes snapshot is only trusted if every entry passes the rules a tag's route
    passes (a hand-edited file cannot route around them)."""
    with pytest.raises(SnapshotError):
        snapshot.decode_routes(routes)
