"""The URL guard for every outbound request a user names: webhooks today, any job type that fetches URLs later.

`UrlGuard.check(url)` answers a `Target` (the host to name in `Host` and SNI, and the addresses it may connect
to) or raises `Forbidden`. A URL passes when:
- it parses the way the sender will parse it (httpx's own parser), with no userinfo, backslash, space or
  control character, and its scheme is https (or http where the deployment allows it);
- its port is one of the allowed ports;
- its host is a dotted-quad IPv4 address, a bracketed IPv6 address, or a DNS name, never a decimal, octal,
  hex or shortened IPv4 spelling (`2130706433`, `0x7f.1`, `0177.0.0.1`, `127.1`), which resolvers read as
  an address;
- *every* address the host resolves to is allowed (`refusal`): globally reachable, or inside a network
  the deployment allows explicitly. An IPv4 address hidden in IPv6 (mapped `::ffff:0:0/96`, NAT64
  `64:ff9b::/96`, 6to4 `2002::/16`) is judged by the IPv4 address it hides. Unspecified, link-local,
  multicast and cloud metadata addresses are refused even inside an allowed network.

The sender then connects to a checked address itself, naming the original host in `Host` and SNI, so a
second DNS answer (rebinding) can never swap the destination.
"""

from __future__ import annotations

import asyncio
import re
import socket
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from ipaddress import IPv4Address, IPv4Network, IPv6Address, IPv6Network, ip_address, ip_network

import httpx

from worker.config import Config

Address = IPv4Address | IPv6Address
Network = IPv4Network | IPv6Network
Resolver = Callable[[str, int], Awaitable[Sequence[str]]]
DEFAULT_PORTS = {"http": 80, "https": 443}


class Forbidden(Exception):
    """The URL is not one Outlast will connect to.

    `permanent` is False when the refusal came from a DNS answer, which may change; a URL refused for its
    own text, or for an address written in it, is refused for good. The message is what the caller may be told;
    `detail` (for the log) may say more: how this host resolves a name is not the caller's business (it maps
    the deployment's private network).
    """

    def __init__(self, reason: str, *, permanent: bool = True, detail: str | None = None) -> None:
        super().__init__(reason)
        self.permanent = permanent
        self.detail = detail or reason


def _table(*rows: tuple[str, str]) -> tuple[tuple[Network, str], ...]:
    return tuple((ip_network(net), label) for net, label in rows)


# Refused even inside an explicitly allowed network: nothing legitimate answers webhooks there.
NEVER = _table(
    ("0.0.0.0/8", "unspecified"),
    ("::/128", "unspecified"),
    ("169.254.0.0/16", "link-local (cloud metadata lives here)"),
    ("fe80::/10", "link-local"),
    ("100.100.100.200/32", "a cloud metadata address"),
    ("192.0.0.192/32", "a cloud metadata address"),
    ("168.63.129.16/32", "a cloud metadata address"),
    ("fd00:ec2::254/128", "a cloud metadata address"),
    ("224.0.0.0/4", "multicast"),
    ("ff00::/8", "multicast"),
    ("255.255.255.255/32", "broadcast"),
)
# Not reachable from the internet, so refused unless the deployment allows the range explicitly.
NOT_GLOBAL = _table(
    ("127.0.0.0/8", "loopback"),
    ("::1/128", "loopback"),
    ("10.0.0.0/8", "private"),
    ("172.16.0.0/12", "private"),
    ("192.168.0.0/16", "private"),
    ("fc00::/7", "private (unique local)"),
    ("fec0::/10", "site-local"),
    ("100.64.0.0/10", "carrier-grade NAT"),
    ("192.0.0.0/24", "reserved for protocol assignments"),
    ("2001::/23", "reserved for protocol assignments (Teredo included)"),
    ("192.0.2.0/24", "documentation"),
    ("198.51.100.0/24", "documentation"),
    ("203.0.113.0/24", "documentation"),
    ("2001:db8::/32", "documentation"),
    ("3fff::/20", "documentation"),
    ("198.18.0.0/15", "benchmarking"),
    ("192.88.99.0/24", "a 6to4 relay"),
    ("240.0.0.0/4", "reserved"),
    ("100::/64", "discard-only"),
    ("64:ff9b:1::/48", "local-use NAT64"),
    ("::/96", "IPv4-compatible (deprecated)"),
)
_GLOBAL_UNICAST = IPv6Network("2000::/3")
_MAPPED = IPv6Network("::ffff:0:0/96")
_NAT64 = IPv6Network("64:ff9b::/96")
_SIXTOFOUR = IPv6Network("2002::/16")
_NAME = re.compile(r"^(?=.{1,253}$)([a-z0-9_]([a-z0-9_-]{0,61}[a-z0-9_])?\.)*[a-z0-9_]([a-z0-9_-]{0,61}[a-z0-9_])?\.?$")
_NUMERIC_LABEL = re.compile(r"^(0x[0-9a-f]*|[0-9]+)$")


