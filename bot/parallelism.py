"""How many requests does a backend really run at once? Measured, not assumed.

A council is fast only when the server generates the fighters' answers side by side. Many servers
queue instead (Ollama's ``OLLAMA_NUM_PARALLEL=1``; LM Studio swapping JIT-loaded models), and
from the outside that looks like a slow council. :func:`probe_parallelism` sends ``n`` short
streaming requests at once and times each one's generation (first token → last token):

- **overlap**: the intervals' total length ÷ the length of their union (``bot.council.overlap``,
  the figure every council round reports): ≈ n side by side, ≈ 1 one after another;
- **peak**: the most intervals covering one instant for a stretch that is not jitter;
- **stagger**: how far apart the first tokens came, and how many requests got their first token
  only after another had finished (they waited in the server's queue).

When the fighters on one backend use different models, one more round interleaves the models, so
a server that swaps models in and out shows up as well. The verdict names the setting to change
and says whether ``max_concurrency`` in council.toml matches what was measured.

The probe goes around the client's own ``max_concurrency`` limit (it measures the server, not us)
and costs about ``n × max_tokens`` generated tokens per model. Nothing here imports ``discord``.
"""

from __future__ import annotations

import asyncio
import itertools
import statistics
import time
from collections.abc import Sequence
from contextlib import aclosing
from dataclasses import dataclass, replace
from typing import Any
from urllib.parse import urlsplit

from bot.config import CouncilConfig
from bot.council import overlap
from bot.llm import LLMClient, LLMError

# A prompt that keeps any model generating until max_tokens, with short, even tokens.
PROBE_MESSAGES = ({"role": "user", "content": "Count from 1 to 200, one number per line. Write nothing else."},)
WARMUP_MAX_TOKENS = 4
# Overlap shorter than this share of the median generation is scheduling jitter, not parallelism.
JITTER_SHARE = 0.3
# In the mixed-model round, first tokens this many times later than with one model mean model loading.
SWAP_SLOWDOWN = 3.0
SWAP_MIN_DELAY_S = 1.0
MAX_PROBE_REQUESTS = 8
# Generations shorter than this cannot be timed reliably: the probe retries with RETRY_MAX_TOKENS.
MIN_GENERATION_S = 0.05
RETRY_MAX_TOKENS = 128
MIXED = "mixed models"  # the label of the round that interleaves the models

# Where each server keeps its parallelism setting, recognised by its default port.
SERVERS_BY_PORT = {11434: "ollama", 1234: "lmstudio", 8080: "llama.cpp", 8000: "vllm"}
SERVER_NAMES = {
    "ollama": "Ollama",
    "lmstudio": "LM Studio",
    "llama.cpp": "llama.cpp llama-server",
    "vllm": "vLLM",
    "unknown": "the server",
}


@dataclass(frozen=True, slots=True)
class Sample:
    """One probe request. Times are seconds since its round sent its requests."""

    model: str
    first_token_s: float | None = None
    last_token_s: float | None = None
    pieces: int = 0  # streamed chunks with text (tokens, on most servers)
    error: str = ""
    error_kind: str = ""

    @property
    def ok(self) -> bool:
        return not self.error and self.first_token_s is not None

    @property
    def interval(self) -> tuple[float, float] | None:
        if not self.ok or self.last_token_s is None:
            return None
        return (self.first_token_s or 0.0, self.last_token_s)


@dataclass(frozen=True, slots=True)
class ProbeRound:
    """``n`` requests sent at once, and what their timing says."""

    label: str  # the model, or MIXED for the round that interleaves models
    models: tuple[str, ...]
    samples: tuple[Sample, ...]
    wall_s: float
    overlap: float  # 0.0 when nothing could be timed
    peak: int  # most generations at one instant (jitter ignored); 0 when nothing could be timed
    at_once: int | None  # the verdict for this round; None when it could not be measured
    first_token_spread_s: float | None  # last first token − first first token
    waited: int  # requests whose first token came after another request had finished

    @property
    def ok_samples(self) -> list[Sample]:
        return [s for s in self.samples if s.ok]

    @property
    def errors(self) -> list[Sample]:
        return [s for s in self.samples if s.error]

    def median_first_token_s(self) -> float | None:
        firsts = [s.first_token_s for s in self.ok_samples if s.first_token_s is not None]
        return statistics.median(firsts) if firsts else None


