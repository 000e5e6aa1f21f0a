"""The outbound URL guard: no request of the service reaches a private network.

Every URL the service fetches on a client's behalf (stream URLs from a request
or from the resolver's answer, webhook URLs) passes :func:`check_url` first:
only ``http``/``https``; the host is resolved (``loop.getaddrinfo``, never
blocking) and *every* address must be public. Loopback, private, link-local
(169.254/16, where cloud metadata lives), multicast, reserved, unspecified and
shared (100.64/10) addresses are refused, and so are the IPv6 forms that embed
one (IPv4-mapped, IPv4-compatible, 6to4, NAT64, Teredo), unless
``allow_private_sources`` is true. The configured resolver ``base_url`` is
trusted and not checked.

Redirects: FFmpeg and PyAV would follow them without asking, so both are run
with ``max_redirects=0`` and :class:`UrlGuard` resolves redirects itself,
hop by hop, each hop checked before it is requested, and hands FFmpeg the
final URL. Its aiohttp session resolves names through
:class:`GuardedDNSResolver`, which checks the very addresses it connects to,
so a name cannot change its answer between the check and that connection.

DNS rebinding is closed: every outbound connection goes to an address
checked when it was resolved. The cut engine's own connections go to
:func:`approved_address` (resolved and checked once, then connected to by
address); aiohttp sessions check the addresses they connect to; FFmpeg and
PyAV, which would resolve names themselves, connect through the egress proxy
(:mod:`clipservice.sources.egress`), which resolves, checks and connects in
one step. All of them resolve through :func:`lookup`.
"""

from __future__ import annotations

import asyncio
import dataclasses
import ipaddress
import socket
from collections.abc import Awaitable, Callable
from typing import Any

import aiohttp
from aiohttp.abc import AbstractResolver, ResolveResult
from yarl import URL

from clipservice.domain import JobSource
from clipservice.errors import SourceError
from clipservice.sources.base import ResolvedSource, Resolver

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
AddressPolicy = Callable[[IPAddress], bool]
HostResolver = Callable[[str, int], Awaitable[list[IPAddress]]]

MAX_REDIRECTS = 5
_REDIRECT_STATUSES = frozenset({301, 302, 303, 307, 308})
# IANA special-purpose blocks, spelled out so the answer does not depend on the
# Python version's idea of ``is_private`` / ``is_global``.
_DENY_V4 = tuple(
    ipaddress.IPv4Network(n)
    for n in (
        "0.0.0.0/8", "10.0.0.0/8", "100.64.0.0/10", "127.0.0.0/8", "169.254.0.0/16",
        "172.16.0.0/12", "192.0.0.0/24", "192.0.2.0/24", "192.88.99.0/24", "192.168.0.0/16",
        "198.18.0.0/15", "198.51.100.0/24", "203.0.113.0/24", "224.0.0.0/4", "240.0.0.0/4",
    )
)  # fmt: skip
_DENY_V6 = tuple(
    ipaddress.IPv6Network(n)
    for n in (
        "::/128", "::1/128", "100::/64", "2001::/23", "2001:db8::/32", "3fff::/20",
        "5f00::/16", "fc00::/7", "fe80::/10", "fec0::/10", "ff00::/8",
    )
)  # fmt: skip
_NAT64 = (ipaddress.IPv6Network("64:ff9b::/96"), ipaddress.IPv6Network("64:ff9b:1::/48"))
_TEREDO = ipaddress.IPv6Network("2001::/32")


def _embedded_v4(ip: ipaddress.IPv6Address) -> ipaddress.IPv4Address | None:
    """The IPv4 address an IPv6 address carries (mapped, compatible, 6to4, NAT64)."""
    if ip.ipv4_mapped is not None:
        return ip.ipv4_mapped
    if ip.sixtofour is not None:
        return ip.sixtofour
    packed = ip.packed
    if any(ip in net for net in _NAT64) or (packed[:12] == bytes(12) and int(ip) > 0xFFFF):
        # NAT64 and the deprecated IPv4-compatible form (::a.b.c.d) keep it in the last 32 bits.
        return ipaddress.IPv4Address(packed[12:])
    return None


def is_forbidden_address(ip: IPAddress) -> bool:
    """True for any address a client must not make the service reach."""
    if isinstance(ip, ipaddress.IPv6Address):
        if ip.scope_id:
            return True
        if ip in _TEREDO:
            # Teredo tunnels to an address we cannot see: refuse outright.
            return True
        v4 = _embedded_v4(ip)
        if v4 is not None:
            # These forms reach (or translate to) the IPv4 address: judge that.
            return is_forbidden_address(v4)
        if any(ip in net for net in _DENY_V6):
            return True
    elif any(ip in net for net in _DENY_V4):
        return True
    flags = [
        not ip.is_global,
        ip.is_private,
        ip.is_loopback,
        ip.is_link_local,
        ip.is_multicast,
        ip.is_reserved,
        ip.is_unspecified,
    ]
    if isinstance(ip, ipaddress.IPv6Address):
        flags.append(ip.is_site_local)
    return any(flags)


