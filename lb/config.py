"""The configuration file: YAML in, frozen validated objects out.

No Twisted here. Validation walks the whole document and collects every problem as
``path.to.key: problem`` so an operator fixes a config in one pass, the way ``nginx -t``
and ``haproxy -c`` report. Whatever the file holds, reading it ends in a Config or a
ConfigError: the YAML loader is bounded (size, nesting, alias expansion) and the walk never
assumes a type it has not checked.
"""

from __future__ import annotations

import ipaddress
import math
import os
import re
from dataclasses import dataclass, field, replace
from typing import Any, Callable, Dict, List, Mapping, Optional, Set, Tuple, Union

import yaml
from yaml.constructor import ConstructorError

from lb.net import Address, host_name, parse_address, short_repr

__all__ = ["Address", "ConfigError", "Config", "parse_address", "host_name", "check", "load",
           "parse", "parse_duration", "parse_size"]

BALANCE_ALGORITHMS = ("roundrobin", "leastconn", "random", "p2c", "source")
MAX_WEIGHT = 256  # HAProxy's bound; Consul weights above it are clamped
DEFAULT_CONSUL_URL = "http://127.0.0.1:8500"
LISTENER_MODES = ("tcp", "http")
RETRY_CONDITIONS = ("connect-failure", "empty-response", "reset", "502", "503", "504")
FORWARDED_MODES = ("append", "replace", "off")
MAX_SPLIT_WEIGHT = 1000  # relative shares; 1000 gives 0.1% steps
CONSUL_POOL_PREFIX = "consul:"  # pools consul_routes create are named consul:<service>
ROUTES_WATCH_PREFIX = "routes:"  # lb_consul_*{pool="routes:<listener>"}: a routes watch

# Bounds on what a config file may be. Past them the file is refused with a problem line
# naming the bound, before anything walks it (a reload runs on the reactor thread).
MAX_CONFIG_BYTES = 1 << 20   # 1 MiB; PyYAML takes seconds on a file this size
MAX_DEPTH = 32               # levels; pools.P.health.expect_status[0] is 6 (counting the top)
MAX_NODES = 1_000_000        # values once aliases are expanded; 1 MiB of plain text holds fewer
MAX_INT_DIGITS = 4300        # Python's own bound for int(str), sys.get_int_max_str_digits()
MAX_DURATION = 576 * 3600.0  # 24 days: longer means "never" (HAProxy's timers stop at 24.8)
MAX_TOKEN_BYTES = 4096       # a token file holds one token on one line

IPNetwork = Union[ipaddress.IPv4Network, ipaddress.IPv6Network]


class ConfigError(Exception):
    """A config failed validation; ``problems`` holds every ``path: problem`` line."""

    def __init__(self, problems: List[str], source: str = "") -> None:
        self.problems = [one_line(problem) for problem in problems]
        self.source = one_line(source)
        super().__init__("\n".join(self.lines()))

    def lines(self) -> List[str]:
        prefix = f"{self.source}: " if self.source else ""
        return [prefix + problem for problem in self.problems]


def one_line(text: str) -> str:
    """``text`` with control characters and line breaks escaped, so that a problem naming a
    key or value that holds them is still one line on stderr and in the log."""
    if text.isprintable():
        return text
    return "".join(ch if ch.isprintable() else repr(ch)[1:-1] for ch in text)


_show = short_repr  # a problem line quotes the value, not a megabyte of it


_DURATION_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0}


def parse_duration(value: Any) -> float:
    """``500ms``/``2s``/``5m``/``1h`` (decimals allowed) or bare ``0`` → seconds."""
    if isinstance(value, bool):
        raise ValueError("expected a duration like '2s'")
    if isinstance(value, (int, float)) and value == 0:
        return 0.0
    if not isinstance(value, str):
        raise ValueError(f"expected a duration like '2s', got {_show(value)}")
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h)\s*", value)
    if not m:
        raise ValueError(f"{_show(value)} is not a duration (use e.g. '500ms', '2s', '5m', "
                         "'1h')")
    seconds = float(m.group(1)) * _DURATION_UNITS[m.group(2)]  # inf for 400 digits, no error
    if not seconds <= MAX_DURATION:
        raise ValueError(f"{_show(value)} is longer than the maximum {MAX_DURATION / 3600:g}h "
                         f"({MAX_DURATION / 86400:g} days)")
    return seconds


@dataclass(frozen=True)
class StaticPeer:
    address: Address
    weight: int = 1


@dataclass(frozen=True)
class HealthConfig:
    type: str = "http"
    path: str = "/health"
    host: Optional[str] = None
    expect_status: Tuple[Tuple[int, int], ...] = ((200, 200),)
    interval: float = 2.0
    timeout: float = 1.0
    rise: int = 2
    fall: int = 3
    concurrency: int = 10

    def status_ok(self, code: int) -> bool:
        return any(low <= code <= high for low, high in self.expect_status)


@dataclass(frozen=True)
class PoolConsulConfig:
    service: Optional[str] = None
    kv_prefix: Optional[str] = None
    tags: Tuple[str, ...] = ()
    passing_only: bool = True


@dataclass(frozen=True)
class OutlierConfig:
    """A pool's passive L7 check: a peer answering ``consecutive_5xx`` 5xx in a row is
    ejected for ``ejection_time`` (doubling on each repeat), never more than ``max_ejected``
    percent of the pool at once."""

    consecutive_5xx: int = 5
    ejection_time: float = 30.0
    max_ejected: float = 50.0  # a percentage, 0-100 (``50%`` in the file)


@dataclass(frozen=True)
class StickyCookieConfig:
    """The cookie that names a client's peer (its value is lb's to choose)."""

    name: str = "lb_peer"


@dataclass(frozen=True)
class HashKey:
    """What ``balance: source`` hashes: ``client_ip``, ``path``, ``header`` or ``cookie``.
    For the last two ``name`` is the header name lower-cased (header names ignore case) or
    the cookie name as written (cookie names do not)."""

    kind: str = "client_ip"
    name: Optional[str] = None

    def __str__(self) -> str:
        return f"{self.kind}:{self.name}" if self.name is not None else self.kind


@dataclass(frozen=True)
class PoolConfig:
    name: str
    balance: str = "roundrobin"
    hash_balance_factor: Optional[float] = None
    slow_start: float = 0.0
    peers: Tuple[StaticPeer, ...] = ()
    consul: Optional[PoolConsulConfig] = None
    health: Optional[HealthConfig] = None
    connect_timeout: float = 2.0
    retries: int = 2
    drain_timeout: float = 30.0
    send_proxy: str = "off"
    # HTTP mode only (valid on every pool, read when an http listener reaches it)
    keepalive: int = 32  # idle connections kept per peer; 0: a new connection per request
    keepalive_timeout: float = 60.0
    retry_on: Tuple[str, ...] = ("connect-failure", "empty-response")  # of RETRY_CONDITIONS
    outlier: Optional[OutlierConfig] = None
    sticky_cookie: Optional[StickyCookieConfig] = None
    hash_key: HashKey = HashKey()


@dataclass(frozen=True)
class WeightedPool:
    """One entry of a route's ``split``: a pool and its relative share (0-1000)."""

    pool: str
    weight: int


