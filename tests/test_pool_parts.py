"""Pool parts (``IPoolPart``: the health monitor, the Consul watch): what they show, how a
pool's service composes its view from theirs, and when they give back what they put into
the pool."""

from __future__ import annotations

from typing import Any, Dict

from twisted.application.service import Service
from twisted.internet.task import Clock
from twisted.internet.testing import MemoryReactorClock
from zope.interface import implementer
from zope.interface.verify import verifyObject

from lb.config import HealthConfig, parse_address
from lb.discovery.consul import ConsulWatcher, make_query
from lb.health.monitor import FAIL, PASS, monitor_for
from lb.interfaces import IPoolPart
from lb.peer import PeerSpec
from lb.pool import Pool
from lb.service import LBService, PoolService
from lb.stats import ConsulStats
from lb.testing import make_config

LISTENERS = {"front": {"bind": "127.0.0.1:0", "pool": "web"},
             "back": {"bind": "127.0.0.1:0", "pool": "api"}}
POOLS = {"web": {"peers": ["127.0.0.1:9001"]}, "api": {"peers": ["10.0.0.1:80"]}}


def make_root() -> LBService:
    return LBService(make_config(LISTENERS, POOLS), MemoryReactorClock(), pool_parts={})


def web_pool(clock: Clock, **settings: Any) -> Pool:
    """Pool web with two static peers, 127.0.0.1:9001 and [::1]:9002 (weight 3)."""
    config = make_config({"front": {"bind": "127.0.0.1:0", "pool": "web"}},
                         {"web": {"peers": ["127.0.0.1:9001",
                                            {"address": "[::1]:9002", "weight": 3}],
                                  **settings}})
    pool = Pool(config.pools["web"], clock)
    pool.apply("static", [PeerSpec(p.address, p.weight) for p in config.pools["web"].peers])
    return pool


def test_a_pool_without_health_checks_has_a_passive_only_monitor_view() -> None:
    """Without a health section the monitor still exists (it brings back peers that
    traffic took down): its view says it is not configured, with its TCP defaults."""
    clock = MemoryReactorClock()
    pool = web_pool(clock)
    stats = monitor_for(pool, None, reactor=clock).stats()
    assert (stats.configured, stats.type, stats.path) == (False, "tcp", None)
    tcp = monitor_for(web_pool(clock, health={"type": "tcp"}), HealthConfig(type="tcp"),
                      reactor=clock).stats()
    assert (tcp.configured, tcp.type, tcp.path) == (True, "tcp", None)


def test_parts_provide_the_part_interface() -> None:
    """The health monitor and the Consul watch are pool parts: stats() and release()."""
    clock = MemoryReactorClock()
    pool = web_pool(clock)
    verifyObject(IPoolPart, monitor_for(pool, None, reactor=clock))
    config = make_config({"front": {"bind": "127.0.0.1:0", "pool": "web"}},
                         {"web": {"consul": {"service": "web"}}}, consul={})
    settings, section = config.consul, config.pools["web"].consul
    assert settings is not None and section is not None
    watcher = ConsulWatcher(pool, make_query(section), lambda: settings, reactor=clock)
    verifyObject(IPoolPart, watcher)
    assert isinstance(watcher.stats(), ConsulStats)


@implementer(IPoolPart)
class Part(Service):
    """A pool part that records whether it was released."""

    def __init__(self) -> None:
        self.released = False

    def stats(self) -> ConsulStats:
        return ConsulStats(describe="service 'web'", service="web", kv_prefix=None,
                           requests={}, last_success=None, failures=0, last_error=None)

    def release(self) -> None:
        self.released = True


def test_a_replaced_part_is_not_released_a_removed_one_is() -> None:
    """A part replaced by a new one of its kind (its config changed) keeps what it put in
    the pool for its successor; one whose config went away releases it, once stopped."""
    service = make_root().pools["web"]
    service.startService()
    first, second = Part(), Part()
    service.set_part("consul", first)
    service.set_part("consul", second)
    assert (first.running, first.released) == (0, False)
    service.set_part("consul", None)
    assert (second.running, second.released) == (0, True)
    assert "consul" not in service.parts


def test_a_reload_without_the_consul_section_lets_its_peers_go(tmp_path: Any) -> None:
    """Through the root with lb's own parts: dropping a pool's consul section releases the
    watch, so the peers only Consul wanted leave (idle: at once); static ones stay."""
    pools: Dict[str, Dict[str, Any]] = {
        "web": {"peers": ["127.0.0.1:9001"], "consul": {"service": "web"}},
        "api": {"peers": ["10.0.0.1:80"]}}
    root = LBService(make_config(LISTENERS, pools, consul={}, state_dir=str(tmp_path)),
                     MemoryReactorClock())
    pool = root.pool("web")
    pool.apply("consul", [PeerSpec(parse_address("127.0.0.1:9031"))])
    root.apply(make_config(LISTENERS, POOLS, consul={}, state_dir=str(tmp_path)))
    assert "consul" not in root.pools["web"].parts
    assert list(pool.peers) == ["127.0.0.1:9001"]
    assert root.pools["web"].stats().consul is None


def test_pool_service_view_includes_its_parts(tmp_path: Any) -> None:
    """With lb's own parts, a pool's view holds its monitor's and its Consul watch's
    views; a pool without a consul section has no Consul view."""
    config = make_config(
        {"front": {"bind": "127.0.0.1:0", "pool": "web"}},
        {"web": {"peers": ["127.0.0.1:9001"], "consul": {"service": "web"},
                 "health": {"type": "tcp"}},
         "plain": {}},
        consul={"url": "http://127.0.0.1:1"}, state_dir=str(tmp_path))
    root = LBService(config, MemoryReactorClock())
    web = root.pools["web"].stats()
    assert web.health_check is not None and web.health_check.configured
    assert web.health_check.results == {"127.0.0.1:9001": {PASS: 0, FAIL: 0}}
    assert web.consul is not None and web.consul.service == "web"
    assert web.consul.requests["ok"] == 0
    plain = root.pools["plain"].stats()
    assert plain.consul is None
    assert plain.health_check is not None and not plain.health_check.configured


def test_pool_service_view_without_parts() -> None:
    """A pool service with no parts shows no health or Consul view."""
    root = make_root()
    stats = PoolService(root.pool("web")).stats()
    assert (stats.name, stats.health_check, stats.consul) == ("web", None, None)
    assert [p.address for p in stats.peers] == ["127.0.0.1:9001"]