def _forbidden(url: str, why: str) -> SourceError:
    return SourceError("source_forbidden", f"refused to fetch {_redact(url)}: {why}")


def _redact(url: str) -> str:
    """Scheme, host and port only: query strings of signed URLs are secrets."""
    try:
        u = URL(url)
        return f"{u.scheme}://{u.raw_host}:{u.port}" if u.raw_host else "<invalid URL>"
    except (ValueError, TypeError):
        return "<invalid URL>"


def _parse(url: str) -> URL:
    try:
        u = URL(url)
    except (ValueError, TypeError) as exc:
        raise _forbidden(url, "not a valid URL") from exc
    if u.scheme not in ("http", "https"):
        raise _forbidden(url, "only http and https URLs are fetched")
    if not u.raw_host:
        raise _forbidden(url, "the URL has no host")
    return u


def _ip_literal(host: str) -> IPAddress | None:
    try:
        return ipaddress.ip_address(host.strip("[]"))
    except ValueError:
        return None


def lookup(host: str, port: int) -> list[IPAddress]:
    """Every address ``host`` resolves to (blocking: call it from a thread).

    The one place the service resolves names for outbound fetches: the URL
    checks, the aiohttp sessions, the cut engine's connections and the egress
    proxy all ask here, so what was checked is what is connected to (and a
    test can stand in for DNS by replacing this function).
    """
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except (OSError, UnicodeError) as exc:
        raise SourceError("source_unavailable", f"cannot resolve {host!r}: {exc}") from exc
    out: list[IPAddress] = []
    for _family, _type, _proto, _canon, sockaddr in infos:
        # A scoped IPv6 answer reads "fe80::1%eth0": keep the scope so it is refused.
        out.append(ipaddress.ip_address(str(sockaddr[0])))
    if not out:
        raise SourceError("source_unavailable", f"{host!r} resolves to no address")
    return out


async def resolve_host(host: str, port: int) -> list[IPAddress]:
    """Every address ``host`` resolves to (non-blocking)."""
    return await asyncio.get_running_loop().run_in_executor(None, lookup, host, port)


def approved_address(
    host: str,
    port: int,
    *,
    allow_private: bool,
    policy: AddressPolicy = is_forbidden_address,
) -> IPAddress:
    """The address to connect to for ``host``: resolved now, every answer checked
    (blocking). Connecting to exactly this address, rather than letting the
    connection resolve the name again, is what closes DNS rebinding: a name
    cannot answer a public address to the check and a private one to the
    connection."""
    literal = _ip_literal(host)
    addresses = [literal] if literal is not None else lookup(host, port)
    if not allow_private:
        for ip in addresses:
            if policy(ip):
                raise SourceError(
                    "source_forbidden",
                    f"refused to connect to {host}: it resolves to a non-public address ({ip})",
                )
    return addresses[0]


async def check_url(
    url: str,
    *,
    allow_private: bool,
    policy: AddressPolicy = is_forbidden_address,
    resolve: HostResolver | None = None,
) -> None:
    """Raise ``SourceError("source_forbidden", …)`` unless ``url`` may be fetched.

    Only http(s); with ``allow_private`` false, every address the host resolves
    to must pass ``policy``. No request is sent to the URL.
    """
    u = _parse(url)
    if allow_private:
        return
    host = u.raw_host or ""
    literal = _ip_literal(host)
    if literal is not None:
        addresses = [literal]
    else:
        addresses = await (resolve or resolve_host)(host, u.port or 80)
    for ip in addresses:
        if policy(ip):
            raise _forbidden(url, f"{host} resolves to a non-public address ({ip})")


class GuardedDNSResolver(AbstractResolver):
    """An aiohttp resolver that refuses names resolving to a forbidden address.

    It checks the addresses aiohttp will connect to, so nothing can change
    between the check and the connection. Give it to ``aiohttp.TCPConnector``
    for any session that fetches client-supplied URLs (e.g. webhooks).
    Names are resolved by :func:`lookup`, like every outbound fetch's.
    """

    def __init__(self, policy: AddressPolicy | None = is_forbidden_address) -> None:
        self._policy = policy

    async def resolve(
        self, host: str, port: int = 0, family: socket.AddressFamily = socket.AF_INET
    ) -> list[ResolveResult]:
        try:
            addresses = await resolve_host(host, port)
        except SourceError as exc:
            raise OSError(exc.message) from exc
        results: list[ResolveResult] = []
        for ip in addresses:
            if self._policy is not None and self._policy(ip):
                raise ForbiddenAddressError(f"{host} resolves to a non-public address ({ip})")
            results.append(
                {
                    "hostname": host,
                    "host": str(ip),
                    "port": port,
                    "family": socket.AF_INET6 if ip.version == 6 else socket.AF_INET,
                    "proto": 0,
                    "flags": socket.AI_NUMERICHOST,
                }
            )
        return results

    async def close(self) -> None:
        return None