@dataclass(frozen=True, slots=True)
class ParallelismReport:
    """What one backend does with concurrent requests, and what to change."""

    backend: str
    base_url: str
    requested: int  # requests sent at once per round
    max_concurrency: int  # what council.toml allows SHENRON to send this backend
    server: str  # "ollama", "lmstudio", "llama.cpp", "vllm" or "unknown" (guessed from the port)
    rounds: tuple[ProbeRound, ...] = ()
    at_once: int | None = None  # measured; None when it could not be measured
    overlap: float = 0.0  # the single-model rounds' lowest overlap
    first_token_spread_s: float | None = None
    waited: int = 0
    matches_config: bool | None = None  # max_concurrency agrees with the measurement
    swaps_models: bool | None = None  # None when the fighters here share one model
    status: str = "ok"  # "ok", "warn" or "error"
    verdict: str = ""  # "serves 4 at once", "serves one at a time", "could not measure …"
    findings: tuple[str, ...] = ()  # what was measured, one sentence each
    advice: tuple[str, ...] = ()  # what to change, one sentence each
    error: str = ""  # why nothing could be measured

    @property
    def headline(self) -> str:
        """One line for /health and logs: ``serves 4 at once (overlap 3.9×)``."""
        if self.at_once is None:
            return self.verdict
        return f"{self.verdict} (overlap {self.overlap:.1f}×)"

    def to_dict(self) -> dict[str, Any]:
        def round_dict(r: ProbeRound) -> dict[str, Any]:
            return {
                "label": r.label,
                "models": list(r.models),
                "wall_s": round(r.wall_s, 3),
                "overlap": round(r.overlap, 2),
                "peak": r.peak,
                "at_once": r.at_once,
                "first_token_spread_s": None if r.first_token_spread_s is None else round(r.first_token_spread_s, 3),
                "waited": r.waited,
                "requests": [
                    {
                        "model": s.model,
                        "first_token_s": _r3(s.first_token_s),
                        "last_token_s": _r3(s.last_token_s),
                        "pieces": s.pieces,
                        "error": s.error,
                        "error_kind": s.error_kind,
                    }
                    for s in r.samples
                ],
            }

        return {
            "backend": self.backend,
            "base_url": self.base_url,
            "server": self.server,
            "requested": self.requested,
            "max_concurrency": self.max_concurrency,
            "at_once": self.at_once,
            "overlap": round(self.overlap, 2),
            "first_token_spread_s": _r3(self.first_token_spread_s),
            "waited": self.waited,
            "matches_config": self.matches_config,
            "swaps_models": self.swaps_models,
            "status": self.status,
            "verdict": self.verdict,
            "findings": list(self.findings),
            "advice": list(self.advice),
            "error": self.error,
            "rounds": [round_dict(r) for r in self.rounds],
        }


def _r3(x: float | None) -> float | None:
    return None if x is None else round(x, 3)


# --- analysis (pure) ---------------------------------------------------------------------------


def peak_concurrency(intervals: Sequence[tuple[float, float]], min_span: float = 0.0) -> int:
    """The most intervals that cover one stretch of time at least ``min_span`` long.

    ``min_span`` keeps a hand-over (one request's last token and the next one's first token
    read in the same instant) from counting as two at once.
    """
    spans = [(a, b) for a, b in intervals if b > a]
    if not spans:
        return 0
    points = sorted({t for span in spans for t in span})
    segments = [(lo, hi, sum(1 for a, b in spans if a <= lo and b >= hi)) for lo, hi in itertools.pairwise(points)]
    for level in range(len(spans), 0, -1):
        run = 0.0
        for lo, hi, cover in segments:
            run = run + (hi - lo) if cover >= level else 0.0
            if run >= min_span and run > 0:
                return level
    return 1


def analyse_round(label: str, models: Sequence[str], samples: Sequence[Sample], wall_s: float) -> ProbeRound:
    """Overlap, peak, stagger and the round's verdict from its samples."""
    intervals = [iv for s in samples if (iv := s.interval) is not None]
    lengths = [b - a for a, b in intervals if b > a]
    ov = overlap(intervals)
    jitter = JITTER_SHARE * statistics.median(lengths) if lengths else 0.0
    if len(lengths) >= 2:
        peak = peak_concurrency(intervals, jitter)
        at_once: int | None = min(max(peak, round(ov), 1), len(lengths))
    else:
        peak = 1 if lengths else 0
        at_once = None  # one timed generation says nothing about parallelism
    ok = [s for s in samples if s.ok]
    firsts = [s.first_token_s for s in ok if s.first_token_s is not None]
    spread = max(firsts) - min(firsts) if len(firsts) >= 2 else None
    waited = sum(
        1
        for s in ok
        if any(
            o is not s
            and o.last_token_s is not None
            and s.first_token_s is not None
            and s.first_token_s > o.last_token_s - jitter
            for o in ok
        )
    )
    return ProbeRound(
        label=label,
        models=tuple(models),
        samples=tuple(samples),
        wall_s=wall_s,
        overlap=ov,
        peak=peak,
        at_once=at_once,
        first_token_spread_s=spread,
        waited=waited,
    )


