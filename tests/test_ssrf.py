"""The SSRF guard (worker/webhooks/ssrf.py): hostile callback URLs are refused at submit and again at delivery,
and nothing ever reaches the canary listeners on 127.0.0.2-5."""

from __future__ import annotations

from ipaddress import ip_address

import pytest
from uuid_utils.compat import uuid7

from tests import engine
from tests.receivers import Hooks, Receiver
from worker import Forbidden, UrlGuard, store
from worker.webhooks.ssrf import parse_networks, parse_ports, refusal

PUBLIC = "93.184.215.14"  # answered by the fake DNS only: no test ever connects to it
CANARY = 5555  # where a URL needs a port and no connection may happen (the delivery test uses the canaries')

# Answers of the attacker's DNS.
DNS = {
    "localhost": ["127.0.0.3"],
    "hooks.example.com": [PUBLIC],
    "metadata.google.internal": ["169.254.169.254"],
    "mixed.example.com": [PUBLIC, "127.0.0.4"],  # one public, one private: every answer must pass
    "loopback.example.com": ["127.0.0.5"],
    "private.example.com": ["10.1.2.3"],
    "mapped.example.com": ["::ffff:127.0.0.2"],
    "nat64.example.com": ["64:ff9b::a9fe:a9fe"],  # 169.254.169.254 behind NAT64
}


def hostile(port: int, allowed_port: int) -> list[str]:
    """URLs that must never be called. `port`: where canaries listen; `allowed_port`: the receiver's."""
    return [
        # loopback, private, link-local, CGNAT, multicast, unspecified, metadata, reserved
        f"http://127.0.0.2:{port}/",
        f"http://[::1]:{port}/",
        f"http://10.0.0.1:{port}/",
        f"http://172.16.5.4:{port}/",
        f"http://192.168.1.1:{port}/",
        f"http://[fd00::1]:{port}/",
        f"http://169.254.169.254:{port}/latest/meta-data/",
        f"http://[fe80::1]:{port}/",
        f"http://100.64.0.1:{port}/",
        f"http://100.100.100.200:{port}/",
        f"http://168.63.129.16:{port}/",
        f"http://224.0.0.1:{port}/",
        f"http://0.0.0.0:{port}/",
        f"http://[::]:{port}/",
        f"http://240.0.0.1:{port}/",
        # IPv4 hidden in IPv6: mapped, NAT64, 6to4
        f"http://[::ffff:127.0.0.2]:{port}/",
        f"http://[::ffff:169.254.169.254]:{port}/",
        f"http://[64:ff9b::7f00:2]:{port}/",
        f"http://[2002:7f00:3::1]:{port}/",
        # decimal, hex, octal and shortened IPv4 spellings
        f"http://2130706434:{port}/",
        f"http://0x7f000003:{port}/",
        f"http://0177.0.0.4:{port}/",
        f"http://127.5:{port}/",
        f"http://0x7f.0.0.2:{port}/",
        # schemes, userinfo, parser tricks, ports
        "file:///etc/passwd",
        f"gopher://127.0.0.2:{port}/_SET",
        "ftp://hooks.example.com/",
        "javascript:alert(1)",
        f"http://user:pass@127.0.0.1:{allowed_port}/",
        f"http://hooks.example.com@127.0.0.2:{port}/",
        f"http://127.0.0.1:{allowed_port}\\@hooks.example.com/",
        f"http://127.0.0.1:{allowed_port}/ /",
        "http://hooks.example.com:22/",
        "https://hooks.example.com:0/",
        "http:///no-host",
        f"http://[fe80::1%25lo]:{port}/",
        # names whose answers are not allowed
        f"http://localhost:{port}/",
        f"http://metadata.google.internal:{port}/",
        f"http://mixed.example.com:{port}/",
        f"http://loopback.example.com:{port}/",
        f"http://private.example.com:{port}/",
        f"http://mapped.example.com:{port}/",
        f"http://nat64.example.com:{port}/",
        f"http://unknown.example.com:{port}/",
    ]


def guard_for_tests() -> UrlGuard:
    async def resolve(host: str, port: int) -> list[str]:
        if host not in DNS:
            raise OSError(f"no such name: {host}")
        return DNS[host]

    return UrlGuard(parse_networks("127.0.0.1/32"), parse_ports("443,1024-65535"), allow_http=True, resolver=resolve)


@pytest.mark.parametrize("url", hostile(CANARY, 8080))
async def test_a_hostile_url_is_refused(url: str) -> None:
    with pytest.raises(Forbidden):
        await guard_for_tests().check(url)


