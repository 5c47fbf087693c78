"""Async HTTP fetching for the download stage: safe, polite, bounded.

What a fetch guarantees, in the order it is checked:

- **Before any I/O**: only ``http``/``https``; the URL and domain blocklists; hosts that are IP
  literals in any spelling (dotted, decimal ``2130706433``, hex, octal, IPv6, v4-mapped v6) are checked
  against the address guard; numeric spellings other than the canonical dotted quad are refused
  outright (they exist mostly to slip past filters); ``localhost`` names never resolve.
- **DNS** is done here, by :class:`GuardedResolver`, which aiohttp's connector uses to connect: the
  address checked is the address connected to (no rebinding between check and connect). Results are
  cached per host; failures are classified (name does not exist: permanent; server failure or
  timeout: transient, retried, and the resolver's concurrency is halved while they last).
- **Every redirect hop** is re-validated (scheme, blocklists, address) before it is requested; hops
  are bounded.
- **Opt-out**: ``X-Robots-Tag`` directives (noai, noimageai, noindex, noimageindex by default) are
  checked on the response headers, before the body is read; robots.txt is honoured when enabled,
  fetched once per host through this same guarded client.
- **Bounds**: one wall-clock deadline per attempt (connect, headers, body and all redirect hops), a
  byte cap checked against Content-Length and again while streaming, so slow-drip and endless bodies
  end on time with bounded memory.
- **Politeness**: a per-host connection limit and minimum delay between request starts; 429 / 503
  with ``Retry-After`` (seconds or HTTP date) back off that host only; timeouts, connection errors
  and 5xx are retried with exponential backoff and jitter.

Error messages start with a kind (``refused``, ``blocklisted``, ``opted_out``, ``robots``, ``http``,
``timeout``, ``too_large``, ``dns``, ``network``, ``redirects``) so a rerun can tell transient
failures from refusals (:func:`retryable_message`).
"""

from __future__ import annotations

import asyncio
import dataclasses
import email.utils
import ipaddress
import logging
import random
import socket
import time
import urllib.robotparser
from collections.abc import Iterable
from typing import Any

from pydantic import Field

from curate.stage import Frozen

log = logging.getLogger(__name__)

REDIRECT_CODES = frozenset({301, 302, 303, 307, 308})
RETRY_CODES = frozenset({408, 425, 429, 500, 502, 503, 504, 520, 521, 522, 523, 524})
# Kinds whose failure may go away on a later try (used by --retry-failed).
TRANSIENT_KINDS = frozenset({"timeout", "network", "dns_transient", "http_transient"})

# Cloud metadata endpoints: refused even when private networks are allowed.
METADATA_ADDRESSES = frozenset(
    ipaddress.ip_address(a)
    for a in (
        "169.254.169.254",  # AWS, GCP, Azure, OpenStack, DigitalOcean, ...
        "169.254.170.2",  # AWS ECS task metadata
        "169.254.169.253",  # AWS DNS
        "169.254.169.123",  # AWS time sync
        "100.100.100.200",  # Alibaba Cloud
        "168.63.129.16",  # Azure wire server (a public address)
        "192.0.0.192",  # Oracle Cloud
        "fd00:ec2::254",  # AWS IMDS over IPv6
        "fd00:ec2::23",
    )
)
METADATA_HOSTNAMES = frozenset({"metadata.google.internal", "metadata", "instance-data", "metadata.azure.internal"})