def guess_server(base_url: str) -> str:
    """Which server software listens there, from its default port ("unknown" otherwise)."""
    try:
        port = urlsplit(base_url).port
    except ValueError:
        return "unknown"
    return SERVERS_BY_PORT.get(port or 0, "unknown")


def _parallel_setting(server: str, want: int) -> str:
    """The sentence that says where to raise the server's parallelism."""
    want = max(want, 2)
    per_server = {
        "ollama": (
            f"Ollama runs one request per model at a time unless told otherwise: set OLLAMA_NUM_PARALLEL={want} "
            "in the Ollama server's environment (systemd: Environment=\"OLLAMA_NUM_PARALLEL="
            f'{want}"; shell: OLLAMA_NUM_PARALLEL={want} ollama serve) and restart it'
        ),
        "lmstudio": (
            f'LM Studio: raise "Max Concurrent Predictions" to {want} in the model\'s load settings '
            "(llama.cpp engine; 4 by default) and reload the model"
        ),
        "llama.cpp": (
            f"llama-server: start it with --parallel {want} (-np {want}) and a --ctx-size large enough "
            f"for {want} conversations (the slots share the context)"
        ),
        "vllm": (
            "vLLM batches requests by itself: something in front of it (a proxy, --max-num-seqs 1) is serialising them"
        ),
    }
    if server in per_server:
        return per_server[server]
    return (
        f"raise the server's parallelism to {want} (Ollama: OLLAMA_NUM_PARALLEL={want} in its environment; "
        f'LM Studio: "Max Concurrent Predictions" in the model\'s load settings; llama.cpp: llama-server '
        f"--parallel {want}; vLLM batches by itself, so look for a proxy in front of it)"
    )


def _swap_setting(server: str, models: int) -> str:
    per_server = {
        "lmstudio": (
            "LM Studio keeps one JIT-loaded model and evicts it when another is asked for: turn off "
            '"Auto-evict" for JIT-loaded models (Developer → Server settings) and load every '
            "fighter's model up front (`lms load MODEL`), or give the fighters one model"
        ),
        "ollama": (
            f"Ollama is swapping models: set OLLAMA_MAX_LOADED_MODELS={models} (memory permitting) "
            "or give the fighters one model"
        ),
    }
    return per_server.get(
        server,
        (
            "the server swaps models in and out: keep all the fighters' models loaded at once (LM Studio: turn off "
            f"JIT auto-evict; Ollama: OLLAMA_MAX_LOADED_MODELS={models}) or give the fighters one model"
        ),
    )