async def test_the_table_is_long_enough_and_allowed_urls_pass() -> None:
    assert len(hostile(CANARY, 8080)) >= 25
    guard = guard_for_tests()
    target = await guard.check("https://hooks.example.com/hooks?x=1")
    assert target.host == "hooks.example.com" and target.addresses == (ip_address(PUBLIC),) and target.is_name
    assert str(target.pinned(target.addresses[0])) == f"https://{PUBLIC}/hooks?x=1"
    allowed = await guard.check("http://127.0.0.1:8080/")  # inside OUTLAST_ALLOWED_CALLBACK_NETWORKS
    assert allowed.addresses == (ip_address("127.0.0.1"),) and not allowed.is_name


async def test_the_defaults_want_https_on_the_usual_ports_and_global_addresses_only() -> None:
    guard = UrlGuard(resolver=guard_for_tests().resolver)
    assert (await guard.check("https://hooks.example.com/")).addresses == (ip_address(PUBLIC),)
    for url in ("http://hooks.example.com/", "https://hooks.example.com:9000/", "https://127.0.0.1/"):
        with pytest.raises(Forbidden):
            await guard.check(url)


def test_refusals_say_why_and_judge_hidden_ipv4_by_what_it_hides() -> None:
    assert refusal(ip_address("127.0.0.2")) == "127.0.0.2 is loopback"
    assert "100.64.0.1 is carrier-grade NAT" == refusal(ip_address("100.64.0.1"))
    assert "wrapper around 127.0.0.2, which is loopback" in (refusal(ip_address("64:ff9b::7f00:2")) or "")
    assert "wrapper around 10.0.0.1, which is private" in (refusal(ip_address("2002:a00:1::1")) or "")
    assert refusal(ip_address("::ffff:8.8.8.8")) is None  # a global IPv4 address stays global when mapped
    assert refusal(ip_address("2606:4700::1111")) is None
    # An explicit allowance opens its range, never metadata, link-local or unspecified addresses.
    everything = parse_networks("0.0.0.0/0, ::/0")
    assert refusal(ip_address("10.0.0.1"), everything) is None
    assert refusal(ip_address("169.254.169.254"), everything) is not None
    assert refusal(ip_address("0.0.0.0"), everything) is not None


async def test_a_refusal_from_dns_may_pass_later_but_one_from_the_url_itself_never_will() -> None:
    guard = guard_for_tests()
    with pytest.raises(Forbidden) as from_dns:
        await guard.check("http://loopback.example.com:8080/")
    with pytest.raises(Forbidden) as from_text:
        await guard.check("http://127.0.0.2:8080/")
    assert not from_dns.value.permanent and from_text.value.permanent


def test_bad_allowance_settings_stop_the_process_naming_the_variable() -> None:
    from worker import Config

    with pytest.raises(SystemExit, match="OUTLAST_ALLOWED_CALLBACK_NETWORKS"):
        UrlGuard.from_config(Config(allowed_callback_networks="10.0.0.0/33"))
    with pytest.raises(SystemExit, match="OUTLAST_CALLBACK_PORTS"):
        UrlGuard.from_config(Config(callback_ports="443,70000"))


async def test_hostile_callback_urls_get_422_naming_callback_url_and_touch_nothing(
    hooks: Hooks, canaries: list[Receiver], receiver: Receiver
) -> None:
    hooks.dns.table.update(DNS)
    for url in hostile(canaries[0].port, receiver.port):
        body = {"type": "square_sum", "input": {"data": [1]}, "callback_url": url}
        response = await hooks.client.post("/v1/jobs", json=body)
        assert response.status_code == 422, (url, response.text)
        problem = response.json()
        assert problem["type"] == "/problems/validation-error"
        assert problem["errors"][0]["loc"] == "$.callback_url" and "callback_url refused" in problem["detail"]
    assert [c.connections for c in canaries] == [0, 0, 0, 0] and receiver.connections == 0
    assert await hooks.deps.db.fetch_val("SELECT count(*) FROM jobs") == 0


