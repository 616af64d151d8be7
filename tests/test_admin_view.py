"""What the root hands its admin server: ``AdminView``, an ``IAdminView`` of fresh views
and live pools for changes; reloads reconfigure the admin server without hooks."""

from __future__ import annotations

from twisted.internet.testing import MemoryReactorClock
from zope.interface.verify import verifyObject

from lb.admin.view import IAdminView
from lb.config import Address, parse_address
from lb.service import LBService
from lb.testing import make_config

LISTENERS = {"front": {"bind": "127.0.0.1:0", "pool": "web"},
             "back": {"bind": "127.0.0.1:0", "pool": "api"}}
POOLS = {"web": {"peers": ["127.0.0.1:9001"]}, "api": {"peers": ["10.0.0.1:80"]}}


def make_root() -> LBService:
    return LBService(make_config(LISTENERS, POOLS), MemoryReactorClock(), pool_parts={})


def test_the_view_provides_the_interface_and_answers_from_the_root() -> None:
    """AdminView provides IAdminView: pools and listeners in config order, one pool by
    name (None for an unknown one), the running config and whether shutdown began."""
    root = make_root()
    view = root.admin_view
    verifyObject(IAdminView, view)
    assert [p.name for p in view.pools()] == ["web", "api"]
    assert [listener.name for listener in view.listeners()] == ["front", "back"]
    api = view.pool("api")
    assert api is not None and api.balance == "roundrobin"
    assert view.pool("nope") is None and view.pool_to_change("nope") is None
    assert view.config() is root.config and view.stopping() is False
    root.stopping = True
    assert view.stopping() is True


def test_views_are_fresh_and_changes_go_through_the_live_pool() -> None:
    """Each call builds a new view: a change made through ``pool_to_change`` (the live
    pool's public methods) shows in the next one, not in one taken before."""
    view = make_root().admin_view
    before = view.pool("web")
    pool = view.pool_to_change("web")
    assert pool is not None
    pool.add_peer(parse_address("127.0.0.1:9002"), 2)
    after = view.pool("web")
    assert before is not None and after is not None
    assert [p.address for p in before.peers] == ["127.0.0.1:9001"]
    assert [(p.address, p.weight) for p in after.peers] == [("127.0.0.1:9001", 1),
                                                            ("127.0.0.1:9002", 2)]


def test_a_reload_reconfigures_the_admin_server_and_the_view_follows() -> None:
    """LBService.apply hands the admin server its new section itself (no hook to
    register): not running yet, it takes the new bind for when it starts; the view
    answers with the new config."""
    root = make_root()
    new = make_config(LISTENERS, POOLS, admin={"bind": "127.0.0.1:9911"})
    root.apply(new)
    assert root.admin.bind == Address("127.0.0.1", 9911)
    assert root.admin_view.config() is new