@dataclass(frozen=True)
class RouteConfig:
    """A route of an http listener: every matcher it has must match (an absent one matches
    anything); the request then goes to ``pool``, or to one of ``split`` picked by weight
    (exactly one of the two is set)."""

    host: Optional[str] = None  # lower-case ASCII (IDNA); "*.example.com": a wildcard
    path_prefix: Optional[str] = None  # starts with "/"; matches whole segments
    headers: Tuple[Tuple[str, str], ...] = ()  # (lower-cased name, exact value), by name
    pool: Optional[str] = None
    split: Tuple[WeightedPool, ...] = ()
    strip_prefix: bool = False


@dataclass(frozen=True)
class ConsulRoutesConfig:
    """Routes from Consul tags (Fabio's ``urlprefix-`` syntax) and the pools they get."""

    tag_prefix: str = "urlprefix-"
    pool_defaults: PoolConfig = PoolConfig(name="")  # no peers, no consul: Consul gives those

    def pool_for(self, service: str) -> PoolConfig:
        """The pool for an announcing service: ``pool_defaults`` named ``consul:<service>``,
        its peers that service's passing instances."""
        return replace(self.pool_defaults, name=CONSUL_POOL_PREFIX + service,
                       consul=PoolConsulConfig(service=service, passing_only=True))


@dataclass(frozen=True)
class HttpConfig:
    """An http listener's protocol settings (the defaults on a tcp listener, unused)."""

    max_header_size: int = 16 * 1024  # bytes: request line + headers
    client_header_timeout: float = 10.0
    client_keepalive_timeout: float = 60.0  # 0: close after each response
    response_timeout: float = 60.0
    forwarded: str = "append"  # of FORWARDED_MODES
    trusted_proxies: Tuple[IPNetwork, ...] = ()
    request_id: Optional[str] = "X-Request-Id"  # a header name as written; None: off


@dataclass(frozen=True)
class ListenerConfig:
    name: str
    bind: Address
    pool: str  # "" only on an http listener without a default route
    mode: str = "tcp"
    accept_proxy: bool = False
    max_connections: int = 10000
    idle_timeout: float = 300.0  # in http mode: for a tunnel after an Upgrade
    fin_timeout: float = 30.0  # once one side sent FIN (HAProxy's timeout client-fin/server-fin)
    allow: Tuple[IPNetwork, ...] = ()
    routes: Tuple[RouteConfig, ...] = ()  # http only, in match order
    consul_routes: Optional[ConsulRoutesConfig] = None  # http only
    http: HttpConfig = HttpConfig()


@dataclass(frozen=True)
class ConsulConfig:
    url: str = DEFAULT_CONSUL_URL
    token: Optional[str] = field(default=None, repr=False)  # never logged
    datacenter: Optional[str] = None
    consistency: str = "default"
    wait: float = 55.0
    poll_interval: float = 5.0


@dataclass(frozen=True)
class AdminConfig:
    bind: Address = Address("127.0.0.1", 9901)
    token: Optional[str] = field(default=None, repr=False)


@dataclass(frozen=True)
class Config:
    path: str
    listeners: Mapping[str, ListenerConfig]
    pools: Mapping[str, PoolConfig]
    consul: Optional[ConsulConfig] = None
    admin: AdminConfig = AdminConfig()
    state_dir: str = "var/lb"
    shutdown_timeout: float = 30.0

    def summary(self) -> str:
        """The line ``lb check`` prints and a reload logs; http counts only when there are
        http listeners, so a tcp-only config reads as it always did."""
        peers = sum(len(p.peers) for p in self.pools.values())
        consul = sum(1 for p in self.pools.values() if p.consul)
        http = [listener for listener in self.listeners.values() if listener.mode == "http"]
        listeners = f"{len(self.listeners)} listener(s)"
        routes = ""
        if http:
            listeners += f" ({len(http)} http)"
            routes = f", {sum(len(listener.routes) for listener in http)} route(s)"
            from_consul = sum(1 for listener in http if listener.consul_routes is not None)
            if from_consul:
                routes += f" + Consul routes on {from_consul} listener(s)"
        return (
            f"configuration OK: {listeners}, {len(self.pools)} pool(s){routes}, "
            f"{peers} static peer(s), {consul} Consul-discovered pool(s)"
        )


# --- validation -----------------------------------------------------------------------------


class _Checker:
    """Walks a parsed YAML document, collecting problems with their key paths."""

    def __init__(self, base_dir: str, environ: Mapping[str, str]) -> None:
        self.problems: List[str] = []
        self.base_dir = base_dir
        self.environ = environ

    def fail(self, path: str, problem: str) -> None:
        self.problems.append(f"{path}: {problem}")

    def mapping(self, path: str, value: Any, allowed: Tuple[str, ...]) -> Dict[str, Any]:
        if value is None:
            return {}
        if not isinstance(value, dict):
            self.fail(path or "(top level)", f"expected a mapping, got {_kind(value)}")
            return {}
        for key in value:
            if key not in allowed:
                self.fail(_join(path, _key(key)),
                          f"unknown key (expected one of: {', '.join(allowed)})")
        return value

    def named(self, path: str, value: Any) -> Dict[str, Any]:
        """The entries of ``pools`` or ``listeners``: a mapping whose keys are names. YAML
        reads ``1:`` or ``~:`` as a number or null; such a name is refused, not str()-ed."""
        entries = self.mapping(path, value, tuple(value) if isinstance(value, dict) else ())
        names: Dict[str, Any] = {}
        for name, entry in entries.items():
            if isinstance(name, str) and name:
                names[name] = entry
            else:
                self.fail(_join(path, _key(name)),
                          f"a name must be a non-empty string, got {_kind(name)}")
        return names

    def get(self, path: str, mapping: Dict[str, Any], key: str, default: Any,
            convert: Callable[[Any], Any]) -> Any:
        if mapping.get(key) is None:  # absent or explicitly null: the default
            return default
        try:
            return convert(mapping[key])
        except (ValueError, TypeError) as e:
            self.fail(_join(path, key), str(e))
            return default

    def path_value(self, value: Any) -> str:
        if not isinstance(value, str) or not value:
            raise ValueError(f"expected a path, got {_kind(value)}")
        if "\0" in value:
            raise ValueError("expected a path without a NUL character")
        return os.path.normpath(os.path.join(self.base_dir, value))

    def token_from_file(self, path: str, value: Any) -> Optional[str]:
        file_path = self.path_value(value)
        try:
            with open(file_path, "rb") as f:
                data = f.read(MAX_TOKEN_BYTES + 1)
        except OSError as e:
            raise ValueError(f"cannot read token file {file_path}: {e.strerror}") from None
        if len(data) > MAX_TOKEN_BYTES:
            raise ValueError(f"token file {file_path} is larger than "
                             f"{MAX_TOKEN_BYTES // 1024} KiB; it should hold one token")
        try:
            token = data.decode("utf-8").strip()
        except UnicodeDecodeError:
            raise ValueError(f"token file {file_path} is not UTF-8 text") from None
        if not token:
            raise ValueError(f"token file {file_path} is empty")
        if not token.isprintable():  # it goes into a request header
            raise ValueError(f"token file {file_path} has a control character or more than "
                             "one line; it should hold one token")
        return token


def _join(path: str, key: str) -> str:
    return f"{path}.{key}" if path else key


def _key(key: Any) -> str:
    """A key as a problem line names it; quoted when blank or padded (a `pool :` typo)."""
    text = str(key)
    return text if text and text == text.strip() else repr(text)


def _kind(value: Any) -> str:
    if value is None:
        return "nothing"
    return {dict: "a mapping", list: "a list", str: "a string", bool: "a boolean",
            int: "an integer", float: "a number"}.get(type(value), type(value).__name__)