def judge(
    backend: str,
    base_url: str,
    rounds: Sequence[ProbeRound],
    *,
    requested: int,
    max_concurrency: int,
    users: int | None = None,
    server: str | None = None,
    config_file: str = "council.toml",
) -> ParallelismReport:
    """The verdict and advice from measured rounds (pure: tests feed it synthetic samples)."""
    server = server or guess_server(base_url)
    who = SERVER_NAMES.get(server, "the server")
    base = ParallelismReport(
        backend=backend,
        base_url=base_url,
        requested=requested,
        max_concurrency=max_concurrency,
        server=server,
        rounds=tuple(rounds),
    )
    singles = [r for r in rounds if r.label != MIXED]
    mixed = next((r for r in rounds if r.label == MIXED), None)
    measured = [r for r in singles if r.at_once is not None]
    if not measured:
        errors = [s for r in rounds for s in r.errors]
        if errors:
            return replace(
                base, status="error", verdict="could not measure: the probe requests failed", error=errors[0].error
            )
        return replace(
            base,
            status="warn",
            verdict="could not measure: each reply arrived in one piece, too fast to time",
            findings=(
                "streamed replies carried no timing (a server that does not stream, or "
                "replies shorter than two chunks)",
            ),
        )
    weakest = min(measured, key=lambda r: (r.at_once or 0, r.overlap))
    at_once = weakest.at_once or 1
    saturated = at_once >= requested
    verdict = "serves one at a time" if at_once == 1 else f"serves {at_once} at once"
    findings: list[str] = []
    advice: list[str] = []
    warn = False

    timed = len(weakest.ok_samples)
    spread = weakest.first_token_spread_s
    parts = [f"{requested} requests sent together: overlap {weakest.overlap:.1f}×"]
    if spread is not None:
        parts.append(f"first tokens spread over {spread:.2f} s")
    if weakest.waited:
        parts.append(f"{weakest.waited} of {timed} waited for another to finish")
    findings.append(", ".join(parts))
    if len(measured) > 1 and len({r.at_once for r in measured}) > 1:
        findings.append("per model: " + ", ".join(f"{r.label} {r.at_once} at once" for r in measured))

    where = f"[backends.{backend}] ({config_file})"
    want = max_concurrency if max_concurrency > 1 else max(users or 4, 2)
    matches = min(max_concurrency, requested) == at_once
    if at_once < min(max_concurrency, requested):
        warn = True
        advice.append(
            f"{_parallel_setting(server, want)}, or set max_concurrency = {at_once} in {where}, so "
            f"requests wait in SHENRON's queue instead of the server's (where first_token_timeout_s "
            f"is ticking)"
        )
    elif at_once > max_concurrency:
        warn = True
        more = f"at least {at_once}" if saturated else str(at_once)
        advice.append(
            f"set max_concurrency = {at_once} in {where}: {who} runs {more} at once and SHENRON "
            f"sends only {max_concurrency}"
        )
    elif at_once == 1 and (users is None or users > 1):
        warn = True
        advice.append(
            f"the fighters' answers will come back one after another: {_parallel_setting(server, want)}, "
            f"then raise max_concurrency in {where} to match"
        )

    swaps: bool | None = None
    errors = [s for r in rounds for s in r.errors]
    if mixed is not None:
        swaps = False
        single_first = statistics.median([t for r in measured if (t := r.median_first_token_s()) is not None] or [0.0])
        mixed_first = mixed.median_first_token_s()
        if mixed.at_once is not None and mixed.at_once < at_once:
            swaps = True
            runs = "one" if mixed.at_once == 1 else str(mixed.at_once)
            findings.append(
                f"with the fighters' {len(mixed.models)} models interleaved it runs {runs} at a time "
                f"(overlap {mixed.overlap:.1f}×)"
            )
        if mixed_first is not None and mixed_first > max(SWAP_MIN_DELAY_S, SWAP_SLOWDOWN * single_first):
            swaps = True
            findings.append(
                f"with the models interleaved the first token takes {mixed_first:.1f} s "
                f"(one model: {single_first:.1f} s): the server is loading models"
            )
        if mixed.errors and not any(r.errors for r in singles):
            swaps = True
            findings.append(
                f"{len(mixed.errors)} of {len(mixed.samples)} requests failed only when the models "
                f"were interleaved: {mixed.errors[0].error}"
            )
        if swaps:
            warn = True
            advice.append(_swap_setting(server, len(mixed.models)))
    if errors and not (mixed is not None and swaps):
        warn = True
        findings.append(f"{len(errors)} probe request(s) failed: {errors[0].error}")

    return replace(
        base,
        at_once=at_once,
        overlap=weakest.overlap,
        first_token_spread_s=spread,
        waited=weakest.waited,
        matches_config=matches,
        swaps_models=swaps,
        status="warn" if warn else "ok",
        verdict=verdict,
        findings=tuple(findings),
        advice=tuple(advice),
    )


# --- measurement -------------------------------------------------------------------------------


async def _timed_request(
    client: LLMClient, backend: str, model: str, max_tokens: int, timeout_s: float, t0: float
) -> Sample:
    first: float | None = None
    last: float | None = None
    pieces = 0
    try:
        stream = client.stream_chat(
            backend, model, PROBE_MESSAGES, temperature=0.0, max_tokens=max_tokens, timeout_s=timeout_s
        )
        async with aclosing(stream):
            async for delta in stream:
                if delta.content or delta.reasoning:  # reasoning is generation too
                    now = time.perf_counter() - t0
                    if first is None:
                        first = now
                    last = now
                    pieces += delta.pieces
    except LLMError as exc:
        return Sample(model, first, last, pieces, error=str(exc), error_kind=exc.kind)
    return Sample(model, first, last, pieces)


def _too_short(r: ProbeRound) -> bool:
    """Replies came back fine but too quickly (or in one piece) to time their overlap."""
    lengths = [iv[1] - iv[0] for s in r.ok_samples if (iv := s.interval) is not None and iv[1] > iv[0]]
    if len(r.ok_samples) < 2:
        return False
    return len(lengths) < 2 or statistics.median(lengths) < MIN_GENERATION_S


