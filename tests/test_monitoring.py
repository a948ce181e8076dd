"""/health and /metrics: a real council's events counted, scraped over HTTP and parsed as Prometheus reads them."""

from __future__ import annotations

import socket
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import aiohttp
import pytest
import pytest_asyncio
from prometheus_client.parser import text_string_to_metric_families

from bot.config import ConfigError, Settings
from bot.council import CouncilEngine
from bot.events import FighterStarted
from bot.llm import LLMClient, make_session
from bot.monitoring import Metrics, MonitoringServer, start_monitoring, stop_monitoring, summarise_health
from tests.factories import make_council
from tests.fakeserver import FakeLLM, Script

HealthFn = Callable[[], Awaitable[dict[str, Any]]]


async def healthy() -> dict[str, Any]:
    return {"status": "ok", "reasons": []}


@pytest_asyncio.fixture
async def serve() -> AsyncIterator[Callable[..., Awaitable[MonitoringServer]]]:
    """Starts monitoring servers on free ports; stops them after the test."""
    servers: list[MonitoringServer] = []

    async def start(metrics: Metrics, health: HealthFn = healthy) -> MonitoringServer:
        server = await start_monitoring(Settings(health_port=0), metrics, health)
        assert server is not None
        servers.append(server)
        return server

    yield start
    for server in servers:
        await stop_monitoring(server)