def hidden_ipv4(address: IPv6Address) -> IPv4Address | None:
    """The IPv4 address an IPv6 address carries inside it (mapped, NAT64, 6to4), if any."""
    if address in _MAPPED or address in _NAT64:
        return IPv4Address(address.packed[-4:])
    if address in _SIXTOFOUR:
        return IPv4Address(address.packed[2:6])
    return None


def _label(address: Address, allowed: Sequence[Network]) -> str | None:
    if isinstance(address, IPv6Address):
        if address.scope_id:
            return "an address with a zone"
        inner = hidden_ipv4(address)
        if inner is not None:
            label = _label(inner, allowed)
            return None if label is None else f"an IPv6 wrapper around {inner}, which is {label}"
    for network, label in NEVER:
        if address in network:
            return label
    if any(address in network for network in allowed):
        return None
    for network, label in NOT_GLOBAL:
        if address in network:
            return label
    if isinstance(address, IPv6Address) and address not in _GLOBAL_UNICAST:
        return "not a global unicast address"
    return None if address.is_global else "not globally reachable"


def refusal(address: Address, allowed: Sequence[Network] = ()) -> str | None:
    """Why Outlast must not connect to `address` ("127.0.0.2 is loopback"), or None when it may."""
    label = _label(address, allowed)
    return None if label is None else f"{address} is {label}"


async def system_resolver(host: str, port: int) -> list[str]:
    """The addresses the operating system's resolver gives for `host`, in its order of preference."""
    infos = await asyncio.get_running_loop().getaddrinfo(host, port, type=socket.SOCK_STREAM)
    return list(dict.fromkeys(str(info[4][0]) for info in infos))


def parse_ports(text: str) -> tuple[tuple[int, int], ...]:
    """`"80,443,8000-8999"` → ((80, 80), (443, 443), (8000, 8999))."""
    ranges = []
    for part in filter(None, (p.strip() for p in text.split(","))):
        low, _, high = part.partition("-")
        first, last = int(low), int(high or low)
        if not 1 <= first <= last <= 65535:
            raise ValueError(f"not a port or port range: {part!r}")
        ranges.append((first, last))
    return tuple(ranges)


def parse_networks(text: str) -> tuple[Network, ...]:
    """`"127.0.0.1/32, 10.0.0.0/8"` → the networks; a bad one raises ValueError naming it."""
    return tuple(ip_network(part.strip(), strict=False) for part in text.split(",") if part.strip())


@dataclass(frozen=True)
class Target:
    """A checked URL: where to connect, and the host to name while doing so."""

    url: httpx.URL
    host: str  # ASCII (IDNA) host as written: the Host header and SNI name
    addresses: tuple[Address, ...]  # every one checked; connect to these, never to a fresh DNS answer

    @property
    def is_name(self) -> bool:
        return _literal(self.host) is None

    def pinned(self, address: Address) -> httpx.URL:
        """The URL with its host replaced by `address`: what the socket connects to."""
        return self.url.copy_with(host=str(address))


def _literal(host: str) -> Address | None:
    try:
        return ip_address(host)
    except ValueError:
        return None


