"""``/health`` and ``/metrics`` over HTTP, for uptime checks and Prometheus. Off unless HEALTH_PORT is set.

The bot keeps one :class:`Metrics`, feeds it every council event, and starts the server with
:func:`start_monitoring`::

    metrics = Metrics()
    server = await start_monitoring(settings, metrics, health=bot.health_report)   # None when off
    ...
    with metrics.council() as council:          # one round: counted, in flight while inside
        async for event in engine.run(question):
            council.observe(event)
    ...
    await stop_monitoring(server)

``GET /health`` answers ``{"status": "ok" | "degraded" | "down", "reasons": [...], ...}`` with 200
(ok, degraded) or 503 (down). ``GET /metrics`` is the Prometheus text format, from a registry of
this :class:`Metrics` alone (never the process-global one), so several bots or tests in one
process do not clash. The server binds ``HEALTH_HOST`` (127.0.0.1 unless told otherwise): the
figures name backends and models, which is not for the open internet. Nothing here imports
``discord``.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Awaitable, Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from bot.config import ConfigError, Settings
from bot.events import (
    CouncilFinished,
    CouncilResult,
    Event,
    FighterAnswer,
    FighterFailed,
    FighterFinished,
    SynthesisFailed,
    SynthesisFinished,
)

log = logging.getLogger(__name__)

HEALTH_TIMEOUT_S = 10.0
# LLM answers take seconds to minutes; first tokens from a tenth of a second (loaded model) up.
LATENCY_BUCKETS = (0.5, 1, 2, 5, 10, 20, 30, 60, 120, 300, float("inf"))
FIRST_TOKEN_BUCKETS = (0.1, 0.25, 0.5, 1, 2, 5, 10, 30, 60, 120, float("inf"))
SYNTHESIS_LABEL = "synthesis"  # the "fighter" label of the synthesizer's figures

OUTCOMES = ("ok", "partial", "failed", "interrupted")
STATUS_CODES = {"ok": 200, "degraded": 200, "down": 503}


def council_outcome(result: CouncilResult) -> str:
    """ok: every fighter answered and SHENRON synthesised; partial: a synthesis without everyone; failed: none."""
    if not result.synthesis.ok:
        return "failed"
    return "ok" if all(a.ok for a in result.answers) else "partial"


class Metrics:
    """Prometheus figures for one bot. Feed it events; it never raises into the caller."""

    def __init__(self, registry: CollectorRegistry | None = None, namespace: str = "shenron") -> None:
        self.registry = registry if registry is not None else CollectorRegistry(auto_describe=True)
        r, ns = self.registry, namespace
        self.councils_started = Counter("councils_started", "Council rounds started", namespace=ns, registry=r)
        self.councils = Counter(
            "councils",
            "Council rounds finished, by outcome (ok, partial, failed, interrupted)",
            ["outcome"],
            namespace=ns,
            registry=r,
        )
        self.council_wall = Histogram(
            "council_wall_seconds",
            "Wall time of a finished council round",
            namespace=ns,
            registry=r,
            buckets=LATENCY_BUCKETS,
        )
        self.in_flight = Gauge("councils_in_flight", "Council rounds running now", namespace=ns, registry=r)
        self.queue_length = Gauge("council_queue_length", "Council rounds waiting for a seat", namespace=ns, registry=r)
        self.fighter_latency = Histogram(
            "fighter_latency_seconds",
            "From a fighter's request to its last token, answered fighters only",
            ["fighter", "backend"],
            namespace=ns,
            registry=r,
            buckets=LATENCY_BUCKETS,
        )
        self.first_token = Histogram(
            "fighter_first_token_seconds",
            "From a fighter's request to its first token (queueing and loading count)",
            ["fighter", "backend"],
            namespace=ns,
            registry=r,
            buckets=FIRST_TOKEN_BUCKETS,
        )
        self.tokens = Counter(
            "tokens",
            'Completion tokens generated (fighter="synthesis" for the synthesizer)',
            ["fighter", "backend"],
            namespace=ns,
            registry=r,
        )
        self.answers = Counter(
            "fighter_answers",
            "Fighter results, by outcome (ok, error)",
            ["fighter", "backend", "outcome"],
            namespace=ns,
            registry=r,
        )
        self.errors = Counter(
            "errors",
            "Failures by cause: a fighter's error_kind (connect, timeout, http_401, "
            "model_not_found, …) or synthesis_failed",
            ["fighter", "backend", "kind"],
            namespace=ns,
            registry=r,
        )
        self.kb_queries = Counter(
            "kb_queries", "Knowledge-base searches, by outcome (ok, error)", ["outcome"], namespace=ns, registry=r
        )
        self.kb_passages = Counter("kb_passages", "Passages the knowledge base returned", namespace=ns, registry=r)
        self.backend_parallel = Gauge(
            "backend_parallel_requests",
            "Requests the backend was measured to run at once (0: not measured)",
            ["backend"],
            namespace=ns,
            registry=r,
        )
        for outcome in OUTCOMES:  # present from the start, so rate() works on the first round
            self.councils.labels(outcome)
        for outcome in ("ok", "error"):
            self.kb_queries.labels(outcome)

    # -- councils ---------------------------------------------------------------------------

    def council_started(self) -> None:
        self.councils_started.inc()
        self.in_flight.inc()

    def council_ended(self, *, interrupted: bool = False) -> None:
        """A round left the bot. Pass ``interrupted=True`` for one that ended without CouncilFinished."""
        self.in_flight.dec()
        if interrupted:
            self.councils.labels("interrupted").inc()

    @contextmanager
    def council(self) -> Iterator[CouncilTracker]:
        """One round: started on entry, in flight while inside; no CouncilFinished seen means interrupted."""
        tracker = CouncilTracker(self)
        self.council_started()
        try:
            yield tracker
        finally:
            self.council_ended(interrupted=not tracker.finished)

    def set_queue_length(self, n: int) -> None:
        self.queue_length.set(max(n, 0))

    def queue_length_from(self, read: Callable[[], float]) -> None:
        """Read the queue length at every scrape instead (e.g. ``lambda: bot.queue.queued``)."""
        self.queue_length.set_function(read)

    # -- events -----------------------------------------------------------------------------

    def observe(self, event: Event) -> None:
        """Count one council event. Feed every event; the ones without figures are ignored."""
        try:
            match event:
                case FighterFinished(answer=a) | FighterFailed(answer=a):
                    self._answer(a)
                case SynthesisFinished(result=s):
                    self.tokens.labels(SYNTHESIS_LABEL, s.backend).inc(max(s.tokens, 0))
                case SynthesisFailed(result=s, will_retry=retry):
                    self.tokens.labels(SYNTHESIS_LABEL, s.backend or "none").inc(max(s.tokens, 0))
                    if not retry:
                        self.errors.labels(SYNTHESIS_LABEL, s.backend or "none", "synthesis_failed").inc()
                case CouncilFinished(result=result):
                    self.councils.labels(council_outcome(result)).inc()
                    self.council_wall.observe(max(result.stats.wall_s, 0.0))
                case _:
                    pass
        except Exception:  # figures must never break a council
            log.exception("could not record metrics for %s", type(event).__name__)

    def _answer(self, a: FighterAnswer) -> None:
        labels = (a.fighter, a.backend)
        self.tokens.labels(*labels).inc(max(a.tokens, 0))
        if a.first_token_s is not None:
            self.first_token.labels(*labels).observe(max(a.first_token_s - a.started_at, 0.0))
        if a.ok:
            self.answers.labels(*labels, "ok").inc()
            self.fighter_latency.labels(*labels).observe(max(a.elapsed_s - a.started_at, 0.0))
        else:
            self.answers.labels(*labels, "error").inc()
            self.errors.labels(*labels, a.error_kind or "error").inc()

    # -- knowledge base and backends --------------------------------------------------------

    def kb_query(self, *, ok: bool = True, passages: int = 0) -> None:
        """One knowledge-base search (ok=False when it raised)."""
        self.kb_queries.labels("ok" if ok else "error").inc()
        if passages > 0:
            self.kb_passages.inc(passages)

    def set_parallelism(self, backend: str, at_once: int | None) -> None:
        """What ``bot.parallelism`` measured for a backend (None: could not be measured)."""
        self.backend_parallel.labels(backend).set(at_once or 0)

    def exposition(self) -> bytes:
        """The Prometheus text format of this registry."""
        return generate_latest(self.registry)


class CouncilTracker:
    """What :meth:`Metrics.council` yields: observes events and remembers whether the round finished."""

    def __init__(self, metrics: Metrics) -> None:
        self.metrics = metrics
        self.finished = False

    def observe(self, event: Event) -> None:
        if isinstance(event, CouncilFinished):
            self.finished = True
        self.metrics.observe(event)


# --- /health -----------------------------------------------------------------------------------


def summarise_health(
    *,
    backends: Iterable[Any] = (),
    discord_connected: bool | None = None,
    kb_error: str | None = None,
    extra: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """A /health document from what the bot knows.

    ``backends`` are ``bot.health.BackendHealth``-like (``name``, ``reachable``, ``missing``,
    ``error``; read by attribute). down: Discord disconnected, or no backend reachable. degraded:
    some backend unreachable, roster models missing, or the knowledge base failing.
    """
    reasons: list[str] = []
    down = False
    items = list(backends)
    reachable = [b for b in items if getattr(b, "reachable", False)]
    if discord_connected is False:
        down = True
        reasons.append("not connected to Discord")
    if items and not reachable:
        down = True
        reasons.append("no backend is reachable")
    for b in items:
        name = getattr(b, "name", "?")
        if not getattr(b, "reachable", False):
            reasons.append(f"backend {name} unreachable: {getattr(b, 'error', '') or 'no answer'}")
        elif getattr(b, "missing", ()):
            reasons.append(f"backend {name} does not serve the model of {', '.join(b.missing)}")
    if kb_error:
        reasons.append(f"knowledge base: {kb_error}")
    status = "down" if down else "degraded" if reasons else "ok"
    doc: dict[str, Any] = {
        "status": status,
        "reasons": reasons,
        "backends": [
            {
                "name": getattr(b, "name", "?"),
                "reachable": bool(getattr(b, "reachable", False)),
                "latency_s": getattr(b, "latency_s", None),
                "missing": list(getattr(b, "missing", ())),
            }
            for b in items
        ],
    }
    if extra:
        doc.update(extra)
    return doc


# --- the server --------------------------------------------------------------------------------


@dataclass
class MonitoringServer:
    """The running /health and /metrics server."""

    runner: web.AppRunner
    host: str
    port: int
    stopped: bool = False

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}"

    async def stop(self) -> None:
        if not self.stopped:
            self.stopped = True
            await self.runner.cleanup()


def make_app(metrics: Metrics, health: Callable[[], Awaitable[dict[str, Any]]]) -> web.Application:
    async def get_health(request: web.Request) -> web.Response:
        try:
            async with asyncio.timeout(HEALTH_TIMEOUT_S):
                doc = dict(await health())
        except TimeoutError:
            doc = {"status": "down", "reasons": [f"the health check did not finish within {HEALTH_TIMEOUT_S:g} s"]}
        except Exception as exc:
            log.exception("health check failed")
            doc = {"status": "down", "reasons": [f"the health check failed ({exc.__class__.__name__})"]}
        status = doc.get("status")
        if status not in STATUS_CODES:
            doc["reasons"] = [*doc.get("reasons", []), f"unknown status {status!r}"]
            doc["status"] = status = "down"
        doc.setdefault("reasons", [])
        return web.json_response(doc, status=STATUS_CODES[status], dumps=lambda d: json.dumps(d, default=str))

    async def get_metrics(request: web.Request) -> web.Response:
        return web.Response(body=metrics.exposition(), headers={"Content-Type": CONTENT_TYPE_LATEST})

    async def index(request: web.Request) -> web.Response:
        return web.Response(text="SHENRON: /health, /metrics\n")

    app = web.Application()
    app.router.add_get("/health", get_health)
    app.router.add_get("/metrics", get_metrics)
    app.router.add_get("/", index)
    return app


async def start_monitoring(
    settings: Settings, metrics: Metrics, health: Callable[[], Awaitable[dict[str, Any]]]
) -> MonitoringServer | None:
    """Serve /health and /metrics on HEALTH_HOST:HEALTH_PORT; None (and nothing started) when HEALTH_PORT is unset.

    Port 0 picks a free port (tests); the server's ``port`` says which.
    """
    if settings.health_port is None:
        return None
    runner = web.AppRunner(make_app(metrics, health), access_log=None, shutdown_timeout=1.0)
    await runner.setup()
    site = web.TCPSite(runner, settings.health_host, settings.health_port)
    try:
        await site.start()
    except OSError as exc:
        await runner.cleanup()
        raise ConfigError(
            ".env",
            "HEALTH_PORT",
            f"cannot listen on {settings.health_host}:{settings.health_port} ({exc.strerror or exc})",
            "choose a free port (and a HEALTH_HOST this machine has), or remove HEALTH_PORT to turn monitoring off",
        ) from None
    port = runner.addresses[0][1] if runner.addresses else settings.health_port
    log.info("monitoring on http://%s:%s (/health, /metrics)", settings.health_host, port)
    return MonitoringServer(runner, settings.health_host, port)


async def stop_monitoring(server: MonitoringServer | None) -> None:
    """Stop the server (safe with None and twice)."""
    if server is not None:
        await server.stop()