async def scrape(server: MonitoringServer) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Every sample of /metrics, keyed by (sample name, sorted labels)."""
    async with aiohttp.ClientSession() as session, session.get(f"{server.url}/metrics") as resp:
        assert resp.status == 200
        assert resp.headers["Content-Type"].startswith("text/plain; version=")
        text = await resp.text()
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


async def get_health(server: MonitoringServer) -> tuple[int, dict[str, Any]]:
    async with aiohttp.ClientSession() as session, session.get(f"{server.url}/health") as resp:
        return resp.status, await resp.json()


def labels(**kw: str) -> tuple[tuple[str, str], ...]:
    return tuple(sorted(kw.items()))


async def test_a_real_council_is_counted_and_scraped(serve) -> None:
    metrics = Metrics()
    server = await serve(metrics)
    async with FakeLLM(default=Script(text="An answer in five words.")) as fake, make_session() as session:
        fake.script("vegeta", Script(status=500, error_message="GPU on fire"))
        council = make_council(fake.url, names=("GOKU", "VEGETA", "PICCOLO"))
        engine = CouncilEngine(LLMClient(session, council.backends), council)
        with metrics.council() as round_:
            assert (await scrape(server))[("shenron_councils_in_flight", ())] == 1
            async for event in engine.run("Should I run ZFS?"):
                round_.observe(event)
    m = await scrape(server)
    assert m[("shenron_councils_started_total", ())] == 1
    assert m[("shenron_councils_total", labels(outcome="partial"))] == 1
    assert m[("shenron_councils_total", labels(outcome="ok"))] == 0
    assert m[("shenron_councils_total", labels(outcome="interrupted"))] == 0
    assert m[("shenron_councils_in_flight", ())] == 0
    assert m[("shenron_council_wall_seconds_count", ())] == 1
    for fighter in ("GOKU", "PICCOLO"):
        assert m[("shenron_fighter_latency_seconds_count", labels(fighter=fighter, backend="fake"))] == 1
        assert m[("shenron_fighter_first_token_seconds_count", labels(fighter=fighter, backend="fake"))] == 1
        assert m[("shenron_tokens_total", labels(fighter=fighter, backend="fake"))] == 5
        assert m[("shenron_fighter_answers_total", labels(fighter=fighter, backend="fake", outcome="ok"))] == 1
    assert ("shenron_fighter_latency_seconds_count", labels(fighter="VEGETA", backend="fake")) not in m
    assert m[("shenron_errors_total", labels(fighter="VEGETA", backend="fake", kind="http_500"))] == 1
    assert m[("shenron_fighter_answers_total", labels(fighter="VEGETA", backend="fake", outcome="error"))] == 1
    assert m[("shenron_tokens_total", labels(fighter="synthesis", backend="fake"))] == 5


async def test_a_round_that_never_finished_counts_as_interrupted(serve) -> None:
    metrics = Metrics()
    server = await serve(metrics)
    with pytest.raises(RuntimeError), metrics.council() as round_:
        round_.observe(FighterStarted(fighter="GOKU", model="m", at=0.0))
        raise RuntimeError("the consumer crashed")
    m = await scrape(server)
    assert m[("shenron_councils_total", labels(outcome="interrupted"))] == 1
    assert m[("shenron_councils_in_flight", ())] == 0


async def test_queue_knowledge_base_and_parallelism_gauges(serve) -> None:
    metrics = Metrics()
    server = await serve(metrics)
    metrics.set_queue_length(3)
    metrics.kb_query(passages=2)
    metrics.kb_query(ok=False)
    metrics.set_parallelism("local", 4)
    metrics.set_parallelism("ollama", None)
    metrics.council_started()
    m = await scrape(server)
    assert m[("shenron_council_queue_length", ())] == 3
    assert m[("shenron_kb_queries_total", labels(outcome="ok"))] == 1
    assert m[("shenron_kb_queries_total", labels(outcome="error"))] == 1
    assert m[("shenron_kb_passages_total", ())] == 2
    assert m[("shenron_backend_parallel_requests", labels(backend="local"))] == 4
    assert m[("shenron_backend_parallel_requests", labels(backend="ollama"))] == 0
    assert m[("shenron_councils_in_flight", ())] == 1
    metrics.council_ended()
    waiting = [1, 2]
    metrics.queue_length_from(lambda: len(waiting))
    m = await scrape(server)
    assert m[("shenron_councils_in_flight", ())] == 0 and m[("shenron_council_queue_length", ())] == 2


async def test_two_bots_in_one_process_keep_their_own_figures(serve) -> None:
    a, b = Metrics(), Metrics()
    server_a, server_b = await serve(a), await serve(b)
    a.kb_query()
    assert (await scrape(server_a))[("shenron_kb_queries_total", labels(outcome="ok"))] == 1
    assert (await scrape(server_b))[("shenron_kb_queries_total", labels(outcome="ok"))] == 0


@pytest.mark.parametrize(
    ("doc", "code", "status"),
    [
        ({"status": "ok", "reasons": []}, 200, "ok"),
        ({"status": "degraded", "reasons": ["backend x unreachable"]}, 200, "degraded"),
        ({"status": "down", "reasons": ["not connected to Discord"]}, 503, "down"),
        ({"status": "sideways"}, 503, "down"),
    ],
    ids=["ok", "degraded", "down", "unknown"],
)
async def test_health_status_codes(serve, doc: dict[str, Any], code: int, status: str) -> None:
    async def health() -> dict[str, Any]:
        return dict(doc)

    got_code, got = await get_health(await serve(Metrics(), health))
    assert (got_code, got["status"]) == (code, status)
    assert isinstance(got["reasons"], list)


async def test_a_failing_health_check_is_down(serve) -> None:
    async def health() -> dict[str, Any]:
        raise RuntimeError("boom")

    code, doc = await get_health(await serve(Metrics(), health))
    assert code == 503 and doc == {"status": "down", "reasons": ["the health check failed (RuntimeError)"]}


async def test_monitoring_is_off_without_a_port_and_binds_localhost() -> None:
    assert await start_monitoring(Settings(), Metrics(), healthy) is None
    server = await start_monitoring(Settings(health_port=0), Metrics(), healthy)
    assert server is not None and server.host == "127.0.0.1" and server.url.startswith("http://127.0.0.1:")
    await server.stop()
    await server.stop()  # twice is fine
    await stop_monitoring(None)


async def test_a_busy_port_is_a_configuration_error() -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with pytest.raises(ConfigError) as info:
            await start_monitoring(Settings(health_port=port), Metrics(), healthy)
    assert info.value.key == "HEALTH_PORT" and "remove HEALTH_PORT" in info.value.fix


@dataclass
class Probe:
    name: str
    reachable: bool
    missing: tuple[str, ...] = ()
    error: str = ""
    latency_s: float = 0.01


def test_summarise_health() -> None:
    assert summarise_health(backends=[Probe("a", True)], discord_connected=True)["status"] == "ok"
    degraded = summarise_health(
        backends=[Probe("a", True, missing=("GOKU",)), Probe("b", False, error="refused")],
        discord_connected=True,
        kb_error="Chroma is down",
    )
    assert degraded["status"] == "degraded"
    assert degraded["reasons"] == [
        "backend a does not serve the model of GOKU",
        "backend b unreachable: refused",
        "knowledge base: Chroma is down",
    ]
    down = summarise_health(backends=[Probe("b", False, error="refused")], discord_connected=True)
    assert down["status"] == "down" and "no backend is reachable" in down["reasons"]
    offline = summarise_health(backends=[Probe("a", True)], discord_connected=False, extra={"uptime_s": 5})
    assert offline["status"] == "down" and offline["uptime_s"] == 5