@dataclass(frozen=True)
class UrlGuard:
    """The deployment's policy and a resolver (injectable, so tests can answer what an attacker would)."""

    allowed_networks: tuple[Network, ...] = ()
    ports: tuple[tuple[int, int], ...] = ((80, 80), (443, 443), (8080, 8080), (8443, 8443))
    allow_http: bool = False
    resolve_timeout_s: float = 10.0
    resolver: Resolver = field(default=system_resolver, compare=False)

    @classmethod
    def from_config(cls, config: Config, resolver: Resolver = system_resolver) -> UrlGuard:
        """The deployment's guard for callback URLs; a bad network or port list stops the process, naming its
        variable."""
        return cls.of(
            ("OUTLAST_ALLOWED_CALLBACK_NETWORKS", config.allowed_callback_networks),
            ("OUTLAST_CALLBACK_PORTS", config.callback_ports),
            allow_http=config.allow_http_callbacks,
            resolve_timeout_s=config.webhook_timeout_s,
            resolver=resolver,
        )

    @classmethod
    def of(
        cls,
        networks: tuple[str, str],
        ports: tuple[str, str],
        *,
        allow_http: bool,
        resolve_timeout_s: float,
        resolver: Resolver = system_resolver,
    ) -> UrlGuard:
        """A guard from settings' text, each given as (variable, value): a bad one stops the process, naming it."""
        try:
            allowed = parse_networks(networks[1])
        except ValueError as exc:
            raise SystemExit(f"configuration error in {networks[0]}: {exc}") from None
        try:
            open_ports = parse_ports(ports[1])
        except ValueError as exc:
            raise SystemExit(f"configuration error in {ports[0]}: {exc}") from None
        return cls(allowed, open_ports, allow_http, resolve_timeout_s, resolver)

    def parse(self, text: str) -> tuple[httpx.URL, str, int]:
        """The static checks: (url, ASCII host, port), or Forbidden for good."""
        if any(c.isspace() or ord(c) < 0x20 or ord(c) == 0x7F or c == "\\" for c in text):
            raise Forbidden("the URL contains whitespace, a control character or a backslash")
        try:
            url = httpx.URL(text)
        except httpx.InvalidURL as exc:
            raise Forbidden(f"not a valid URL: {exc}") from None
        schemes = ("https", "http") if self.allow_http else ("https",)
        if url.scheme not in schemes:
            raise Forbidden(f"the scheme must be {' or '.join(schemes)}, not {url.scheme or 'missing'!r}")
        if url.userinfo:
            raise Forbidden("the URL must not carry a user name or password (userinfo)")
        host = url.raw_host.decode("ascii").lower()
        if not host:
            raise Forbidden("the URL has no host")
        port = DEFAULT_PORTS[url.scheme] if url.port is None else url.port
        if not any(low <= port <= high for low, high in self.ports):
            raise Forbidden(f"port {port} is not allowed")
        if _literal(host) is None:
            if not _NAME.match(host):
                raise Forbidden(f"{host!r} is not a valid host name")
            if _NUMERIC_LABEL.match(host.rstrip(".").rpartition(".")[2]):
                raise Forbidden(f"{host!r} is a non-standard spelling of an IPv4 address")
        return url, host, port

    async def check(self, text: str) -> Target:
        """The URL, resolved and checked: every address must be allowed. Raises Forbidden."""
        url, host, port = self.parse(text)
        literal = _literal(host)
        if literal is not None:
            why = refusal(literal, self.allowed_networks)
            if why is not None:
                raise Forbidden(why)
            return Target(url, host, (literal,))
        try:
            async with asyncio.timeout(self.resolve_timeout_s):
                answers = await self.resolver(host, port)
        except TimeoutError:
            raise Forbidden(f"{host} did not resolve within {self.resolve_timeout_s:g} s", permanent=False) from None
        except OSError as exc:
            raise Forbidden(
                f"{host} does not resolve", permanent=False, detail=f"{host} does not resolve: {exc}"
            ) from None
        try:
            addresses = tuple(ip_address(a) for a in answers)
        except ValueError as exc:
            why = f"{host} resolved to something that is not an address: {exc}"
            raise Forbidden(f"{host} does not resolve to an address", permanent=False, detail=why) from None
        if not addresses:
            raise Forbidden(f"{host} does not resolve", permanent=False)
        for address in addresses:
            label = _label(address, self.allowed_networks)
            if label is not None:
                raise Forbidden(
                    f"{host} resolves to an address that is not allowed",
                    permanent=False,
                    detail=f"{host} resolves to {address}, which is {label}",
                )
        return Target(url, host, addresses)


async def send_pinned(
    client: httpx.AsyncClient,
    method: str,
    target: Target,
    *,
    headers: Mapping[str, str],
    content: bytes | None = None,
) -> httpx.Response:
    """Send to the first of the target's checked addresses that takes the connection, naming the original host in
    `Host` and (httpx's `sni_hostname` extension) in SNI and the certificate check, never to a fresh DNS answer.
    The response is streaming: the caller reads what it wants of the body and closes it."""
    extensions = {"sni_hostname": target.host} if target.is_name else {}
    host = target.url.netloc.decode("ascii")
    for i, address in enumerate(target.addresses):  # every one was checked; the next when one refuses
        request = client.build_request(
            method, target.pinned(address), content=content, headers={**headers, "host": host}, extensions=extensions
        )
        try:
            return await client.send(request, stream=True)
        except httpx.ConnectError:
            if i == len(target.addresses) - 1:
                raise
    raise AssertionError("a Target has at least one address")