def _bool(value: Any) -> bool:
    if not isinstance(value, bool):
        raise ValueError(f"expected true or false, got {_kind(value)}")
    return value


def _int(low: int, high: Optional[int] = None) -> Callable[[Any], int]:
    def convert(value: Any) -> int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ValueError(f"expected an integer, got {_kind(value)}")
        if value < low or (high is not None and value > high):
            bound = f"{low}-{high}" if high is not None else f">= {low}"
            raise ValueError(f"{_show(value)} is out of range ({bound})")
        return value
    return convert


def _str(value: Any) -> str:
    if not isinstance(value, str) or not value:
        raise ValueError(f"expected a non-empty string, got {_kind(value)}")
    return value


def _choice(*choices: str) -> Callable[[Any], str]:
    def convert(value: object) -> str:
        if not isinstance(value, str) or value not in choices:
            raise ValueError(f"{_show(value)} is not one of: {', '.join(choices)}")
        return value
    return convert


def _duration(minimum: float = 0.0, *, positive: bool = False,
              maximum: Optional[float] = None) -> Callable[[Any], float]:
    def convert(value: Any) -> float:
        seconds = parse_duration(value)
        if positive and seconds <= 0:
            raise ValueError("must be greater than 0")
        if seconds < minimum:
            raise ValueError(f"must be at least {minimum}s")
        if maximum is not None and seconds > maximum:
            raise ValueError(f"{_show(value)} is longer than the maximum {maximum:g}s")
        return seconds
    return convert


def _status_ranges(value: Any) -> Tuple[Tuple[int, int], ...]:
    if not isinstance(value, list) or not value:
        raise ValueError("expected a non-empty list of status codes or ranges like '200-399'")
    ranges = []
    for item in value:
        if isinstance(item, int) and not isinstance(item, bool):
            low = high = item
        elif isinstance(item, str) and re.fullmatch(r"\s*\d{3}\s*(-\s*\d{3}\s*)?", item):
            parts = [int(p) for p in item.split("-")]
            low, high = parts[0], parts[-1]
        else:
            raise ValueError(f"{_show(item)} is not a status code or a range like '200-399'")
        if not (100 <= low <= high <= 599):
            raise ValueError(f"{_show(item)} is not a valid status code range (100-599, low-high)")
        ranges.append((low, high))
    return tuple(ranges)


def _off_or(*choices: str) -> Callable[[Any], str]:
    """One of ``choices``, which include ``off``: YAML 1.1 reads a bare ``off`` (or ``no``)
    as false, and it still means off."""
    def convert(value: Any) -> str:
        if value is False:
            return "off"
        if isinstance(value, str) and value in choices:
            return value
        raise ValueError(f"{_show(value)} is not one of: {', '.join(choices)}")
    return convert


_SIZE_UNITS = {"": 1, "B": 1, "KiB": 1024, "MiB": 1024 * 1024}


def parse_size(value: Any) -> int:
    """A size in bytes: a plain integer, or an integer with the unit ``B``, ``KiB`` (1024)
    or ``MiB`` (1024²), as in ``16KiB``. ``16k``, ``16KB``, ``1M`` are refused rather than
    guessed: nginx reads ``k`` as 1024, SI as 1000."""
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    if not isinstance(value, str):
        raise ValueError(f"expected a size like '16KiB', got {_kind(value)}")
    m = re.fullmatch(r"\s*(\d{1,12})\s*([A-Za-z]*)\s*", value)
    if not m:
        raise ValueError(f"{_show(value)} is not a size (use e.g. '16KiB', '1MiB' or a "
                         "number of bytes)")
    number, unit = int(m.group(1)), m.group(2)
    if unit in _SIZE_UNITS:
        return number * _SIZE_UNITS[unit]
    iec = {"k": "KiB", "m": "MiB"}.get(unit[0].lower())
    if iec is not None:
        raise ValueError(f"{_show(value)} is ambiguous (1000 or 1024?): write "
                         f"'{number}{iec}' or a number of bytes")
    raise ValueError(f"{_show(value)} has an unknown unit (use B, KiB or MiB)")


def _size(low: int, high: int) -> Callable[[Any], int]:
    def convert(value: Any) -> int:
        size = parse_size(value)
        if not low <= size <= high:
            raise ValueError(f"{_show(value)} is out of range ({_format_size(low)}-"
                             f"{_format_size(high)})")
        return size
    return convert


def _format_size(size: int) -> str:
    for unit in ("MiB", "KiB"):
        if size and size % _SIZE_UNITS[unit] == 0:
            return f"{size // _SIZE_UNITS[unit]}{unit}"
    return f"{size}B"


# RFC 9110 token: header names; RFC 6265 cookie names are tokens too
_TOKEN = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")
_TOKEN_CHARS = "letters, digits and !#$%&'*+-.^_`|~"


def _token(what: str) -> Callable[[Any], str]:
    def convert(value: Any) -> str:
        if not isinstance(value, str) or not _TOKEN.fullmatch(value):
            raise ValueError(f"{_show(value)} is not a {what} ({_TOKEN_CHARS} only)")
        return value
    return convert


def _percent(value: Any) -> float:
    """``50%``, or a plain number read as a percentage (``50``). A number between 0 and 1
    is refused: it may mean a fraction (0.5 for 50%)."""
    if isinstance(value, str):
        m = re.fullmatch(r"\s*(\d{1,10}(?:\.\d{1,10})?)\s*%\s*", value)
        if not m:
            raise ValueError(f"{_show(value)} is not a percentage like '50%'")
        number = float(m.group(1))
    elif isinstance(value, (int, float)) and not isinstance(value, bool):
        try:
            number = float(value)
        except OverflowError:  # an integer past float's range
            number = math.inf
        if 0 < number < 1:
            raise ValueError(f"{_show(value)} is ambiguous: write '{number * 100:g}%' or "
                             f"'{number:g}%'")
    else:
        raise ValueError(f"expected a percentage like '50%', got {_kind(value)}")
    if not 0 <= number <= 100:  # NaN too
        raise ValueError(f"{_show(value)} is out of range (0%-100%)")
    return number


def _hash_key(value: Any) -> HashKey:
    if value in ("client_ip", "path"):
        return HashKey(value)
    if isinstance(value, str):
        kind, colon, name = value.partition(":")
        if colon and kind in ("header", "cookie"):
            _token(f"{kind} name")(name)
            return HashKey(kind, name.lower() if kind == "header" else name)
    raise ValueError(f"{_show(value)} is not one of: client_ip, path, header:NAME, "
                     "cookie:NAME")


def _cidrs(value: Any) -> Tuple[IPNetwork, ...]:
    if value is None:
        return ()
    if not isinstance(value, list):
        raise ValueError(f"expected a list of CIDRs, got {_kind(value)}")
    networks = []
    bad = []
    for item in value:
        try:
            if not isinstance(item, (str, int)):  # str() of a nested list could be huge
                raise ValueError(item)
            networks.append(ipaddress.ip_network(str(item).strip(), strict=False))
        except ValueError:
            bad.append(_show(item))
    if bad:
        more = f" and {len(bad) - 5} more" if len(bad) > 5 else ""
        raise ValueError(f"not a CIDR: {', '.join(bad[:5])}{more} "
                         "(use e.g. '10.0.0.0/8' or '::1/128')")
    return tuple(networks)


