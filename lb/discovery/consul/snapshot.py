"""A watch's last good Consul answer on disk, so the balancer can serve with Consul down.

One JSON file per pool (its peers) and per routes watch (its route list) under
``state_dir``, replaced atomically (write a temporary file in
the same folder, fsync it, ``os.replace`` it over the old one, fsync the folder): a crash or
a full disk leaves either the old file or the new one, never half of one. The file records
which query produced it (service, tags, datacenter or KV prefix), so a snapshot taken for a
different query is not served after the config changed. No Twisted here.
"""

from __future__ import annotations

import json
import os
from typing import Any, Dict, Iterable, List, Mapping, Optional, Tuple
from urllib.parse import quote

from lb.config import MAX_WEIGHT, parse_address
from lb.discovery.consul.routes import ConsulRoute, make_route, resolve
from lb.net import short_repr
from lb.peer import DRAIN, MAINT, READY, PeerSpec

FORMAT_VERSION = 1
SUFFIX = ".consul.json"  # a pool's peers
ROUTES_SUFFIX = ".routes.json"  # a routes watch's routes


class SnapshotError(Exception):
    """A snapshot file exists but cannot be used (unreadable, not ours, corrupt)."""


def path_for(state_dir: str, pool_name: str, suffix: str = SUFFIX) -> str:
    """``<state_dir>/<pool>.consul.json`` (or another suffix); the name is percent-encoded
    so any YAML key makes one safe file name."""
    return os.path.join(state_dir, quote(pool_name, safe="") + suffix)


def make_document(pool_name: str, query: Mapping[str, Any], index: Optional[int],
                  specs: Iterable[PeerSpec], saved_at: float) -> Dict[str, Any]:
    """What ``save`` writes for a pool: its peers, and the query and Consul index they
    answer (the index tells a later start whether Consul lost its state meanwhile)."""
    return {"version": FORMAT_VERSION, "pool": pool_name, "query": dict(query),
            "index": index, "saved_at": saved_at, "peers": encode_peers(specs)}


def make_routes_document(name: str, query: Mapping[str, Any], index: Optional[int],
                         routes: Iterable[ConsulRoute], saved_at: float) -> Dict[str, Any]:
    """What ``save`` writes for a routes watch: its routes (in match order), and the query
    and Consul index they answer."""
    return {"version": FORMAT_VERSION, "routes_watch": name, "query": dict(query),
            "index": index, "saved_at": saved_at, "routes": encode_routes(routes)}


def encode_routes(routes: Iterable[ConsulRoute]) -> List[Dict[str, Any]]:
    """Routes as JSON-ready objects, in the order given."""
    return [{"service": r.service, "host": r.host, "path_prefix": r.path_prefix,
             "strip": r.strip} for r in routes]


def decode_routes(items: Any) -> Tuple[ConsulRoute, ...]:
    """Routes as saved by ``encode_routes``, checked by the rules a tag's route passes and
    put in match order (one per host and path); SnapshotError on anything else."""
    if not isinstance(items, list):
        raise SnapshotError("'routes' is not a list")
    routes = []
    for item in items:
        if not isinstance(item, dict):
            raise SnapshotError(f"route entry {short_repr(item)} is not an object")
        try:
            service, host = item["service"], item.get("host")
            path_prefix, strip = item["path_prefix"], item.get("strip")
            if not all(isinstance(v, str) for v in (service, path_prefix)) or not all(
                    v is None or isinstance(v, str) for v in (host, strip)):
                raise ValueError("a field is not text")
            route = make_route(service, host, path_prefix, strip)
        except (KeyError, ValueError) as e:
            raise SnapshotError(f"bad route entry {short_repr(item)}: {e}") from None
        routes.append(route)
    used, _conflicts = resolve(routes)
    return used


def encode_peers(specs: Iterable[PeerSpec]) -> List[Dict[str, Any]]:
    """Peers as JSON-ready objects, sorted by address."""
    return [{"address": str(s.address), "weight": s.weight, "state": s.state}
            for s in sorted(specs, key=lambda s: (s.address.host, s.address.port))]


def decode_peers(items: Any) -> List[PeerSpec]:
    """Peers as saved by ``encode_peers``; raise SnapshotError on anything else."""
    if not isinstance(items, list):
        raise SnapshotError("'peers' is not a list")
    specs = []
    for item in items:
        if not isinstance(item, dict):
            raise SnapshotError(f"peer entry {item!r} is not an object")
        try:
            address = parse_address(item["address"])
            weight = item.get("weight", 1)
            state = item.get("state", "ready")
        except (KeyError, ValueError) as e:
            raise SnapshotError(f"bad peer entry {item!r}: {e}") from None
        if isinstance(weight, bool) or not isinstance(weight, int) or not (
                0 <= weight <= MAX_WEIGHT):
            raise SnapshotError(f"bad weight in peer entry {item!r}")
        if state not in (READY, DRAIN, MAINT):
            raise SnapshotError(f"bad state in peer entry {item!r}")
        specs.append(PeerSpec(address, weight, state))
    return specs


def save(path: str, document: Mapping[str, Any]) -> None:
    """Write ``document`` as JSON to ``path`` atomically (creating the folder if needed)."""
    folder = os.path.dirname(path) or "."
    os.makedirs(folder, mode=0o750, exist_ok=True)
    data = json.dumps(document, indent=1, sort_keys=True).encode("utf-8") + b"\n"
    tmp = f"{path}.tmp.{os.getpid()}"
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o640)
        try:
            view = memoryview(data)
            while view:
                written = os.write(fd, view)
                view = view[written:]
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
    _fsync_dir(folder)


def _fsync_dir(folder: str) -> None:
    """Make the rename itself durable (best effort: not every filesystem allows it)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def load(path: str) -> Optional[Dict[str, Any]]:
    """The saved document, or None when there is no file; SnapshotError when unusable."""
    try:
        with open(path, "rb") as f:
            raw = f.read()
    except FileNotFoundError:
        return None
    except OSError as e:
        raise SnapshotError(f"cannot read {path}: {e.strerror}") from None
    try:
        document = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as e:
        raise SnapshotError(f"{path} is not valid JSON: {e}") from None
    if not isinstance(document, dict) or document.get("version") != FORMAT_VERSION:
        raise SnapshotError(f"{path} is not an lb snapshot (version {FORMAT_VERSION})")
    return document


def remove(path: str) -> None:
    """Forget a snapshot (its pool no longer uses Consul)."""
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass
