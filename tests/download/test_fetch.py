"""The guarded fetcher against a real local server: statuses, bounds, SSRF, opt-out, politeness."""

from __future__ import annotations

import asyncio
import ipaddress
import socket
import tracemalloc

import pytest

from curate.fetch import (
    AddressGuard,
    FetchConfig,
    Fetcher,
    UrlPolicy,
    classify_gaierror,
    opted_out,
    parse_ip_host,
    parse_retry_after,
    retryable_message,
)

pytestmark = pytest.mark.timeout(60)

LOCAL = {"allowed_networks": ("127.0.0.1/32",), "timeout_s": 3.0, "retries": 1, "backoff_s": 0.05}


def fetch_all(urls, **cfg):
    async def go():
        async with Fetcher(FetchConfig(**cfg)) as f:
            results = await asyncio.gather(*(f.fetch(u) for u in urls))
            return results, f
    return asyncio.run(go())


def kind(result) -> str | None:
    return result.error.split(":", 1)[0] if result.error else None


# -- SSRF: refused without the allow option, before any I/O ---------------------------------------
SSRF_URLS = [
    "http://127.0.0.1:{port}/img/a.jpg",
    "http://localhost:{port}/img/a.jpg",
    "http://[::1]:{port}/img/a.jpg",
    "http://10.0.0.1/x.jpg",
    "http://169.254.169.254/latest/meta-data/",
    "http://[::ffff:169.254.169.254]/latest/meta-data/",
    "http://[::ffff:127.0.0.1]:{port}/img/a.jpg",
    "http://2130706433:{port}/img/a.jpg",
    "http://0x7f000001:{port}/img/a.jpg",
    "http://017700000001:{port}/img/a.jpg",
    "http://127.1:{port}/img/a.jpg",
    "http://[fd00:ec2::254]/latest/meta-data/",
    "http://192.168.1.1/x.jpg",
    "http://100.64.0.1/x.jpg",
    "http://0.0.0.0:{port}/img/a.jpg",
    "http://224.0.0.1/x.jpg",
    "http://metadata.google.internal/computeMetadata/v1/",
    "file:///etc/passwd",
    "ftp://127.0.0.1/x.jpg",
    "data:image/png;base64,iVBORw0KGgo=",
    "gopher://127.0.0.1:70/x",
    "javascript:alert(1)",
    "http://user:pw@127.0.0.1:{port}/img/a.jpg",
]


def test_ssrf_refused_before_any_io(server, monkeypatch):
    lookups = []
    real = socket.getaddrinfo
    monkeypatch.setattr(socket, "getaddrinfo", lambda *a, **k: lookups.append(a) or real(*a, **k))
    urls = [u.format(port=server.port) for u in SSRF_URLS]
    results, f = fetch_all(urls, timeout_s=3.0)  # default config: nothing private allowed
    for u, r in zip(urls, results, strict=True):
        assert r.data is None, u
        assert kind(r) == "refused", (u, r.error)
    assert f.requests == 0
    assert f.resolver.lookups == 0 and lookups == []  # not even a DNS lookup
    assert server.paths() == []  # the target saw nothing


def test_hostname_resolving_to_loopback_is_refused_after_resolution(server):
    name = socket.gethostname()
    try:
        addrs = {i[4][0] for i in socket.getaddrinfo(name, None)}
    except OSError:
        pytest.skip("this machine's hostname does not resolve")
    if not all(not ipaddress.ip_address(a).is_global for a in addrs):
        pytest.skip("hostname resolves to a public address here")
    (r,), f = fetch_all([f"http://{name}:{server.port}/img/a.jpg"], timeout_s=3.0)
    assert kind(r) == "refused" and "resolves to" in r.error
    assert f.resolver.lookups == 1
    assert server.paths() == []


def test_address_guard_spellings():
    g = AddressGuard()
    for bad in ["127.0.0.1", "::1", "10.1.2.3", "172.16.0.1", "192.168.0.1", "169.254.169.254",
                "::ffff:169.254.169.254", "::ffff:10.0.0.1", "fd00:ec2::254", "fe80::1", "ff02::1",
                "0.0.0.0", "::", "100.64.0.1", "2002:7f00:1::", "64:ff9b::a00:1", "168.63.129.16"]:
        assert g.why_refused(ipaddress.ip_address(bad)), bad
    for good in ["93.184.216.34", "2606:2800:220:1:248:1893:25c8:1946", "8.8.8.8"]:
        assert g.why_refused(ipaddress.ip_address(good)) is None, good
    # allowing private networks never allows cloud metadata
    lax = AddressGuard(allow_private=True)
    assert lax.why_refused(ipaddress.ip_address("10.0.0.1")) is None
    assert lax.why_refused(ipaddress.ip_address("169.254.169.254"))
    assert lax.why_refused(ipaddress.ip_address("::ffff:169.254.169.254"))
    only = AddressGuard(allowed_networks=["127.0.0.1/32"])
    assert only.why_refused(ipaddress.ip_address("127.0.0.1")) is None
    assert only.why_refused(ipaddress.ip_address("127.0.0.2"))
    assert only.why_refused(ipaddress.ip_address("10.0.0.1"))


def test_ip_spellings_parsed():
    for spelled in ["2130706433", "0x7f000001", "017700000001", "127.1", "0x7f.0.0.1"]:
        ip, canonical = parse_ip_host(spelled)
        assert ip == ipaddress.ip_address("127.0.0.1") and not canonical, spelled
    assert parse_ip_host("[::1]") == (ipaddress.ip_address("::1"), True)
    assert parse_ip_host("example.com") == (None, True)
    assert parse_ip_host("deadbeef.com")[0] is None


def test_blocklists_checked_before_request(server, tmp_path):
    blocked_file = tmp_path / "domains.txt"
    blocked_file.write_text("# comment\nevil.example\n")
    urls = [server.base_url + "/blocked.jpg", "http://cdn.evil.example/x.jpg", server.base_url + "/img/a.jpg"]
    results, f = fetch_all(urls, url_blocklist=(server.base_url + "/blocked.jpg",),
                           domain_blocklist_file=str(blocked_file), **LOCAL)
    assert [kind(r) for r in results] == ["blocklisted", "blocklisted", None]
    assert "/blocked.jpg" not in server.paths()
    assert server.paths() == ["/img/a.jpg"]
    assert UrlPolicy(FetchConfig(domain_blocklist=("evil.example",))).domain_blocked("a.b.EVIL.example.")


# -- the hostile server, allowed on 127.0.0.1 -------------------------------------------------------
def test_good_images_and_http_errors(server):
    paths = ["/img/a.jpg", "/img/b.png", "/img/c.webp", "/status/404", "/status/500", "/nothing"]
    results, _ = fetch_all([server.base_url + p for p in paths], **LOCAL)
    by = dict(zip(paths, results, strict=True))
    assert by["/img/a.jpg"].data == server.routes.images["/img/a.jpg"][0]
    assert by["/img/b.png"].data[:4] == b"\x89PNG"
    assert by["/img/c.webp"].data[8:12] == b"WEBP"
    assert by["/status/404"].error.startswith("http: 404")
    assert by["/status/404"].attempts == 1  # 404 is not retried
    assert by["/status/500"].error.startswith("http_transient: 500")
    assert by["/status/500"].attempts == 2  # retried once, then given up
    assert server.paths().count("/status/500") == 2


def test_transient_5xx_retried_with_backoff(server):
    (r,), _ = fetch_all([server.base_url + "/flaky/2"], **{**LOCAL, "retries": 2})
    assert r.data is not None and r.attempts == 3


def test_429_retry_after_backs_off_that_host_only(server):
    other = f"http://localhost:{server.port}"
    urls = [server.base_url + "/ratelimited/3"] + [f"{other}/img/a.jpg?i={i}" for i in range(5)]

    async def go():
        async with Fetcher(FetchConfig(allow_private_networks=True, timeout_s=5, retries=1,
                                       per_host_connections=1)) as f:
            first = asyncio.ensure_future(f.fetch(urls[0]))
            await asyncio.sleep(0.3)  # the 429 has arrived; the host is backing off
            rest = await asyncio.gather(*(f.fetch(u) for u in urls[1:]))
            return [await first, *rest]

    results = asyncio.run(go())
    assert results[0].data is not None and results[0].attempts == 2
    assert all(r.data is not None for r in results[1:])
    log = server.log
    t_429, t_retry = [t for t, p in log if p == "/ratelimited/3"]
    assert t_retry - t_429 >= 2.9  # Retry-After honoured (3 s)
    others = [t for t, p in log if p == "/img/a.jpg"]
    assert len(others) == 5 and max(others) < t_retry  # the other host went on meanwhile


def test_retry_after_too_long_fails_without_waiting(server):
    (r,), _ = fetch_all([server.base_url + "/ratelimited/3600"], **LOCAL)
    assert r.error.startswith("http_transient: 429") and "too long" in r.error
    assert r.attempts == 1


def test_slow_drip_hits_deadline(server):
    (r,), _ = fetch_all([server.base_url + "/slow.jpg"], **{**LOCAL, "timeout_s": 1.0, "retries": 0})
    assert kind(r) == "timeout"
    assert r.seconds < 30  # the 1 MB drip would take 58 hours


def test_deadline_starts_when_the_request_goes_out_not_in_the_host_queue(server):
    urls = [f"{server.base_url}/delay/300?i={i}" for i in range(8)]  # 8 x 0.3 s through one slot
    results, _ = fetch_all(urls, **{**LOCAL, "timeout_s": 1.0, "retries": 0, "per_host_connections": 1})
    assert [r.error for r in results] == [None] * 8
    assert server.paths().count("/delay/300") == 8


def test_body_budget_bounds_bodies_alive(server):
    async def go():
        budget = asyncio.Semaphore(2)
        async with Fetcher(FetchConfig(**LOCAL), budget=budget) as f:
            tasks = [asyncio.ensure_future(f.fetch(f"{server.base_url}/img/b.png?i={i}")) for i in range(6)]
            done, pending = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
            while len(done) < 2:
                more, pending = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
                done |= more
            await asyncio.sleep(0.5)
            sent_while_held = len(server.paths())
            for t in done:
                t.result().release()  # the caller is done with these bodies
            for t in asyncio.as_completed(list(pending)):
                (await t).release()
            results = [t.result() for t in tasks]
            return sent_while_held, results, budget

    sent_while_held, results, budget = asyncio.run(go())
    assert sent_while_held == 2  # nobody else got a slot while two bodies were alive
    assert all(r.data is not None for r in results)
    assert budget._value == 2  # every slot given back


def test_byte_cap_on_endless_and_declared_huge_bodies_memory_bounded(server):
    tracemalloc.start()
    try:
        results, _ = fetch_all([server.base_url + "/endless.jpg", server.base_url + "/huge.jpg"],
                               **{**LOCAL, "max_bytes": 2 * 1024 * 1024, "timeout_s": 20})
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert [kind(r) for r in results] == ["too_large", "too_large"]
    assert "Content-Length" in results[1].error  # refused from the header, body never read
    assert peak < 40 * 1024 * 1024


def test_redirects_followed_bounded_and_revalidated(server):
    paths = ["/redirect/3", "/redirect/9", "/loop", "/to-private", "/to-metadata", "/to-file"]
    results, _ = fetch_all([server.base_url + p for p in paths], **{**LOCAL, "max_redirects": 5})
    by = dict(zip(paths, results, strict=True))
    assert by["/redirect/3"].data == server.routes.images["/img/a.jpg"][0]
    assert by["/redirect/3"].final_url.endswith("/img/a.jpg")
    assert kind(by["/redirect/9"]) == "redirects"
    assert kind(by["/loop"]) == "redirects"
    assert kind(by["/to-private"]) == "refused" and "10.0.0.1" in by["/to-private"].error
    assert kind(by["/to-metadata"]) == "refused" and "metadata" in by["/to-metadata"].error
    assert kind(by["/to-file"]) == "refused" and "scheme" in by["/to-file"].error
    assert server.paths().count("/loop") == 6


def test_x_robots_tag_opt_out_checked_on_headers(server):
    paths = ["/noai.jpg", "/noai-otherbot.jpg"]
    results, _ = fetch_all([server.base_url + p for p in paths], **LOCAL)
    assert kind(results[0]) == "opted_out" and "noindex" in results[0].error
    assert results[1].data is not None  # addressed to another agent
    # configurable: with an empty directive set nothing opts out
    (r,), _ = fetch_all([server.base_url + "/noai.jpg"], disallowed_header_directives=(), **LOCAL)
    assert r.data is not None


def test_robots_txt_when_enabled(server):
    urls = [server.base_url + "/private/secret.jpg", server.base_url + "/img/a.jpg", server.base_url + "/img/b.png"]
    results, _ = fetch_all(urls, respect_robots_txt=True, **LOCAL)
    assert kind(results[0]) == "robots"
    assert results[1].data is not None and results[2].data is not None
    assert server.paths().count("/robots.txt") == 1  # cached per host
    assert "/private/secret.jpg" not in server.paths()


def test_https_verifies_certificates_unless_told_not_to(tmp_path):
    from dlserver import Server

    tls = Server(tls_dir=tmp_path)
    try:
        url = tls.base_url + "/img/a.jpg"
        (r,), _ = fetch_all([url], **LOCAL)
        assert r.data is None and kind(r) == "network" and "certificate" in r.error.lower()
        (r,), _ = fetch_all([url], verify_tls=False, **LOCAL)
        assert r.data == tls.routes.images["/img/a.jpg"][0]
        assert r.final_url.startswith("https://")
    finally:
        tls.close()


def test_dns_failure_classified():
    (r,), f = fetch_all(["http://no-such-host.invalid/x.jpg"], timeout_s=5, retries=0)
    assert kind(r) in ("dns", "dns_transient")
    assert classify_gaierror(socket.gaierror(socket.EAI_NONAME, "Name or service not known")).kind == "dns"
    assert classify_gaierror(socket.gaierror(socket.EAI_AGAIN, "Temporary failure")).transient


def test_transient_dns_failures_retried_and_resolver_concurrency_reduced(server, monkeypatch):
    # The system resolver answers "try again" twice for this name, then 127.0.0.1.
    real = socket.getaddrinfo
    calls = []

    def flaky(host, *a, **k):
        if host == "flaky.test":
            calls.append(host)
            if len(calls) <= 2:
                raise socket.gaierror(socket.EAI_AGAIN, "Temporary failure in name resolution")
            return real("127.0.0.1", *a, **k)
        return real(host, *a, **k)

    monkeypatch.setattr(socket, "getaddrinfo", flaky)

    async def go():
        async with Fetcher(FetchConfig(**{**LOCAL, "retries": 3, "dns_concurrency": 8})) as f:
            r = await f.fetch(f"http://flaky.test:{server.port}/img/a.jpg")
            return r, f.resolver.limit.limit, await f.fetch(f"http://flaky.test:{server.port}/img/b.png")

    r, limit_after, again = asyncio.run(go())
    assert r.data is not None and r.attempts == 3 and len(calls) == 3
    assert limit_after == 8 // 2 // 2 + 1  # halved twice, then grew back by one on success
    assert again.data is not None and len(calls) == 3  # cached: no new lookup


def test_opt_out_and_retry_after_parsing():
    assert opted_out(["noai"], "curate", ["noai"]) == "noai"
    assert opted_out(["googlebot: noai"], "curate", ["noai"]) is None
    assert opted_out(["curate: noimageai"], "curate", ["noimageai"]) == "noimageai"
    assert opted_out(["unavailable_after: 25 Jun 2010 15:00:00 PST, noai"], "curate", ["noai"]) == "noai"
    assert opted_out(["index, follow"], "curate", ["noai"]) is None
    assert parse_retry_after("7") == 7.0
    assert parse_retry_after("Wed, 21 Oct 2015 07:28:00 GMT", now=1445412470.0) == pytest.approx(10.0)
    assert parse_retry_after("soon") is None
    assert retryable_message("timeout: no complete response") and not retryable_message("http: 404 Not Found")
    assert not retryable_message("refused: 10.0.0.1 is a private address")


def test_gate_serves_waiters_first_come_and_follows_resizes():
    import asyncio

    from curate.fetch import Gate

    async def main() -> tuple[list[int], int]:
        gate = Gate(2)
        order: list[int] = []

        async def one(i: int) -> None:
            await gate.acquire()
            order.append(i)
            await asyncio.sleep(0.01)
            gate.release()

        tasks = [asyncio.create_task(one(i)) for i in range(8)]
        await asyncio.sleep(0)
        gate.resize(4)  # grown while in use: two more waiters go at once
        late = asyncio.create_task(one(99))  # a newcomer does not jump the queue
        await asyncio.gather(*tasks, late)
        return order, gate.used

    order, used = asyncio.run(main())
    assert order == [0, 1, 2, 3, 4, 5, 6, 7, 99] and used == 0