def _check_consul(c: _Checker, raw: Any) -> Optional[ConsulConfig]:
    if "consul" not in raw:
        return None
    m = c.mapping("consul", raw["consul"],
                  ("url", "token_file", "datacenter", "consistency", "wait", "poll_interval"))
    env_url = c.environ.get("CONSUL_HTTP_ADDR")
    url = c.get("consul", m, "url", None, _str)
    if url is None:
        url = env_url or DEFAULT_CONSUL_URL
        where = "consul.url ($CONSUL_HTTP_ADDR)" if env_url else "consul.url"
    else:
        where = "consul.url"
    if "://" not in url:
        url = "http://" + url
    if not re.fullmatch(r"https?://[^/\s]+/?", url):
        c.fail(where, f"{_show(url)} is not an http:// or https:// URL of a Consul agent")
    token = None
    if m.get("token_file") is not None:
        token = c.get("consul", m, "token_file", None,
                      lambda v: c.token_from_file("consul.token_file", v))
    else:
        token = c.environ.get("CONSUL_HTTP_TOKEN") or None
    return ConsulConfig(
        url=url.rstrip("/"),
        token=token,
        datacenter=c.get("consul", m, "datacenter", None, _str),
        consistency=c.get("consul", m, "consistency", "default",
                          _choice("default", "stale", "consistent")),
        wait=c.get("consul", m, "wait", 55.0, _duration(1.0, maximum=600.0)),
        poll_interval=c.get("consul", m, "poll_interval", 5.0, _duration(positive=True)),
    )


def _check_admin(c: _Checker, raw: Any) -> AdminConfig:
    m = c.mapping("admin", raw.get("admin"), ("bind", "token_file"))
    bind = c.get("admin", m, "bind", AdminConfig.bind,
                 lambda v: parse_address(v, allow_port_zero=True))
    token = None
    if m.get("token_file") is not None:
        token = c.get("admin", m, "token_file", None,
                      lambda v: c.token_from_file("admin.token_file", v))
    return AdminConfig(bind=bind, token=token)


def _check_health(c: _Checker, path: str, raw: Any) -> Optional[HealthConfig]:
    if raw is None:
        return None
    m = c.mapping(path, raw, ("type", "path", "host", "expect_status", "interval", "timeout",
                              "rise", "fall", "concurrency"))
    kind = c.get(path, m, "type", "http", _choice("http", "tcp"))
    if kind == "tcp":
        for key in ("path", "host", "expect_status"):
            if key in m:
                c.fail(f"{path}.{key}", "only applies to type: http")

    def printable(value: str) -> bool:  # goes into the request line or a header
        return all(" " < ch < "\x7f" or ord(ch) > 0x9f for ch in value)

    def http_path(value: Any) -> str:
        if not isinstance(value, str) or not value.startswith("/") or not printable(value):
            raise ValueError(f"{_show(value)} is not an absolute request path like '/health'")
        return value

    def host_header(value: object) -> str:
        value = _str(value)
        if not printable(value):
            raise ValueError(f"{_show(value)} is not a Host header value like 'www.example.com'")
        return value

    # timeout may exceed interval (as in HAProxy and Envoy): a peer's next probe is due
    # `interval` after its last one ended, so one peer never has two probes in flight
    interval = c.get(path, m, "interval", 2.0, _duration(positive=True))
    timeout = c.get(path, m, "timeout", 1.0, _duration(positive=True))
    return HealthConfig(
        type=kind,
        path=c.get(path, m, "path", "/health", http_path),
        host=c.get(path, m, "host", None, host_header),
        expect_status=c.get(path, m, "expect_status", ((200, 200),), _status_ranges),
        interval=interval,
        timeout=timeout,
        rise=c.get(path, m, "rise", 2, _int(1, 100)),
        fall=c.get(path, m, "fall", 3, _int(1, 100)),
        concurrency=c.get(path, m, "concurrency", 10, _int(1, 10000)),
    )


def _check_pool_consul(c: _Checker, path: str, raw: Any, have_consul: bool,
                       ) -> Optional[PoolConsulConfig]:
    if raw is None:
        return None
    m = c.mapping(path, raw, ("service", "kv_prefix", "tags", "passing_only"))

    def tags(value: Any) -> Tuple[str, ...]:
        if not isinstance(value, list) or not all(isinstance(t, str) and t for t in value):
            raise ValueError("expected a list of tag strings")
        return tuple(value)

    def kv_prefix(value: object) -> str:
        value = _str(value).strip("/")
        if not value:
            raise ValueError("must name a KV folder like 'upstreams/web'")
        return value

    def service(value: object) -> str:
        value = _str(value)
        if "/" in value or any(ch.isspace() for ch in value):
            raise ValueError(f"{_show(value)} is not a Consul service name")
        return value

    cfg = PoolConsulConfig(
        service=c.get(path, m, "service", None, service),
        kv_prefix=c.get(path, m, "kv_prefix", None, kv_prefix),
        tags=c.get(path, m, "tags", (), tags),
        passing_only=c.get(path, m, "passing_only", True, _bool),
    )
    if ("service" in m) == ("kv_prefix" in m):
        c.fail(path, "needs exactly one of 'service' or 'kv_prefix'")
    if "kv_prefix" in m and ("tags" in m or "passing_only" in m):
        c.fail(path, "'tags' and 'passing_only' only apply to 'service'")
    if not have_consul:
        c.fail(path, "needs the top-level 'consul' section (write 'consul: {}' for defaults)")
    return cfg


def _check_peers(c: _Checker, path: str, raw: Any) -> Tuple[StaticPeer, ...]:
    if raw is None:
        return ()
    if not isinstance(raw, list):
        c.fail(path, f"expected a list of peers, got {_kind(raw)}")
        return ()
    peers: List[StaticPeer] = []
    seen: Dict[Address, int] = {}
    for i, item in enumerate(raw):
        item_path = f"{path}[{i}]"
        if isinstance(item, dict):
            m = c.mapping(item_path, item, ("address", "weight"))
            if "address" not in m:
                c.fail(item_path, "missing 'address'")
                continue
            address = c.get(item_path, m, "address", None, parse_address)
            weight = c.get(item_path, m, "weight", 1, _int(0, MAX_WEIGHT))
        else:
            try:
                address = parse_address(item)
            except ValueError as e:
                c.fail(item_path, str(e))
                continue
            weight = 1
        if address is None:
            continue
        if address in seen:
            c.fail(item_path, f"{address} is already listed at {path}[{seen[address]}]")
            continue
        seen[address] = i
        peers.append(StaticPeer(address, weight))
    return tuple(peers)


POOL_KEYS = ("balance", "hash_balance_factor", "slow_start", "peers", "consul", "health",
             "connect_timeout", "retries", "drain_timeout", "send_proxy", "keepalive",
             "keepalive_timeout", "retry_on", "outlier", "sticky_cookie", "hash_key")


