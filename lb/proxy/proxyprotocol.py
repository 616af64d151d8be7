"""PROXY protocol v1/v2: reading the header clients send, writing the one peers get.

Parsing is Twisted's (``twisted.protocols.haproxy``'s parsers); this module only finds where
the header starts, bounds how much it will buffer, and builds outgoing headers.
"""

from __future__ import annotations

import ipaddress
import struct
from typing import Optional, Protocol, Tuple, Union

from twisted.internet.address import IPv4Address, IPv6Address
from twisted.protocols.haproxy._exceptions import InvalidProxyHeader
from twisted.protocols.haproxy._info import ProxyInfo
from twisted.protocols.haproxy._v1parser import V1Parser
from twisted.protocols.haproxy._v2parser import V2Parser

__all__ = ["HeaderReader", "InvalidProxyHeader", "build_header"]

V2_SIGNATURE = V2Parser.PREFIX  # b"\r\n\r\n\x00\r\nQUIT\n"
V1_SIGNATURE = b"PROXY"
MAX_HEADER = 16 + 536  # a v2 header with TLVs we do not need stays well below this


class HeaderReader:
    """Accumulates client bytes until a whole PROXY header has arrived."""

    def __init__(self) -> None:
        self._buffer = b""
        self._parser: Optional[Union[V1Parser, V2Parser]] = None
        self._seen = 0

    def feed(self, data: bytes) -> Tuple[Optional[ProxyInfo], bytes]:
        """Return ``(info, rest)`` once the header is complete, ``(None, b"")`` while it is
        not; raise ``InvalidProxyHeader`` when the bytes cannot be a PROXY header."""
        if self._parser is None:
            self._buffer += data
            buf = self._buffer
            if buf[:12] == V2_SIGNATURE[:len(buf[:12])] and len(buf) < 16:
                return None, b""
            if buf[:5] == V1_SIGNATURE[:len(buf[:5])] and len(buf) < 8:
                return None, b""
            if buf[:12] == V2_SIGNATURE and buf[12] & 0xF0 == 0x20:
                self._parser = V2Parser()
            elif buf[:6] == V1_SIGNATURE + b" ":
                self._parser = V1Parser()
            else:
                raise InvalidProxyHeader()
            data, self._buffer = buf, b""
        self._seen += len(data)
        info, rest = self._parser.feed(data)
        if info is None:
            if self._seen > MAX_HEADER:
                raise InvalidProxyHeader()
            return None, b""
        return info, rest or b""


class HostPort(Protocol):
    """An IP address and port: Twisted's ``IPv4Address``/``IPv6Address`` (a host given as
    bytes is ASCII text)."""

    @property
    def host(self) -> Union[str, bytes]: ...

    @property
    def port(self) -> int: ...


def _ip(address: HostPort) -> Tuple[str, int]:
    host = address.host
    if isinstance(host, bytes):
        host = host.decode("ascii")
    return host, int(address.port)


def build_header(version: str, source: HostPort, destination: HostPort) -> bytes:
    """A PROXY header carrying the client's address (``source``) and the address it
    reached (``destination``); a mixed v4/v6 pair maps v4 into v6."""
    src_host, src_port = _ip(source)
    dst_host, dst_port = _ip(destination)
    src, dst = ipaddress.ip_address(src_host), ipaddress.ip_address(dst_host)
    if src.version != dst.version:
        if src.version == 4:
            src = ipaddress.IPv6Address(f"::ffff:{src}")
        else:
            dst = ipaddress.IPv6Address(f"::ffff:{dst}")
    if version == "v1":
        protocol = "TCP4" if src.version == 4 else "TCP6"
        return f"PROXY {protocol} {src} {dst} {src_port} {dst_port}\r\n".encode("ascii")
    if src.version == 4:
        body = src.packed + dst.packed + struct.pack("!HH", src_port, dst_port)
        family = 0x11  # AF_INET, STREAM
    else:
        body = src.packed + dst.packed + struct.pack("!HH", src_port, dst_port)
        family = 0x21  # AF_INET6, STREAM
    return V2_SIGNATURE + bytes([0x21, family]) + struct.pack("!H", len(body)) + body


def address_of(info: ProxyInfo) -> Optional[Union[IPv4Address, IPv6Address]]:
    """The client address a PROXY header announces (None for LOCAL/UNKNOWN)."""
    # object, not Optional[IAddress]: with an interface type, mypy-zope takes the isinstance
    # as always true and the None branch as unreachable (Shoobx/mypy-zope#91)
    source: object = info.source
    if isinstance(source, (IPv4Address, IPv6Address)):
        return source
    return None