async def test_a_refusal_tells_the_caller_not_how_the_web_resolves_the_name(
    hooks: Hooks, caplog: pytest.LogCaptureFixture
) -> None:
    """ "… resolves to 10.x, which is private" mapped the deployment's private network for anyone who asked."""
    hooks.dns.table["internal.example.com"] = ["10.1.2.3"]
    body = {"type": "square_sum", "input": {"data": [1]}, "callback_url": "https://internal.example.com/"}
    with caplog.at_level("INFO", logger="outlast.web"):
        response = await hooks.client.post("/v1/jobs", json=body)
    assert response.status_code == 422
    assert "10.1.2.3" not in response.text and "private" not in response.text
    assert response.json()["detail"] == (
        "callback_url refused: internal.example.com resolves to an address that is not allowed"
    )
    assert "internal.example.com resolves to 10.1.2.3, which is private" in caplog.text


async def test_a_batch_checks_each_callback_url_once_and_names_the_first_item_refused(
    hooks: Hooks, receiver: Receiver
) -> None:
    hooks.dns.table.update({"hooks.example.com": ["127.0.0.1"], "internal.example.com": ["10.1.2.3"]})
    allowed, refused = f"http://hooks.example.com:{receiver.port}/", "https://internal.example.com/"
    jobs = [{"type": "square_sum", "input": {"data": [n]}, "callback_url": allowed} for n in range(40)]
    answer = await hooks.client.post("/v1/jobs/batch", json={"jobs": jobs})
    assert answer.status_code == 202, answer.text
    assert hooks.dns.lookups == ["hooks.example.com"]
    jobs[7]["callback_url"] = jobs[30]["callback_url"] = refused
    answer = await hooks.client.post("/v1/jobs/batch", json={"jobs": jobs})
    assert answer.status_code == 422 and answer.json()["errors"][0]["loc"] == "$.jobs[7].callback_url"
    assert await hooks.deps.db.fetch_val("SELECT count(*) FROM jobs") == 40


async def test_an_allowed_callback_url_is_accepted_and_shown_on_the_job(hooks: Hooks, receiver: Receiver) -> None:
    job_id = await hooks.submit("square_sum", {"data": [1]}, callback_url=receiver.url)
    job = (await hooks.client.get(f"/v1/jobs/{job_id}")).json()
    assert job["callback_url"] == receiver.url


async def test_hostile_urls_already_stored_are_refused_at_delivery_and_no_canary_hears_a_thing(
    hooks: Hooks, canaries: list[Receiver], receiver: Receiver
) -> None:
    """As if they had slipped past submit (an older version, a changed allowance): the delivery checks again.
    Only URLs that would land on loopback if the guard failed: nothing here may leave the machine."""
    port = canaries[0].port
    hooks.dns.table.update(DNS, **{"mixed.example.com": ["127.0.0.1", "127.0.0.4"]})  # one allowed, one not
    urls = [
        f"http://127.0.0.2:{port}/",
        f"http://[::ffff:127.0.0.3]:{port}/",
        f"http://2130706434:{port}/",
        f"http://0x7f000003:{port}/",
        f"http://0177.0.0.4:{port}/",
        f"http://127.5:{port}/",
        f"gopher://127.0.0.2:{port}/_SET",
        f"http://user:pass@127.0.0.1:{receiver.port}/",
        f"http://hooks.example.com@127.0.0.2:{port}/",
        f"http://localhost:{port}/",
        f"http://loopback.example.com:{port}/",
        f"http://mixed.example.com:{receiver.port}/",
        f"http://mapped.example.com:{port}/",
    ]
    for url in urls:
        row = await engine.insert_job(
            hooks.deps.db,
            store.NewJob(
                id=uuid7(),
                tenant="default",
                type="square_sum",
                input=b'{"data": [1]}',
                max_attempts=1,
                timeout_s=60,
                retry_safe=True,
                callback_url=url,
                metadata=b"{}",
                ttl_s=3600,
            ),
        )
        await hooks.deps.db.execute(
            "UPDATE jobs SET status = 'cancelled', finished_at = now() WHERE id = :id", {"id": row and row.id}
        )
    while await hooks.deliver():
        pass
    attempts = await hooks.deps.db.fetch_all(
        "SELECT d.url, d.status, a.error FROM webhook_deliveries d JOIN webhook_attempts a ON a.delivery_id = d.id"
    )
    assert sorted(a["url"] for a in attempts) == sorted(urls)  # one attempt each
    for attempt in attempts:
        assert attempt["error"].startswith("refused: "), attempt
        # refused for its text: given up at once; refused for a DNS answer: tried again later
        assert attempt["status"] == (
            "pending" if "example.com:" in attempt["url"] or "localhost" in attempt["url"] else "failed"
        )
    assert [c.connections for c in canaries] == [0, 0, 0, 0] and receiver.connections == 0