def _check_pool(c: _Checker, path: str, name: str, raw: Any, have_consul: bool, *,
                template: bool = False) -> PoolConfig:
    """A pool at ``path``; a ``template`` (consul_routes' pool_defaults) is every pool key
    but the peers, which Consul gives the pools it is a template for."""
    m = c.mapping(path, raw, POOL_KEYS)
    if raw is None and not template:
        c.fail(path, "expected a mapping with peers and/or consul")
    if template:
        for key in ("peers", "consul"):
            if key in m:
                c.fail(f"{path}.{key}", "not allowed here: Consul gives the pools of "
                                        "consul_routes their peers")
        m = {key: value for key, value in m.items() if key not in ("peers", "consul")}

    def factor(value: Any) -> float:
        number = math.nan
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            try:
                number = float(value)
            except OverflowError:  # an integer past float's range
                number = math.inf if value > 0 else -math.inf
        if number == math.inf:
            raise ValueError(f"{_show(value)} is too large (a number greater than 1, "
                             "e.g. 1.25)")
        if not number > 1:
            raise ValueError(f"{_show(value)} must be a number greater than 1 (e.g. 1.25)")
        return number

    balance = c.get(path, m, "balance", "roundrobin", _choice(*BALANCE_ALGORITHMS))
    balance_known = m.get("balance") in (None, *BALANCE_ALGORITHMS)  # else already a problem
    hash_balance_factor = c.get(path, m, "hash_balance_factor", None, factor)
    hash_key = c.get(path, m, "hash_key", HashKey(), _hash_key)
    # SPEC's own example spells out the default `hash_key: client_ip` on a roundrobin pool
    for key, is_set in (("hash_balance_factor", hash_balance_factor is not None),
                        ("hash_key", hash_key != HashKey())):
        if is_set and balance != "source" and balance_known:
            c.fail(f"{path}.{key}", "only applies to balance: source")
    return PoolConfig(
        name=name,
        balance=balance,
        hash_balance_factor=hash_balance_factor,
        slow_start=c.get(path, m, "slow_start", 0.0, _duration()),
        peers=_check_peers(c, f"{path}.peers", m.get("peers")),
        consul=_check_pool_consul(c, f"{path}.consul", m.get("consul"), have_consul),
        health=_check_health(c, f"{path}.health", m.get("health")),
        connect_timeout=c.get(path, m, "connect_timeout", 2.0, _duration(positive=True)),
        retries=c.get(path, m, "retries", 2, _int(0, 100)),
        drain_timeout=c.get(path, m, "drain_timeout", 30.0, _duration()),
        send_proxy=c.get(path, m, "send_proxy", "off", _off_or("off", "v1", "v2")),
        keepalive=c.get(path, m, "keepalive", 32, _int(0, 10000)),
        keepalive_timeout=c.get(path, m, "keepalive_timeout", 60.0, _duration(positive=True)),
        retry_on=_check_retry_on(c, f"{path}.retry_on", m.get("retry_on")),
        outlier=_check_outlier(c, f"{path}.outlier", m.get("outlier")),
        sticky_cookie=_check_sticky_cookie(c, f"{path}.sticky_cookie", m.get("sticky_cookie")),
        hash_key=hash_key,
    )


def _check_retry_on(c: _Checker, path: str, raw: Any) -> Tuple[str, ...]:
    """The answers that make a request be retried. YAML reads ``502`` as an integer; it
    is kept as the text ``"502"``, like the names."""
    if raw is None:
        return PoolConfig.retry_on
    if not isinstance(raw, list):
        c.fail(path, f"expected a list like [connect-failure, empty-response], got {_kind(raw)}")
        return PoolConfig.retry_on
    conditions: List[str] = []
    seen: Dict[str, int] = {}
    for i, item in enumerate(raw):
        text = item
        if isinstance(item, int) and not isinstance(item, bool) and 100 <= item <= 999:
            text = str(item)
        if not isinstance(text, str) or text not in RETRY_CONDITIONS:
            c.fail(f"{path}[{i}]", f"{_show(item)} is not one of: {', '.join(RETRY_CONDITIONS)}")
        elif text in seen:
            c.fail(f"{path}[{i}]", f"{text} is already listed at {path}[{seen[text]}]")
        else:
            seen[text] = i
            conditions.append(text)
    return tuple(conditions)


def _check_outlier(c: _Checker, path: str, raw: Any) -> Optional[OutlierConfig]:
    if raw is None:
        return None
    if not isinstance(raw, dict):
        c.fail(path, f"expected a mapping (write 'outlier: {{}}' for the defaults), "
                     f"got {_kind(raw)}")
        return None
    m = c.mapping(path, raw, ("consecutive_5xx", "ejection_time", "max_ejected"))
    return OutlierConfig(
        consecutive_5xx=c.get(path, m, "consecutive_5xx", 5, _int(1, 1000)),
        ejection_time=c.get(path, m, "ejection_time", 30.0, _duration(positive=True)),
        max_ejected=c.get(path, m, "max_ejected", 50.0, _percent),
    )


def _check_sticky_cookie(c: _Checker, path: str, raw: Any) -> Optional[StickyCookieConfig]:
    """A mapping only (``{name: lb_peer}``; ``{}`` for that name): one spelling, with room
    for cookie attributes later. ``null`` or a bare ``off`` (false) is no sticky cookie."""
    if raw is None or raw is False:
        return None
    if not isinstance(raw, dict):
        c.fail(path, f"expected a mapping like {{name: lb_peer}}, got {_kind(raw)}")
        return None
    m = c.mapping(path, raw, ("name",))
    return StickyCookieConfig(name=c.get(path, m, "name", StickyCookieConfig.name,
                                         _token("cookie name")))


LISTENER_KEYS = ("bind", "mode", "pool", "accept_proxy", "max_connections", "idle_timeout",
                 "fin_timeout", "allow", "routes", "consul_routes", "http")
HTTP_LISTENER_KEYS = ("routes", "consul_routes", "http")
ROUTE_KEYS = ("host", "path_prefix", "headers", "pool", "split", "strip_prefix")
HTTP_KEYS = ("max_header_size", "client_header_timeout", "client_keepalive_timeout",
             "response_timeout", "forwarded", "trusted_proxies", "request_id")


def _pool_name(pools: Mapping[str, Any]) -> Callable[[Any], str]:
    def convert(value: Any) -> str:
        name = _str(value)
        if name not in pools:
            raise ValueError(f"no pool named {_show(name)} (pools: {', '.join(pools) or 'none'})")
        return name
    return convert


def _check_listener(c: _Checker, name: str, raw: Any, pools: Mapping[str, Any],
                    have_consul: bool) -> Optional[ListenerConfig]:
    path = f"listeners.{name}"
    m = c.mapping(path, raw, LISTENER_KEYS)
    if raw is None:
        c.fail(path, "expected a mapping with bind and pool")
    mode = c.get(path, m, "mode", "tcp", _choice(*LISTENER_MODES))
    mode_known = m.get("mode") in (None, *LISTENER_MODES)  # else already a problem
    if raw is not None and "bind" not in m:
        c.fail(f"{path}.bind", "missing (required)")
    if raw is not None and "pool" not in m and mode == "tcp" and mode_known:
        c.fail(f"{path}.pool", "missing (required)")
    bind = c.get(path, m, "bind", None, lambda v: parse_address(v, allow_port_zero=True))
    if bind is not None and not bind.is_ip:
        c.fail(f"{path}.bind", f"{_show(bind.host)} must be an IP address to listen on "
                               "(0.0.0.0 or [::] for all)")
    pool_name = c.get(path, m, "pool", None, _pool_name(pools))

    routes: Tuple[RouteConfig, ...] = ()
    consul_routes = None
    http = HttpConfig()
    if mode == "tcp" and mode_known:
        for key in HTTP_LISTENER_KEYS:
            if key in m:
                c.fail(f"{path}.{key}", "only applies to mode: http")
    else:
        routes = _check_routes(c, f"{path}.routes", m.get("routes"), pools)
        consul_routes = _check_consul_routes(c, f"{path}.consul_routes",
                                             m.get("consul_routes"), have_consul)
        http = _check_http(c, f"{path}.http", m.get("http"))
        if (mode == "http" and raw is not None and m.get("pool") is None
                and m.get("routes") in (None, []) and m.get("consul_routes") is None):
            c.fail(f"{path}.pool", "missing: an http listener needs a pool (its default "
                                   "route), routes or consul_routes; with none it could only "
                                   "answer 404")

    listener = ListenerConfig(
        name=name,
        bind=bind or Address("0.0.0.0", 0),
        pool=pool_name or "",
        mode=mode,
        accept_proxy=c.get(path, m, "accept_proxy", False, _bool),
        max_connections=c.get(path, m, "max_connections", 10000, _int(1)),
        idle_timeout=c.get(path, m, "idle_timeout", 300.0, _duration()),
        fin_timeout=c.get(path, m, "fin_timeout", 30.0, _duration()),
        allow=c.get(path, m, "allow", (), _cidrs),
        routes=routes,
        consul_routes=consul_routes,
        http=http,
    )
    return listener if bind is not None else None