class ForbiddenAddressError(OSError):
    """Raised inside aiohttp's connector when a name resolves to a forbidden address."""


def guarded_connector(
    *, allow_private: bool, policy: AddressPolicy = is_forbidden_address
) -> aiohttp.TCPConnector:
    """A connector for sessions that fetch client-supplied URLs."""
    return aiohttp.TCPConnector(resolver=GuardedDNSResolver(None if allow_private else policy))


class UrlGuard:
    """Checks URLs and follows their redirects hop by hop, each hop checked.

    Owns one aiohttp session (with :class:`GuardedDNSResolver`); open it with
    ``async with`` or :meth:`close` it.
    """

    def __init__(
        self,
        *,
        allow_private: bool,
        timeout_s: float = 15.0,
        policy: AddressPolicy = is_forbidden_address,
        resolve: HostResolver | None = None,
    ) -> None:
        self.allow_private = allow_private
        self._policy = policy
        self._resolve = resolve
        self._timeout = aiohttp.ClientTimeout(total=timeout_s)
        self._session: aiohttp.ClientSession | None = None

    @property
    def session(self) -> aiohttp.ClientSession:
        """A session for client-supplied URLs: forbidden addresses refused at connect time."""
        return self._http()

    def _http(self) -> aiohttp.ClientSession:
        if self._session is None:
            self._session = aiohttp.ClientSession(
                connector=guarded_connector(allow_private=self.allow_private, policy=self._policy),
                headers={"User-Agent": "clipservice"},
                trust_env=False,
            )
        return self._session

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    async def __aenter__(self) -> UrlGuard:
        return self

    async def __aexit__(self, *exc: Any) -> None:
        await self.close()

    async def check(self, url: str) -> None:
        """Raise ``SourceError("source_forbidden", …)`` unless ``url`` may be fetched."""
        await check_url(
            url, allow_private=self.allow_private, policy=self._policy, resolve=self._resolve
        )

    async def final_url(self, url: str) -> str:
        """Follow ``url``'s redirects (each hop checked first); return where they end.

        One small ranged GET per hop; the body is not read. The answer of the
        final hop (200, 206, 403, …) is left to the prober to judge.
        """
        for _ in range(MAX_REDIRECTS + 1):
            await self.check(url)
            try:
                async with self._http().get(
                    url,
                    allow_redirects=False,
                    headers={"Range": "bytes=0-0"},
                    timeout=self._timeout,
                ) as resp:
                    if resp.status not in _REDIRECT_STATUSES:
                        return url
                    location = resp.headers.get("Location")
                    if not location:
                        raise SourceError("source_unavailable", f"{_redact(url)} redirects nowhere")
                    next_url = str(resp.url.join(URL(location)))
            except aiohttp.ClientConnectorError as exc:
                if isinstance(exc.os_error, ForbiddenAddressError):
                    raise _forbidden(url, str(exc.os_error)) from exc
                raise SourceError(
                    "source_unavailable", f"cannot connect to {_redact(url)}: {exc.os_error}"
                ) from exc
            except TimeoutError as exc:
                raise SourceError("source_unavailable", f"{_redact(url)} timed out") from exc
            except (aiohttp.ClientError, ValueError) as exc:
                raise SourceError(
                    "source_unavailable", f"request to {_redact(url)} failed: {exc}"
                ) from exc
            url = next_url
        raise SourceError("source_unavailable", f"more than {MAX_REDIRECTS} redirects")


class GuardedResolver:
    """Wraps a resolver: the stream URLs it answers are checked and their redirects
    resolved before anything else (the prober, FFmpeg) touches them."""

    def __init__(self, inner: Resolver, guard: UrlGuard) -> None:
        self.inner = inner
        self.guard = guard

    async def resolve(self, source: JobSource) -> ResolvedSource:
        resolved = await self.inner.resolve(source)
        video_url = await self.guard.final_url(resolved.video_url)
        audio_url = await self.guard.final_url(resolved.audio_url) if resolved.audio_url else None
        preview_url = None
        if resolved.preview_url:
            if resolved.preview_url == resolved.video_url:
                preview_url = video_url
            else:
                preview_url = await self.guard.final_url(resolved.preview_url)
        # Every other field of the answer (title, cover, stream descriptions) kept.
        return dataclasses.replace(
            resolved, video_url=video_url, audio_url=audio_url, preview_url=preview_url
        )