class FetchConfig(Frozen):
    """Network behaviour of the download stage. Defaults are polite and safe for the open web."""

    connections: int = Field(64, ge=1)  # concurrent requests per shard task
    per_host_connections: int = Field(16, ge=1)
    host_delay_s: float = Field(0.0, ge=0)  # minimum gap between request starts to one host
    timeout_s: float = Field(20.0, gt=0)  # wall-clock deadline of one attempt, redirects included
    connect_timeout_s: float = Field(10.0, gt=0)
    max_bytes: int = Field(32 * 1024 * 1024, ge=1)
    retries: int = Field(2, ge=0)  # extra attempts after a transient failure
    backoff_s: float = Field(0.5, ge=0)
    backoff_max_s: float = Field(30.0, ge=0)
    max_retry_after_s: float = Field(120.0, ge=0)  # a longer Retry-After fails the row instead
    max_redirects: int = Field(5, ge=0)
    user_agent: str = "Mozilla/5.0 (compatible; curate/0.1; image-text dataset builder)"
    user_agent_token: str = "curate"  # matched against X-Robots-Tag and robots.txt agent names
    disallowed_header_directives: tuple[str, ...] = ("noai", "noimageai", "noindex", "noimageindex")
    respect_robots_txt: bool = False
    verify_tls: bool = True
    allow_private_networks: bool = False
    allowed_networks: tuple[str, ...] = ()  # CIDRs exempt from the address guard (tests: 127.0.0.1/32)
    url_blocklist: tuple[str, ...] = ()
    domain_blocklist: tuple[str, ...] = ()  # a domain blocks its subdomains too
    url_blocklist_file: str | None = None  # one URL per line, any fsspec URL
    domain_blocklist_file: str | None = None
    dns_cache_ttl_s: float = Field(300.0, ge=0)
    dns_concurrency: int = Field(32, ge=1)


class FetchError(Exception):
    """A failed fetch; ``kind`` is the first word of the error message."""

    def __init__(self, kind: str, message: str, retry_after: float | None = None):
        super().__init__(f"{kind}: {message}")
        self.kind = kind
        self.detail = message
        self.retry_after = retry_after

    @property
    def transient(self) -> bool:
        return self.kind in TRANSIENT_KINDS


class AddressRefused(Exception):
    """Raised by the resolver (not an OSError, so aiohttp passes it through unwrapped)."""


def retryable_message(error_message: str | None) -> bool:
    """Whether a stored error message describes a failure worth trying again later."""
    if not error_message:
        return False
    return error_message.split(":", 1)[0] in TRANSIENT_KINDS


# -- addresses ---------------------------------------------------------------------------------
def parse_ip_host(host: str) -> tuple[ipaddress.IPv4Address | ipaddress.IPv6Address | None, bool]:
    """(address, canonical) if ``host`` is an IP literal in any spelling, else (None, True).

    ``inet_aton`` accepts the legacy forms browsers and libc accept: ``2130706433``, ``0x7f000001``,
    ``0177.0.0.1``, ``127.1``. Those are reported as non-canonical.
    """
    h = host.strip("[]")
    try:
        ip = ipaddress.ip_address(h)
        return ip, True
    except ValueError:
        pass
    if h and all(c in "0123456789abcdefxABCDEFX." for c in h) and any(c.isdigit() for c in h):
        try:
            return ipaddress.IPv4Address(socket.inet_aton(h)), False
        except OSError:
            return None, True
    return None, True


def embedded_ipv4(ip: ipaddress.IPv6Address) -> ipaddress.IPv4Address | None:
    """The IPv4 address hidden in a v4-mapped, v4-compatible, 6to4, NAT64 or Teredo IPv6 address."""
    if ip.ipv4_mapped is not None:
        return ip.ipv4_mapped
    if ip.sixtofour is not None:
        return ip.sixtofour
    if ip.teredo is not None:
        return ip.teredo[1]
    packed = ip.packed
    if packed[:12] == bytes(12) and packed[12:] != bytes(4) and int(ip) > 1:  # ::a.b.c.d (deprecated)
        return ipaddress.IPv4Address(packed[12:])
    if ip in ipaddress.ip_network("64:ff9b::/96") or ip in ipaddress.ip_network("64:ff9b:1::/48"):
        return ipaddress.IPv4Address(packed[12:])
    return None


class AddressGuard:
    """Decides whether an IP address may be connected to."""

    def __init__(self, allow_private: bool = False, allowed_networks: Iterable[str] = ()):
        self.allow_private = allow_private
        self.allowed = [ipaddress.ip_network(n, strict=False) for n in allowed_networks]

    def why_refused(self, ip: ipaddress.IPv4Address | ipaddress.IPv6Address) -> str | None:
        """None if allowed, else the reason."""
        candidates = [ip]
        if isinstance(ip, ipaddress.IPv6Address):
            inner = embedded_ipv4(ip)
            if inner is not None:
                candidates.append(inner)
        for a in candidates:
            if a in METADATA_ADDRESSES:
                return f"{ip} is a cloud metadata address"
        if any(ip in n for n in self.allowed) and all(
                any(a in n for n in self.allowed) for a in candidates):
            return None
        for a in candidates:
            if a.is_multicast:
                return f"{ip} is a multicast address"
            if a.is_unspecified:
                return f"{ip} is unspecified"
            if self.allow_private:
                continue
            if a.is_loopback:
                return f"{ip} is a loopback address"
            if a.is_link_local:
                return f"{ip} is a link-local address"
            if a.is_private:
                return f"{ip} is a private address"
            if a.is_reserved or not a.is_global:
                return f"{ip} is a reserved / non-global address"
        return None


# -- URL checks before any I/O -----------------------------------------------------------------
def _read_lines(url: str | None) -> list[str]:
    if not url:
        return []
    import fsspec

    with fsspec.open(url, "rt", compression="infer") as f:
        return [ln.strip() for ln in f if ln.strip() and not ln.lstrip().startswith("#")]


class UrlPolicy:
    """Scheme, blocklists and literal-address checks: everything decidable without I/O."""

    def __init__(self, cfg: FetchConfig):
        self.guard = AddressGuard(cfg.allow_private_networks, cfg.allowed_networks)
        self.urls = {_norm_url(u) for u in (*cfg.url_blocklist, *_read_lines(cfg.url_blocklist_file))}
        self.domains = {d.lower().strip(".") for d in (*cfg.domain_blocklist, *_read_lines(cfg.domain_blocklist_file))}

    def domain_blocked(self, host: str) -> bool:
        h = host.lower().rstrip(".")
        while True:
            if h in self.domains:
                return True
            if "." not in h:
                return False
            h = h.split(".", 1)[1]

    def check(self, url: str):
        """Return the parsed ``yarl.URL``; raise FetchError if it may not be requested."""
        from yarl import URL

        try:
            u = URL(url)
        except (ValueError, TypeError) as e:
            raise FetchError("refused", f"malformed URL: {e}") from None
        scheme = (u.scheme or "").lower()
        if scheme not in ("http", "https"):
            raise FetchError("refused", f"scheme {scheme or '(none)'!r} is not http/https")
        host = u.raw_host or ""
        if not host:
            raise FetchError("refused", "URL has no host")
        if u.user or u.password:
            raise FetchError("refused", "credentials in URL")
        if _norm_url(str(u)) in self.urls:
            raise FetchError("blocklisted", "URL is in the URL blocklist")
        if self.domains and self.domain_blocked(u.host or host):
            raise FetchError("blocklisted", "domain is in the domain blocklist")
        ip, canonical = parse_ip_host(host)
        if ip is not None:
            if not canonical:
                raise FetchError("refused", f"non-canonical IP spelling {host!r} ({ip})")
            why = self.guard.why_refused(ip)
            if why:
                raise FetchError("refused", why)
        else:
            name = host.lower().rstrip(".")
            if not self.guard.allow_private and (name == "localhost" or name.endswith(".localhost")):
                raise FetchError("refused", f"{host} is a loopback name")
            if name in METADATA_HOSTNAMES:
                raise FetchError("refused", f"{host} is a cloud metadata name")
        return u


def _norm_url(url: str) -> str:
    return url.split("#", 1)[0].strip()


# -- DNS ---------------------------------------------------------------------------------------
class AdaptiveLimit:
    """A concurrency limit that halves on trouble and grows back by one on each success."""

    def __init__(self, maximum: int):
        self.maximum = maximum
        self.limit = maximum
        self.active = 0
        self._cond = asyncio.Condition()

    async def __aenter__(self):
        async with self._cond:
            await self._cond.wait_for(lambda: self.active < self.limit)
            self.active += 1

    async def __aexit__(self, *exc):
        async with self._cond:
            self.active -= 1
            self._cond.notify_all()

    def failed(self) -> None:
        self.limit = max(1, self.limit // 2)

    def succeeded(self) -> None:
        self.limit = min(self.maximum, self.limit + 1)


_PERMANENT_GAI = {getattr(socket, n) for n in ("EAI_NONAME", "EAI_NODATA", "EAI_ADDRFAMILY") if hasattr(socket, n)}


def classify_gaierror(e: OSError) -> FetchError:
    if isinstance(e, socket.gaierror) and e.errno in _PERMANENT_GAI:
        return FetchError("dns", f"name not resolved ({e.strerror})")
    return FetchError("dns_transient", f"resolution failed ({getattr(e, 'strerror', None) or e})")


# Over 80 lines: the resolver class is defined in here so that aiohttp is imported only when a download runs;
# each of its methods is short.
def _make_resolver_class():
    # Built lazily so importing this module does not import aiohttp (the CLI must start fast).
    from aiohttp.abc import AbstractResolver

    class GuardedResolver(AbstractResolver):
        """Resolves with the system resolver, checks every address, caches the verdict per host."""

        def __init__(self, guard: AddressGuard, ttl: float, concurrency: int):
            self.guard = guard
            self.ttl = ttl
            self.limit = AdaptiveLimit(concurrency)
            self._cache: dict[str, tuple[float, Any]] = {}
            self._pending: dict[str, asyncio.Future] = {}
            self.lookups = 0

        async def _lookup(self, host: str) -> list[tuple[int, str]]:
            now = time.monotonic()
            hit = self._cache.get(host)
            if hit is not None and hit[0] > now:
                if isinstance(hit[1], BaseException):
                    raise hit[1]
                return hit[1]
            fut = self._pending.get(host)
            if fut is not None:
                return await asyncio.shield(fut)
            fut = asyncio.get_running_loop().create_future()
            self._pending[host] = fut
            try:
                result = await self._resolve_and_check(host)
                self._cache[host] = (time.monotonic() + self.ttl, result)
                fut.set_result(result)
                return result
            except (AddressRefused, FetchError) as e:
                if not (isinstance(e, FetchError) and e.transient):
                    self._cache[host] = (time.monotonic() + self.ttl, e)
                fut.set_exception(e)
                fut.exception()  # mark retrieved: waiters may not exist
                raise
            finally:
                del self._pending[host]

        async def _resolve_and_check(self, host: str) -> list[tuple[int, str]]:
            loop = asyncio.get_running_loop()
            async with self.limit:
                self.lookups += 1
                try:
                    infos = await loop.getaddrinfo(host, None, type=socket.SOCK_STREAM)
                except OSError as e:
                    err = classify_gaierror(e)
                    if err.transient:
                        self.limit.failed()
                    raise err from None
            self.limit.succeeded()
            addrs: list[tuple[int, str]] = []
            for family, _, _, _, sockaddr in infos:
                ip = ipaddress.ip_address(sockaddr[0].split("%", 1)[0])
                why = self.guard.why_refused(ip)
                if why:
                    # One bad address refuses the host: a name mixing public and private answers
                    # is a rebinding attempt, not a CDN.
                    raise AddressRefused(f"{host} resolves to {why}")
                if (family, sockaddr[0]) not in addrs:
                    addrs.append((family, sockaddr[0]))
            if not addrs:
                raise FetchError("dns", f"{host} has no addresses")
            return addrs

        async def resolve(self, host: str, port: int = 0, family: int = socket.AF_UNSPEC):
            addrs = await self._lookup(host)
            out = [
                {"hostname": host, "host": ip, "port": port, "family": fam, "proto": 0,
                 "flags": socket.AI_NUMERICHOST}
                for fam, ip in addrs
                if family in (socket.AF_UNSPEC, 0) or fam == family
            ]
            if not out:
                raise FetchError("dns", f"{host} has no address of family {family}")
            return out

        async def close(self) -> None:
            self._cache.clear()

    return GuardedResolver


# -- hosts -------------------------------------------------------------------------------------
class _Host:
    __slots__ = ("sem", "next_start", "blocked_until")

    def __init__(self, limit: int):
        self.sem = asyncio.Semaphore(limit)
        self.next_start = 0.0
        self.blocked_until = 0.0


def parse_retry_after(value: str | None, now: float | None = None) -> float | None:
    """Seconds to wait from a Retry-After header (delta-seconds or HTTP date), or None."""
    if not value:
        return None
    value = value.strip()
    if value.isdigit():
        return float(value)
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    if when is None:
        return None
    return max(0.0, when.timestamp() - (now if now is not None else time.time()))


def opted_out(header_values: Iterable[str], token: str, disallowed: Iterable[str]) -> str | None:
    """The disallowing directive if any X-Robots-Tag value applies to us (``token`` or no agent)."""
    bad = {d.lower() for d in disallowed}
    token = token.lower()
    for value in header_values:
        agent, directives = None, value
        head, sep, rest = value.partition(":")
        # "googlebot: noindex" names an agent; "unavailable_after: <date>" is a directive with a value.
        if sep and head.strip() and " " not in head.strip() and head.strip().lower() not in (
                "unavailable_after", "max-snippet", "max-image-preview", "max-video-preview"):
            agent, directives = head.strip().lower(), rest
        if agent not in (None, "*", token):
            continue
        for d in directives.split(","):
            d = d.strip().lower()
            if d in bad:
                return d
    return None


@dataclasses.dataclass
class FetchResult:
    url: str
    data: bytes | None = None
    error: str | None = None
    http_status: int | None = None
    final_url: str | None = None
    attempts: int = 0
    seconds: float = 0.0
    # A successful fetch keeps its body slot (see Fetcher) until the caller is done with the body.
    release: Any = dataclasses.field(default=lambda: None, repr=False)


class _Slot:
    """One body slot of a Fetcher's budget, taken at most once; give() is idempotent."""

    __slots__ = ("budget", "held", "sent_at")

    def __init__(self, budget: asyncio.Semaphore | None):
        self.budget = budget
        self.held = False
        self.sent_at: float | None = None  # when the first request went out (queueing excluded)

    async def take(self) -> None:
        if self.budget is not None and not self.held:
            await self.budget.acquire()
            self.held = True

    def give(self) -> None:
        if self.held:
            self.held = False
            self.budget.release()


class Fetcher:
    """One per shard task and event loop: ``async with Fetcher(cfg) as f: r = await f.fetch(url)``.

    ``budget`` bounds the response bodies alive at once: a slot is taken when a request is about to
    go out (after the host's queue, politeness delay and Retry-After wait, so a backed-off host does
    not hold slots other hosts could use) and kept by a successful result until the caller calls
    ``result.release()``. Slots are never held while waiting for a host, so there is no deadlock
    between host limits and the budget.
    """

    def __init__(self, cfg: FetchConfig, budget: asyncio.Semaphore | None = None):
        self.cfg = cfg
        self.budget = budget
        self.policy = UrlPolicy(cfg)
        self._hosts: dict[str, _Host] = {}
        self._robots: dict[str, asyncio.Task] = {}
        self.requests = 0  # HTTP requests actually sent (for stats and tests)
        self.session = None
        self.resolver = None

    async def __aenter__(self) -> Fetcher:
        import aiohttp

        self.resolver = _make_resolver_class()(
            self.policy.guard, self.cfg.dns_cache_ttl_s, self.cfg.dns_concurrency)
        connector = aiohttp.TCPConnector(
            limit=self.cfg.connections,
            limit_per_host=0,  # per-host limits are ours (they also cover Retry-After waits)
            resolver=self.resolver,
            use_dns_cache=False,  # every connection goes through the guarded resolver (it caches)
            ssl=self.cfg.verify_tls,  # False: accept any certificate (never the default)
        )
        self.session = aiohttp.ClientSession(
            connector=connector,
            timeout=aiohttp.ClientTimeout(total=None, sock_connect=self.cfg.connect_timeout_s),
            headers={"User-Agent": self.cfg.user_agent, "Accept": "image/*,*/*;q=0.8"},
            cookie_jar=aiohttp.DummyCookieJar(),
            trust_env=False,  # never route through a proxy from the environment: the guard checks direct hops
        )
        return self

    async def __aexit__(self, *exc) -> None:
        if self.session is not None:
            await self.session.close()

    def _host(self, key: str) -> _Host:
        h = self._hosts.get(key)
        if h is None:
            h = self._hosts[key] = _Host(self.cfg.per_host_connections)
        return h

    async def fetch(self, url: str) -> FetchResult:
        """Fetch one URL; never raises for per-URL problems (they are in ``error``)."""
        t0 = time.monotonic()
        res = FetchResult(url=url)
        slot = _Slot(self.budget)
        try:
            u = self.policy.check(url)
            if self.cfg.respect_robots_txt:
                await self._check_robots(u)
            attempt = 0
            while True:
                attempt += 1
                res.attempts = attempt
                try:
                    res.data, res.final_url, res.http_status = await self._attempt(u, self.cfg.max_bytes, slot)
                    res.release = slot.give
                    break
                except FetchError as e:
                    slot.give()
                    if not e.transient or attempt > self.cfg.retries:
                        raise
                    if e.retry_after is not None:
                        if e.retry_after > self.cfg.max_retry_after_s:
                            raise FetchError(e.kind, f"{e.detail} (Retry-After {e.retry_after:.0f}s too long)") from None
                        host = self._host(u.host or "")
                        host.blocked_until = max(host.blocked_until, time.monotonic() + e.retry_after)
                    else:
                        delay = min(self.cfg.backoff_max_s, self.cfg.backoff_s * 2 ** (attempt - 1))
                        await asyncio.sleep(delay * (0.5 + random.random()))
        except FetchError as e:
            res.error = str(e)
        except Exception as e:  # noqa: BLE001 - a per-URL failure is data
            log.debug("unexpected fetch error for %s", url, exc_info=True)
            res.error = f"network: {type(e).__name__}: {e}"
        finally:
            if res.data is None:
                slot.give()
        # Time on the wire (from the first request out), not time spent queueing for a host or a slot.
        res.seconds = time.monotonic() - (slot.sent_at if slot.sent_at is not None else t0)
        return res

    async def _attempt(self, u, max_bytes: int, slot: _Slot | None = None) -> tuple[bytes, str, int]:
        """One attempt with its redirect chain under one deadline.

        The deadline starts when the first request may go out, not while the URL waits for its host's
        connection slot, politeness delay or Retry-After: a host with thousands of queued URLs must
        not time them out before they were even sent.
        """
        try:
            return await self._follow(u, max_bytes, slot or _Slot(None))
        except TimeoutError:
            raise FetchError("timeout", f"no complete response within {self.cfg.timeout_s:g}s") from None

    async def _follow(self, u, max_bytes: int, slot: _Slot) -> tuple[bytes, str, int]:
        import aiohttp

        hops = 0
        deadline = None
        loop = asyncio.get_running_loop()
        while True:
            slot.give()  # never wait for a host while holding a body slot
            host = self._host(u.host or "")
            async with host.sem:
                while True:
                    wait = max(host.blocked_until, host.next_start) - loop.time()
                    if deadline is not None and loop.time() + max(wait, 0) >= deadline:
                        raise TimeoutError
                    if wait <= 0:
                        break
                    await asyncio.sleep(wait)
                await slot.take()
                host.next_start = loop.time() + self.cfg.host_delay_s
                if deadline is None:
                    deadline = loop.time() + self.cfg.timeout_s
                if slot.sent_at is None:
                    slot.sent_at = loop.time()
                try:
                    self.requests += 1
                    async with asyncio.timeout_at(deadline), self.session.get(u, allow_redirects=False) as resp:
                        if resp.status in REDIRECT_CODES:
                            loc = resp.headers.get("Location")
                            if not loc:
                                raise FetchError("http", f"{resp.status} redirect without Location")
                            hops += 1
                            if hops > self.cfg.max_redirects:
                                raise FetchError("redirects", f"more than {self.cfg.max_redirects} redirects")
                            nxt = resp.url.join(_yarl(loc))
                            u = self.policy.check(str(nxt))
                            continue
                        if resp.status in RETRY_CODES:
                            raise FetchError("http_transient", f"{resp.status} {resp.reason}",
                                             retry_after=parse_retry_after(resp.headers.get("Retry-After")))
                        if not 200 <= resp.status < 300:
                            raise FetchError("http", f"{resp.status} {resp.reason}")
                        directive = opted_out(resp.headers.getall("X-Robots-Tag", []), self.cfg.user_agent_token,
                                              self.cfg.disallowed_header_directives)
                        if directive:
                            raise FetchError("opted_out", f"X-Robots-Tag: {directive}")
                        length = resp.content_length
                        if length is not None and length > max_bytes:
                            raise FetchError("too_large", f"Content-Length {length} > {max_bytes} bytes")
                        chunks, size = [], 0
                        async for chunk in resp.content.iter_chunked(1 << 16):
                            size += len(chunk)
                            if size > max_bytes:
                                raise FetchError("too_large", f"body exceeds {max_bytes} bytes")
                            chunks.append(chunk)
                        return b"".join(chunks), str(resp.url), resp.status
                except AddressRefused as e:
                    raise FetchError("refused", str(e)) from None
                except (FetchError, TimeoutError):  # TimeoutError is an OSError: keep it out of "network"
                    raise
                except aiohttp.ClientConnectorCertificateError as e:
                    raise FetchError("network", f"TLS certificate: {e}") from None
                except (aiohttp.ClientError, OSError) as e:
                    cause = getattr(e, "os_error", None)
                    if isinstance(cause, FetchError):
                        raise cause from None
                    if isinstance(e, aiohttp.ClientConnectorDNSError) and isinstance(cause, OSError):
                        raise classify_gaierror(cause) from None
                    raise FetchError("network", f"{type(e).__name__}: {e}") from None

    async def _check_robots(self, u) -> None:
        key = str(u.origin())
        task = self._robots.get(key)
        if task is None:
            task = self._robots[key] = asyncio.ensure_future(self._load_robots(key))
        parser = await task
        if parser is not None and not parser.can_fetch(self.cfg.user_agent_token, str(u)):
            raise FetchError("robots", "disallowed by robots.txt")

    async def _load_robots(self, origin: str) -> urllib.robotparser.RobotFileParser | None:
        """The host's robots.txt rules; None means no rules (4xx). RFC 9309: unreachable -> disallow all."""
        parser = urllib.robotparser.RobotFileParser()
        try:
            u = self.policy.check(origin + "/robots.txt")
            data, _, _ = await self._attempt(u, 512 * 1024)
        except FetchError as e:
            if e.kind == "http":  # 4xx: no rules
                return None
            if e.kind == "too_large":
                return None
            parser.disallow_all = True
            return parser
        parser.parse(data.decode("utf-8", "replace").splitlines())
        return parser


def _yarl(s: str):
    from yarl import URL

    try:
        return URL(s)
    except ValueError as e:
        raise FetchError("http", f"bad redirect Location: {e}") from None