def _check_routes(c: _Checker, path: str, raw: Any, pools: Mapping[str, Any],
                  ) -> Tuple[RouteConfig, ...]:
    """Routes in match order. Two that match the same requests are an error: the second
    could never be used (``/v1`` and ``/v1/`` match the same whole segments)."""
    if raw is None:
        return ()
    if not isinstance(raw, list):
        c.fail(path, f"expected a list of routes, got {_kind(raw)}")
        return ()
    routes: List[RouteConfig] = []
    seen: Dict[Any, int] = {}
    for i, item in enumerate(raw):
        before = len(c.problems)
        route = _check_route(c, f"{path}[{i}]", item, pools)
        if route is None or len(c.problems) > before:
            continue
        prefix = route.path_prefix.rstrip("/") or "/" if route.path_prefix is not None else None
        matches = (route.host, prefix, route.headers)
        if matches in seen:
            c.fail(f"{path}[{i}]", f"matches the same requests as {path}[{seen[matches]}] "
                                   "(same host, path_prefix and headers), so it would never "
                                   "be used")
            continue
        seen[matches] = i
        routes.append(route)
    return tuple(routes)


def _check_route(c: _Checker, path: str, raw: Any, pools: Mapping[str, Any],
                 ) -> Optional[RouteConfig]:
    if not isinstance(raw, dict):
        c.fail(path, f"expected a mapping like {{path_prefix: /api/, pool: api}}, "
                     f"got {_kind(raw)}")
        return None
    m = c.mapping(path, raw, ROUTE_KEYS)
    if m.get("host") is None and m.get("path_prefix") is None and m.get("headers") in (None, {}):
        c.fail(path, "matches every request: use the listener's pool for that (or "
                     "path_prefix: / for a split)")
    if (m.get("pool") is None) == (m.get("split") is None):
        c.fail(path, "needs exactly one of 'pool' or 'split'")
    strip_prefix = c.get(path, m, "strip_prefix", False, _bool)
    if strip_prefix and m.get("path_prefix") is None:
        c.fail(f"{path}.strip_prefix", "needs a path_prefix to strip")
    return RouteConfig(
        host=c.get(path, m, "host", None, check_route_host),
        path_prefix=c.get(path, m, "path_prefix", None, check_path_prefix),
        headers=_check_header_matches(c, f"{path}.headers", m.get("headers")),
        pool=c.get(path, m, "pool", None, _pool_name(pools)),
        split=_check_split(c, f"{path}.split", m.get("split"), pools),
        strip_prefix=strip_prefix,
    )


def check_route_host(value: Any) -> str:
    """The Host header's name without port: ``api.example.com`` (lower-cased, IDNA as
    ASCII), ``*.example.com`` (a whole first label only), an IP, or ``[v6]``."""
    text = _str(value)
    if text == "*":
        raise ValueError("'*' matches every host: leave host out")
    if text.startswith("[") and text.endswith("]"):
        try:
            return f"[{ipaddress.IPv6Address(text[1:-1])}]"
        except ValueError:
            raise ValueError(f"{_show(text)} is not an IPv6 address in brackets") from None
    if re.fullmatch(r"(\[[^\]]*\]|[^:\[\]]+):\d*", text):
        raise ValueError(f"{_show(text)} has a port: host matches the Host header without "
                         "its port")
    wildcard = text.startswith("*.")
    name = text[2:] if wildcard else text
    if "*" in name:
        raise ValueError(f"{_show(text)}: a wildcard is a whole first label only, as in "
                         "'*.example.com'")
    try:
        ascii_name = host_name(name)
    except ValueError as e:
        raise ValueError(f"{_show(text)} is not a valid host name: {e}") from None
    return "*." + ascii_name if wildcard else ascii_name


def check_path_prefix(value: Any) -> str:
    if not isinstance(value, str) or not value.startswith("/"):
        raise ValueError(f"{_show(value)} is not a path prefix starting with '/' (like "
                         "'/api/')")
    if not all("!" <= ch <= "~" for ch in value):
        raise ValueError(f"{_show(value)} has a space, a control or a non-ASCII character "
                         "(write it percent-encoded, as requests carry it)")
    if "?" in value or "#" in value:
        raise ValueError(f"{_show(value)} has a '?' or '#': a path prefix matches the path, "
                         "not the query")
    return value


def _header_value(value: Any) -> str:
    """An exact header value: text, or an integer YAML read from ``X-Canary: 1``."""
    if isinstance(value, int) and not isinstance(value, bool) and abs(value) < 10 ** 100:
        value = str(value)
    if not isinstance(value, str):
        raise ValueError(f"expected a string, got {_kind(value)} (quote a value YAML reads "
                         "as something else, like 'on' or '1.0')")
    if not all(" " <= ch <= "~" or ch == "\t" for ch in value):
        raise ValueError(f"{_show(value)} has a control or a non-ASCII character")
    if value != value.strip(" \t"):
        raise ValueError(f"{_show(value)} starts or ends with white space, which a header "
                         "value never does (it is not part of the value)")
    return value


def _check_header_matches(c: _Checker, path: str, raw: Any) -> Tuple[Tuple[str, str], ...]:
    """Header name → exact value, as (lower-cased name, value) pairs sorted by name: names
    ignore case, so ``X-A`` and ``x-a`` in one route are the same header."""
    if raw is None:
        return ()
    if not isinstance(raw, dict):
        c.fail(path, f"expected a mapping of header name to exact value, got {_kind(raw)}")
        return ()
    pairs: Dict[str, str] = {}
    written: Dict[str, str] = {}
    for name, value in raw.items():
        key_path = _join(path, _key(name))
        if not isinstance(name, str) or not _TOKEN.fullmatch(name):
            c.fail(key_path, f"not a header name ({_TOKEN_CHARS} only)")
            continue
        if name.lower() in written:
            c.fail(key_path, f"the same header as {_join(path, written[name.lower()])} "
                             "(header names ignore case)")
            continue
        try:
            pairs[name.lower()] = _header_value(value)
        except ValueError as e:
            c.fail(key_path, str(e))
        written[name.lower()] = name
    return tuple(sorted(pairs.items()))


