"""Network addresses and connects: the ``host:port`` vocabulary every part of lb shares.

A leaf module (nothing from lb): addresses as config, Consul, the admin API and the data path
spell them, the checks a host name passes where it enters, endpoints to connect to a peer,
and the short text a failed connect is logged and shown with.
"""

from __future__ import annotations

import functools
import ipaddress
import re
import reprlib
from dataclasses import dataclass
from typing import Any, Union

from twisted.internet import error
from twisted.internet.endpoints import HostnameEndpoint, TCP4ClientEndpoint, TCP6ClientEndpoint
from twisted.internet.interfaces import IStreamClientEndpoint
from twisted.python.failure import Failure

_REPR = reprlib.Repr()
_REPR.maxstring = _REPR.maxother = 80
_REPR.maxlong = 40
_REPR.maxlevel = 3


def short_repr(value: Any) -> str:
    """``repr(value)`` cut short: an error message quotes the value, not a megabyte of it."""
    return _REPR.repr(value)


@dataclass(frozen=True, order=True)
class Address:
    """A ``host:port`` pair; ``str()`` gives the canonical spelling used as a peer's key."""

    host: str
    port: int

    def __str__(self) -> str:
        if ":" in self.host:
            return f"[{self.host}]:{self.port}"
        return f"{self.host}:{self.port}"

    @property
    def is_ipv6(self) -> bool:
        return ":" in self.host

    @functools.cached_property
    def is_ip(self) -> bool:
        try:
            ipaddress.ip_address(self.host)
        except ValueError:
            return False
        return True


def parse_address(text: str, *, allow_port_zero: bool = False) -> Address:
    """Parse ``host:port`` / ``[v6]:port``; IPs are normalised so one peer has one key."""
    if not isinstance(text, str):
        raise ValueError(f"expected 'host:port', got {type(text).__name__}")
    text = text.strip()
    m = re.fullmatch(r"\[([0-9A-Fa-f:.]+)\]:(\d+)", text) or re.fullmatch(
        r"([^\s:\[\]]+):(\d+)", text
    )
    if not m:
        raise ValueError(f"{short_repr(text)} is not 'host:port' (IPv6 as '[::1]:80')")
    host, port_text = m.group(1), m.group(2)
    port = int(port_text)
    low = 0 if allow_port_zero else 1
    if not low <= port <= 65535:
        raise ValueError(f"port {port} in {short_repr(text)} is out of range {low}-65535")
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        if text.startswith("["):
            raise ValueError(f"{short_repr(host)} in {short_repr(text)} is not an IPv6 "
                             "address") from None
        try:
            return Address(host_name(host), port)
        except ValueError as e:
            raise ValueError(f"{short_repr(host)} in {short_repr(text)} is not a valid host name: "
                             f"{e}") from None
    if ip.version == 6 and not text.startswith("["):
        raise ValueError(f"IPv6 address in {short_repr(text)} must be written as [addr]:port")
    return Address(str(ip), port)


_LABEL = re.compile(r"[a-z0-9_]([a-z0-9_-]{0,61}[a-z0-9_])?")


def host_name(text: str) -> str:
    """A host name in the ASCII form a resolver is given (IDNA for international names).

    Refused here, where a name enters (config, admin API, Consul), rather than when a
    client is routed to it: an empty label, a label over 63 bytes, a name over 253 bytes,
    a hyphen at either end of a label, or a name that is not valid IDNA."""
    if not text:
        raise ValueError("empty")
    lowered = text.lower()
    try:
        ascii_name = lowered.encode("idna").decode("ascii")
        back = ascii_name.encode("ascii").decode("idna")
        # an ASCII name may already be the punycode form (from a snapshot, from Consul):
        # valid when it is what its own decoding encodes to
        again = back.encode("idna").decode("ascii") if lowered.isascii() else ascii_name
    except UnicodeError:
        raise ValueError("not valid IDNA (an empty label or one over 63 bytes?)") from None
    if (again != ascii_name) if lowered.isascii() else (back != lowered):
        raise ValueError("not valid IDNA (it changes under IDNA mapping)")
    if len(ascii_name) > 253:
        raise ValueError("longer than 253 bytes")
    for label in ascii_name.split("."):
        if not label:
            raise ValueError("empty label")
        if len(label) > 63:
            raise ValueError(f"label {label[:20]!r}... is over 63 bytes")
        if not _LABEL.fullmatch(label):
            raise ValueError(f"label {label!r} is not letters, digits, '-' and '_' "
                             "(no '-' at either end)")
    return ascii_name


def host_port(address: Any) -> str:
    """``host:port`` (``[v6]:port``) of a Twisted address object (IPv4Address, ...)."""
    host = getattr(address, "host", None)
    if host is None:
        return str(address)
    return f"[{host}]:{address.port}" if ":" in host else f"{host}:{address.port}"


def format_seconds(value: float) -> str:
    """``0.5`` → ``500ms``, ``2.0`` → ``2s``: durations the way the config spells them."""
    return f"{value * 1000:g}ms" if 0 < value < 1 else f"{value:g}s"


def endpoint_for(reactor: Any, address: Address, timeout: float) -> IStreamClientEndpoint:
    """A client endpoint for a peer: TCP for an IP, a resolving endpoint for a host name."""
    if address.is_ipv6:
        return TCP6ClientEndpoint(reactor, address.host, address.port, timeout=timeout)
    if address.is_ip:
        return TCP4ClientEndpoint(reactor, address.host, address.port, timeout=timeout)
    return HostnameEndpoint(reactor, address.host.encode("ascii"), address.port,
                            timeout=timeout)


def describe_connect_failure(failure: Union[Failure, BaseException], timeout: float) -> str:
    """A short detail for a failed connect, for logs and the status page."""
    if not isinstance(failure, Failure):
        failure = Failure(failure)
    if failure.check(error.ConnectionRefusedError):
        return "connection refused"
    if failure.check(error.TimeoutError):
        return f"connect timeout after {format_seconds(timeout)}"
    if failure.check(error.DNSLookupError):
        return "DNS lookup failed"
    if failure.check(error.NoRouteError):
        return "no route to host"
    if failure.check(error.ConnectionLost):
        return "connection reset"
    if failure.check(error.ConnectionDone):
        return "connection closed"
    return failure_message(failure)


def failure_message(failure: Failure) -> str:
    """The first line of a failure's message (or its type), at most 200 characters."""
    kind = failure.type  # set once the Failure is built (Twisted types it Optional)
    text = failure.getErrorMessage().strip() or (kind.__name__ if kind else "error")
    return text.splitlines()[0][:200]