async def _round(
    client: LLMClient, backend: str, label: str, models: Sequence[str], max_tokens: int, timeout_s: float
) -> ProbeRound:
    t0 = time.perf_counter()
    samples = await asyncio.gather(*(_timed_request(client, backend, m, max_tokens, timeout_s, t0) for m in models))
    return analyse_round(label, sorted(set(models), key=list(models).index), samples, time.perf_counter() - t0)


async def probe_parallelism(
    client: LLMClient,
    backend_name: str,
    models: list[str],
    n: int = 4,
    max_tokens: int = 24,
    timeout_s: float = 60,
    *,
    users: int | None = None,
    server: str | None = None,
    warmup: bool = True,
    config_file: str = "council.toml",
) -> ParallelismReport:
    """Measure how many of ``n`` concurrent requests ``backend_name`` really generates at once.

    ``models``: the distinct models the fighters use there (each is probed; with several, one more
    round interleaves them). ``users``: how many fighters share the backend (one-at-a-time is only
    a problem when several do). ``server`` overrides the guess from the port; ``config_file`` is
    named in the advice. Never raises for a backend problem: a failed probe is a report with
    ``status="error"`` and the reason.
    """
    backend = client.backend(backend_name)
    models = list(dict.fromkeys(m for m in models if m))
    n = max(2, min(n, MAX_PROBE_REQUESTS))
    if not models:
        raise ValueError("probe_parallelism needs at least one model")
    # Our own max_concurrency would serialise the probe: measure the server, not the client.
    probe_backend = replace(
        backend, max_concurrency=max(n, len(models)) * 2, first_token_timeout_s=timeout_s, total_timeout_s=timeout_s
    )
    probe = LLMClient(client.session, {backend_name: probe_backend})
    rounds: list[ProbeRound] = []
    for model in models:
        if warmup:
            # Load the model (and open a connection) first, so loading time is not read as queueing.
            first = await _timed_request(probe, backend_name, model, WARMUP_MAX_TOKENS, timeout_s, time.perf_counter())
            if first.error:
                rounds.append(analyse_round(model, [model], [first], 0.0))
                continue
        measured = await _round(probe, backend_name, model, [model] * n, max_tokens, timeout_s)
        if _too_short(measured) and max_tokens < RETRY_MAX_TOKENS:
            # A fast server finished before its tokens could be told apart: once more, longer.
            max_tokens = RETRY_MAX_TOKENS
            measured = await _round(probe, backend_name, model, [model] * n, max_tokens, timeout_s)
        rounds.append(measured)
    if len(models) > 1 and any(r.at_once is not None for r in rounds):
        mixed = [models[i % len(models)] for i in range(max(n, len(models)))]
        rounds.append(await _round(probe, backend_name, MIXED, mixed, max_tokens, timeout_s))
    return judge(
        backend_name,
        backend.base_url,
        rounds,
        requested=n,
        max_concurrency=backend.max_concurrency,
        users=users,
        server=server,
        config_file=config_file,
    )


@dataclass(frozen=True, slots=True)
class BackendPlan:
    """What to probe on one backend: the fighters' models and how many fighters share it."""

    backend: str
    models: tuple[str, ...]
    users: int
    requests: int


def plan_probes(council: CouncilConfig) -> list[BackendPlan]:
    """One plan per backend that anyone on the roster uses, in the roster file's order."""
    plans = []
    for name, backend in council.backends.items():
        fighters = [f for f in council.fighters if f.backend == name]
        models = [f.model for f in fighters]
        s = council.synthesizer
        if not models and s.backend == name:
            models = [s.model]
        if not models and (s.fallback_backend or s.backend) == name and s.fallback_model:
            models = [s.fallback_model]
        if not models:
            continue
        requests = min(max(4, backend.max_concurrency, len(fighters)), MAX_PROBE_REQUESTS)
        plans.append(BackendPlan(name, tuple(dict.fromkeys(models)), max(len(fighters), 1), requests))
    return plans


async def probe_council(
    client: LLMClient, council: CouncilConfig, *, max_tokens: int = 24, timeout_s: float = 60
) -> dict[str, ParallelismReport]:
    """Every backend the roster uses, one after another (several may be one server: LLM_BASE_URL)."""
    reports = {}
    for plan in plan_probes(council):
        reports[plan.backend] = await probe_parallelism(
            client,
            plan.backend,
            list(plan.models),
            plan.requests,
            max_tokens,
            timeout_s,
            users=plan.users,
            config_file=council.source,
        )
    return reports