def _check_split(c: _Checker, path: str, raw: Any, pools: Mapping[str, Any],
                 ) -> Tuple[WeightedPool, ...]:
    """Pools with relative weights (0-1000, each required, at least one above 0); a pool
    at most once."""
    if raw is None:
        return ()
    if not isinstance(raw, list) or not raw:
        c.fail(path, "expected a non-empty list like [{pool: web, weight: 90}, "
                     "{pool: canary, weight: 10}]")
        return ()
    split: List[WeightedPool] = []
    seen: Dict[str, int] = {}
    for i, item in enumerate(raw):
        item_path = f"{path}[{i}]"
        if not isinstance(item, dict):
            c.fail(item_path, f"expected a mapping like {{pool: web, weight: 90}}, "
                              f"got {_kind(item)}")
            continue
        m = c.mapping(item_path, item, ("pool", "weight"))
        for key in ("pool", "weight"):
            if m.get(key) is None:
                c.fail(f"{item_path}.{key}", "missing (required)")
        pool = c.get(item_path, m, "pool", None, _pool_name(pools))
        weight = c.get(item_path, m, "weight", None, _int(0, MAX_SPLIT_WEIGHT))
        if pool is not None and pool in seen:
            c.fail(f"{item_path}.pool", f"{_show(pool)} is already in {path}[{seen[pool]}]")
        elif pool is not None and weight is not None:
            seen[pool] = i
            split.append(WeightedPool(pool, weight))
    if len(split) == len(raw) and not any(entry.weight for entry in split):
        c.fail(path, "every weight is 0: at least one must be above 0")
    return tuple(split)


def _check_consul_routes(c: _Checker, path: str, raw: Any, have_consul: bool,
                         ) -> Optional[ConsulRoutesConfig]:
    if raw is None:
        return None

    def tag_prefix(value: Any) -> str:
        prefix = _str(value)
        if any(ch.isspace() or ch == "/" or not ch.isprintable() for ch in prefix):
            raise ValueError(f"{_show(prefix)} has a space, a '/' or a control character "
                             "(the host and path follow it in the tag)")
        return prefix

    m = c.mapping(path, raw, ("tag_prefix", "pool_defaults"))
    if not have_consul:
        c.fail(path, "needs the top-level 'consul' section (write 'consul: {}' for defaults)")
    return ConsulRoutesConfig(
        tag_prefix=c.get(path, m, "tag_prefix", ConsulRoutesConfig.tag_prefix, tag_prefix),
        pool_defaults=_check_pool(c, f"{path}.pool_defaults", "", m.get("pool_defaults"),
                                  have_consul, template=True),
    )


def _check_http(c: _Checker, path: str, raw: Any) -> HttpConfig:
    m = c.mapping(path, raw, HTTP_KEYS)
    defaults = HttpConfig()
    # null turns the request id off (c.get would read it as "the default"); so does `off`
    if "request_id" in m and m["request_id"] in (None, False):
        request_id = None
    else:
        request_id = c.get(path, m, "request_id", defaults.request_id, _token("header name"))
    forwarded = c.get(path, m, "forwarded", defaults.forwarded, _off_or(*FORWARDED_MODES))
    trusted_proxies = c.get(path, m, "trusted_proxies", (), _cidrs)
    if trusted_proxies and forwarded != "append":
        c.fail(f"{path}.trusted_proxies", "only applies to forwarded: append")
    return HttpConfig(
        max_header_size=c.get(path, m, "max_header_size", defaults.max_header_size,
                              _size(1024, 1024 * 1024)),
        client_header_timeout=c.get(path, m, "client_header_timeout",
                                    defaults.client_header_timeout, _duration(positive=True)),
        client_keepalive_timeout=c.get(path, m, "client_keepalive_timeout",
                                       defaults.client_keepalive_timeout, _duration()),
        response_timeout=c.get(path, m, "response_timeout", defaults.response_timeout,
                               _duration(positive=True)),
        forwarded=forwarded,
        trusted_proxies=trusted_proxies,
        request_id=request_id,
    )


def _check_consul_route_pools(c: _Checker, listeners: Mapping[str, ListenerConfig]) -> None:
    """Every listener's consul_routes must agree on pool_defaults: the pool of a service
    (``consul:<service>``) is one pool, whichever listener's routes lead to it."""
    first: Optional[Tuple[str, PoolConfig]] = None
    for name, listener in listeners.items():
        if listener.consul_routes is None:
            continue
        defaults = listener.consul_routes.pool_defaults
        if first is None:
            first = (name, defaults)
        elif defaults != first[1]:
            c.fail(f"listeners.{name}.consul_routes.pool_defaults",
                   f"differs from listeners.{first[0]}.consul_routes.pool_defaults: the pools "
                   f"Consul routes create ({CONSUL_POOL_PREFIX}<service>) are shared by every "
                   "listener, so their defaults must be the same")


def _overlaps(a: Address, b: Address) -> bool:
    if a.port != b.port or a.port == 0:
        return False
    if not (a.is_ip and b.is_ip):  # a host name (refused for listeners, allowed for admin)
        return a.host == b.host
    ia, ib = ipaddress.ip_address(a.host), ipaddress.ip_address(b.host)
    if ia == ib:
        return True
    # a wildcard bind takes the port on every address of its family (and v4 for ::)
    return ((ia.is_unspecified and (ia.version == ib.version or ia.version == 6))
            or (ib.is_unspecified and (ia.version == ib.version or ib.version == 6)))


def check(raw: Any, *, path: str = "<config>", environ: Optional[Mapping[str, str]] = None,
          ) -> Config:
    """Validate a parsed YAML document; raise ConfigError listing every problem."""
    environ = os.environ if environ is None else environ
    base_dir = os.path.dirname(os.path.abspath(path))
    c = _Checker(base_dir, environ)
    top = c.mapping("", raw, ("consul", "admin", "state_dir", "shutdown_timeout", "listeners",
                              "pools"))
    if raw is None or not isinstance(raw, dict):
        if raw is None:
            c.fail("(top level)", "the file is empty; expected listeners and pools")
        raise ConfigError(c.problems, path)
    consul = _check_consul(c, top)
    admin = _check_admin(c, top)
    state_dir = c.get("", top, "state_dir", c.path_value("var/lb"), c.path_value)
    shutdown_timeout = c.get("", top, "shutdown_timeout", 30.0, _duration())

    raw_pools = c.named("pools", top.get("pools"))
    for name in raw_pools:
        if name.startswith(CONSUL_POOL_PREFIX):
            c.fail(f"pools.{name}", f"names starting with '{CONSUL_POOL_PREFIX}' are kept for "
                                    "the pools consul_routes create")
        elif name.startswith(ROUTES_WATCH_PREFIX):
            c.fail(f"pools.{name}", f"names starting with '{ROUTES_WATCH_PREFIX}' are kept "
                                    "for the Consul routes watches in lb_consul_* metrics")
    pools = {name: _check_pool(c, f"pools.{name}", name, value, consul is not None)
             for name, value in raw_pools.items()}
    raw_listeners = c.named("listeners", top.get("listeners"))
    if top.get("listeners") is None or top.get("listeners") == {}:
        c.fail("listeners", "at least one listener is required")
    listeners: Dict[str, ListenerConfig] = {}
    for name, value in raw_listeners.items():
        listener = _check_listener(c, name, value, raw_pools, consul is not None)
        if listener is not None:
            listeners[name] = listener
    _check_consul_route_pools(c, listeners)

    binds: List[Tuple[str, Address]] = [("admin.bind", admin.bind)]
    for name, listener in listeners.items():
        for other_path, other in binds:
            if _overlaps(listener.bind, other):
                c.fail(f"listeners.{name}.bind",
                       f"{listener.bind} conflicts with {other_path} ({other})")
                break
        binds.append((f"listeners.{name}.bind", listener.bind))

    if c.problems:
        raise ConfigError(c.problems, path)
    return Config(path=os.path.abspath(path), listeners=listeners, pools=pools, consul=consul,
                  admin=admin, state_dir=state_dir, shutdown_timeout=shutdown_timeout)


