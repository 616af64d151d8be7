"""The status page in a real browser: headless Chromium (Debian's ``chromium`` and
``chromium-driver``, installed by ``scripts/install-browser``) driven by Selenium loads the
page from a running balancer, sees every peer, and drains one with its button.

Selenium blocks, so the browser runs in a thread (``deferToThread``) while the reactor keeps
serving the balancer and its admin site. Outside CI the test skips when no browser is
installed; under CI (``$CI`` set) a missing browser fails with what to run.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
from typing import Any, Callable, Dict, List, Optional

import pytest
import pytest_twisted
from twisted.internet import defer, reactor, threads

from lb.config import parse_address
from lb.service import LBService, default_pool_parts
from lb.testing import NamedFactory, free_port, make_config, poll_until

pytestmark = pytest.mark.integration

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMEDRIVER = shutil.which("chromedriver")
WAIT = 15  # seconds any one browser step may take


def _missing() -> Optional[str]:
    if importlib.util.find_spec("selenium") is None:
        return "the selenium package is not installed"
    if CHROMIUM is None or CHROMEDRIVER is None:
        return "chromium / chromedriver are not installed"
    return None


@pytest.fixture(scope="module")
def browser(tmp_path_factory: Any) -> Any:
    """One headless Chromium for this module (its own profile folder)."""
    missing = _missing()
    if missing is not None:
        message = f"{missing}: run scripts/install-browser"
        if os.environ.get("CI"):
            pytest.fail(f"browser test cannot run in CI: {message}", pytrace=False)
        pytest.skip(message)
    from selenium import webdriver
    from selenium.webdriver.chrome.options import Options
    from selenium.webdriver.chrome.service import Service

    options = Options()
    options.binary_location = CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu",
                "--window-size=1500,1000", "--no-first-run", "--disable-extensions",
                f"--user-data-dir={tmp_path_factory.mktemp('chromium-profile')}"):
        options.add_argument(arg)
    driver = webdriver.Chrome(service=Service(executable_path=CHROMEDRIVER), options=options)
    driver.set_page_load_timeout(WAIT)
    driver.set_script_timeout(WAIT)
    try:
        yield driver
    finally:
        driver.quit()


class Balancer:
    """A balancer on the running reactor: two live backends and one dead address in pool
    web (health-checked), one peer in pool api, and an AdminService."""

    def __init__(self, token_file: Optional[str] = None) -> None:
        self.backends = [reactor.listenTCP(0, NamedFactory(name), interface="127.0.0.1")
                         for name in ("alpha", "beta")]
        self.live = [f"127.0.0.1:{b.getHost().port}" for b in self.backends]
        self.dead = f"127.0.0.1:{free_port()}"
        admin: Dict[str, Any] = {"bind": "127.0.0.1:0"}
        if token_file:
            admin["token_file"] = token_file
        config = make_config(
            {"web": {"bind": "127.0.0.1:0", "pool": "web"},
             "api": {"bind": "127.0.0.1:0", "pool": "api"}},
            {"web": {"peers": [self.live[0], {"address": self.live[1], "weight": 2},
                               self.dead],
                     "health": {"type": "tcp", "interval": "300ms", "timeout": "200ms",
                                "rise": 1, "fall": 1}},
             "api": {"peers": [self.live[1]], "balance": "leastconn"}},
            admin=admin)
        parts = {"health": default_pool_parts()["health"]}
        self.root = LBService(config, reactor, pool_parts=parts)
        self.admin = self.root.admin  # LBService builds its own admin server
        self.root.startService()
        self.root.pool("web").add_peer(parse_address("127.0.0.1:1"), 1)  # an operator's peer

    @property
    def url(self) -> str:
        return f"http://{self.admin.address()}/"

    def all_peers(self) -> List[str]:
        return sorted(f"{name} {key}" for name, service in self.root.pools.items()
                      for key in service.pool.peers)

    @defer.inlineCallbacks
    def stop(self) -> Any:
        yield self.root.stopService()
        for backend in self.backends:
            yield backend.stopListening()


@defer.inlineCallbacks
def settled(lb: Balancer) -> Any:
    """Some traffic through both listeners, and the dead peer marked down by its checks."""
    from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol
    from twisted.internet.protocol import Protocol

    class Once(Protocol):
        def __init__(self) -> None:
            self.done: defer.Deferred = defer.Deferred()

        def connectionLost(self, reason: Any = None) -> None:
            self.done.callback(None)

    for name in ("web", "api", "web", "web"):
        port = lb.root.listeners[name].port.getHost().port
        proto = Once()
        yield connectProtocol(TCP4ClientEndpoint(reactor, "127.0.0.1", port, timeout=5), proto)
        yield proto.done
    if "health" in lb.root.pools["web"].parts:
        yield poll_until(reactor, lambda: lb.root.pool("web").get(lb.dead).health == "down",
                         timeout=10, what="the dead peer to be marked down")


def drain_from_the_page(driver: Any, url: str, pool: str, peer: str,
                        screenshot: Optional[str] = None, token: Optional[str] = None,
                        change_behind: Optional[Callable[[], None]] = None) -> Dict[str, Any]:
    """In the browser (a thread): load the page, list its peer rows, click ``peer``'s drain
    button, wait until the refreshed row says drain; then, if ``change_behind`` is given,
    call it (it sets ``peer`` to maint elsewhere) and wait for the page to show that by its
    own refresh. Returns what it saw."""
    from selenium.common.exceptions import StaleElementReferenceException
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    # the page swaps its content every few seconds: read it in one script call, and retry
    # a click that lands on an element just replaced
    wait = WebDriverWait(driver, WAIT, ignored_exceptions=[StaleElementReferenceException])
    row_css = f'section[data-pool="{pool}"] tr[data-peer="{peer}"]'

    def admin_state(d: Any) -> Optional[str]:
        return d.execute_script(
            "var r = document.querySelector(arguments[0]);"
            "return r ? r.getAttribute('data-admin-state') : null;", row_css)

    def click(css: str) -> None:
        def attempt(d: Any) -> bool:
            d.find_element(By.CSS_SELECTOR, css).click()
            return True
        wait.until(attempt)

    driver.get(url)
    wait.until(admin_state)
    seen = sorted(driver.execute_script(
        "return Array.from(document.querySelectorAll('tr[data-peer]')).map(function (r) {"
        "  return r.closest('section').getAttribute('data-pool') + ' ' +"
        "         r.getAttribute('data-peer'); });"))
    result: Dict[str, Any] = {"peers": seen, "before": admin_state(driver),
                              "title": driver.title}
    message = lambda d: d.find_element(By.ID, "message").text  # noqa: E731
    if token is not None:
        box = driver.find_element(By.ID, "token")
        result["token_box_shown"] = box.is_displayed()
        # first without the token: the page must show the API's refusal
        click(f'{row_css} button[data-state="drain"]')
        wait.until(lambda d: "token" in message(d))
        result["refusal"] = message(driver)
        box.send_keys(token)
    click(f'{row_css} button[data-state="drain"]')
    wait.until(lambda d: admin_state(d) == "drain")
    result["after"] = admin_state(driver)
    result["message"] = message(driver)
    result["health_badges"] = sorted(set(driver.execute_script(
        "return Array.from(document.querySelectorAll('td.health .badge'))"
        ".map(function (e) { return e.className; });")))
    if screenshot:
        height = driver.execute_script("return document.documentElement.scrollHeight")
        driver.set_window_size(1500, max(600, min(int(height) + 40, 4000)))
        driver.save_screenshot(screenshot)
    if change_behind is not None:
        # a change made elsewhere shows up by itself: the page refreshes on its own
        change_behind()
        wait.until(lambda d: admin_state(d) == "maint")
        result["refreshed"] = admin_state(driver)
    return result


@pytest_twisted.inlineCallbacks
def test_status_page_shows_every_peer_and_drains_one(browser: Any, repo_dir: str) -> Any:
    """Headless Chromium loads the page of a running balancer: every peer of every pool has
    a row (health coloured: the dead peer is down), clicking drain on one peer drains it in
    the pool and the page shows it, and a change made elsewhere appears through the page's
    own refresh (?refresh=1). Saves artifacts/status-page.png."""
    lb = Balancer()
    try:
        yield settled(lb)
        target = lb.live[0]
        os.makedirs(os.path.join(repo_dir, "artifacts"), exist_ok=True)
        shot = os.path.join(repo_dir, "artifacts", "status-page.png")
        pool = lb.root.pool("web")

        def maint_elsewhere() -> None:  # called in the browser's thread
            threads.blockingCallFromThread(reactor, pool.set_admin_state, target, "maint")
        seen = yield threads.deferToThread(drain_from_the_page, browser, lb.url + "?refresh=1",
                                           "web", target, shot, None, maint_elsewhere)
        assert seen["peers"] == lb.all_peers()
        assert (seen["before"], seen["after"]) == ("ready", "drain")
        assert f"{target}: now drain" in seen["message"]
        assert seen["refreshed"] == "maint"
        assert lb.root.pool("web").get(target).admin_state == "maint"
        assert lb.root.pool("web").get(lb.live[1]).admin_state == "ready"
        if "health" in lb.root.pools["web"].parts:
            assert {"badge h-up", "badge h-down"} <= set(seen["health_badges"])
        assert os.path.getsize(shot) > 10000
    finally:
        yield lb.stop()


@pytest_twisted.inlineCallbacks
def test_with_a_token_the_page_asks_for_it(browser: Any, tmp_path: Any) -> Any:
    """With admin.token_file the page shows a token field; a click without the token is
    refused by the API (the page says so, nothing changes), with it the drain goes through."""
    token_file = tmp_path / "admin.token"
    token_file.write_text("browser-secret\n")
    lb = Balancer(str(token_file))
    try:
        target = lb.live[1]
        seen = yield threads.deferToThread(drain_from_the_page, browser, lb.url, "api",
                                           target, None, "browser-secret")
        assert seen["token_box_shown"] is True
        assert "token" in seen["refusal"]
        assert (seen["before"], seen["after"]) == ("ready", "drain")
        assert lb.root.pool("api").get(target).admin_state == "drain"
    finally:
        yield lb.stop()