# --- reading ---------------------------------------------------------------------------------


class _Limit(yaml.MarkedYAMLError):
    """The document is over one of the loader's bounds (well-formed YAML, but not a config)."""


def _children(node: yaml.Node) -> List[yaml.Node]:
    if isinstance(node, yaml.MappingNode):
        return [child for pair in node.value for child in pair]
    if isinstance(node, yaml.SequenceNode):
        return list(node.value)
    return []


def _measure(root: yaml.Node) -> None:
    """Refuse a node graph that aliases expand past MAX_NODES values or MAX_DEPTH levels, or
    that contains itself. Each shared node is measured once, so this takes time linear in the
    text however far the aliases would expand (a "billion laughs" is a few hundred bytes)."""
    measured: Dict[int, Tuple[int, int]] = {}  # id(node): (values, depth) once expanded
    unfinished: Set[int] = set()  # nodes whose children are being measured
    stack: List[Tuple[yaml.Node, bool]] = [(root, False)]
    while stack:
        node, children_done = stack.pop()
        if children_done:
            unfinished.discard(id(node))
            sizes = [measured[id(child)] for child in _children(node)]
            values = 1 + sum(values for values, _ in sizes)
            depth = 1 + max((depth for _, depth in sizes), default=0)
            if values > MAX_NODES:
                raise _Limit(problem=f"aliases expand this to more than {MAX_NODES} values "
                                     "(the limit for a config; an alias bomb?)",
                             problem_mark=node.start_mark)
            if depth > MAX_DEPTH:
                raise _Limit(problem=f"aliases nest this deeper than {MAX_DEPTH} levels "
                                     "(the limit for a config)",
                             problem_mark=node.start_mark)
            measured[id(node)] = (values, depth)
        elif id(node) in unfinished:
            raise _Limit(problem="this collection contains an alias to itself "
                                 "(recursive aliases are not allowed)",
                         problem_mark=node.start_mark)
        elif id(node) not in measured:
            unfinished.add(id(node))
            stack.append((node, True))
            stack.extend((child, False) for child in _children(node))


_Node = Union[yaml.ScalarNode, yaml.SequenceNode, yaml.MappingNode]  # what the composer makes


class _Loader(yaml.SafeLoader):
    """PyYAML's SafeLoader with bounds: nesting is counted while composing (PyYAML's composer
    recurses, so a deep document would end in a RecursionError), the composed graph is
    measured before it is built, and a value its tag's constructor cannot build (a 13th
    month, ``!!int abc``) is a YAML error at its position instead of a Python one."""

    def __init__(self, stream: str) -> None:
        super().__init__(stream)
        self.depth = 0

    def compose_node(self, parent: Any, index: Any) -> Any:
        if self.depth >= MAX_DEPTH:
            event = self.peek_event()  # type: ignore[no-untyped-call]  # untyped in types-PyYAML
            raise _Limit(problem=f"nested deeper than {MAX_DEPTH} levels "
                                 "(the limit for a config)",
                         problem_mark=event.start_mark)
        self.depth += 1
        try:
            return super().compose_node(parent, index)
        finally:
            self.depth -= 1

    def get_single_node(self) -> Any:
        node = super().get_single_node()
        if node is not None:
            _measure(node)
        return node

    def construct_object(self, node: _Node, deep: bool = False) -> Any:
        try:
            return super().construct_object(node, deep)
        except yaml.YAMLError:
            raise
        except Exception as e:
            kind = str(node.tag).rsplit(":", 1)[-1]
            what = _show(node.value) if isinstance(node, yaml.ScalarNode) else f"this {node.id}"
            # datetime says which part of a date is wrong; int() and float() only repeat it
            detail = f" ({e})" if kind == "timestamp" and isinstance(e, ValueError) else ""
            raise ConstructorError(problem=f"{what} is not a valid {kind}{detail}",
                                   problem_mark=node.start_mark) from None

    def construct_yaml_int(self, node: yaml.ScalarNode) -> Any:
        if isinstance(node.value, str) and sum(ch.isdigit() for ch in node.value) > MAX_INT_DIGITS:
            raise ConstructorError(problem=f"an integer of more than {MAX_INT_DIGITS} digits",
                                   problem_mark=node.start_mark)
        return super().construct_yaml_int(node)


_Loader.add_constructor("tag:yaml.org,2002:int", _Loader.construct_yaml_int)


def _position(text: str, index: int) -> str:
    line_start = text.rfind("\n", 0, index) + 1
    return f"line {text.count(chr(10), 0, index) + 1}, column {index - line_start + 1}"


def _yaml_problem(e: yaml.YAMLError, text: str) -> str:
    """One ``where: problem`` line for a YAML error (PyYAML's own text spans lines)."""
    if isinstance(e, yaml.reader.ReaderError):
        return f"{_position(text, e.position)}: invalid YAML: {str(e).splitlines()[0]}"
    mark = getattr(e, "problem_mark", None)
    where = f"line {mark.line + 1}, column {mark.column + 1}" if mark else "(file)"
    problem = getattr(e, "problem", None) or str(e)
    context = getattr(e, "context", None)
    if context and problem.startswith("but "):  # "expected a single document ... but found"
        problem = f"{context} {problem}"
    return f"{where}: {problem}" if isinstance(e, _Limit) else f"{where}: invalid YAML: {problem}"


def parse(text: str, *, path: str = "<config>",
          environ: Optional[Mapping[str, str]] = None) -> Config:
    """Validate a config's text. Any way it can be wrong ends in a ConfigError; an exception
    lb did not foresee is one too (naming itself as a bug), so no traceback reaches a user."""
    try:
        if len(text.encode("utf-8", "surrogatepass")) > MAX_CONFIG_BYTES:
            raise ConfigError([f"(file): larger than {MAX_CONFIG_BYTES >> 20} MiB "
                               "(the limit for a config file)"], path)
        try:
            raw = yaml.load(text, Loader=_Loader)
        except yaml.YAMLError as e:
            raise ConfigError([_yaml_problem(e, text)], path) from None
        return check(raw, path=path, environ=environ)
    except ConfigError:
        raise
    except Exception as e:
        raise ConfigError([f"(internal): checking failed with {type(e).__name__}: {e} "
                           "(a bug in lb; please report it)"], path) from e


def load(path: str, environ: Optional[Mapping[str, str]] = None) -> Config:
    """Read and validate a config file; see ``parse``."""
    try:
        with open(path, "rb") as f:
            data = f.read(MAX_CONFIG_BYTES + 1)
    except OSError as e:
        raise ConfigError([f"(file): cannot read: {e.strerror}"], path) from None
    except ValueError as e:  # a NUL in the path
        raise ConfigError([f"(file): cannot read: {e}"], path) from None
    if len(data) > MAX_CONFIG_BYTES:
        raise ConfigError([f"(file): larger than {MAX_CONFIG_BYTES >> 20} MiB "
                           "(the limit for a config file)"], path)
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        before = data[:e.start]
        line = before.count(b"\n") + 1
        column = len(before[before.rfind(b"\n") + 1:].decode("utf-8", "replace")) + 1
        raise ConfigError([f"line {line}, column {column}: not UTF-8 text "
                           f"(byte 0x{data[e.start]:02x})"], path) from None
    return parse(text, path=path, environ=environ)
