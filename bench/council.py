"""Council benchmark: does the engine overlap fighters, and does one event loop hold up under load?

    uv run python bench/council.py [--quick] [--impl fast|fakellm] [--profile]

The fake server runs in a separate process (bench/fake_server_process.py), so this process's
event loop, CPU time and memory are the client's alone. Reply timings are encoded in the model
names ("f-2.0-40": first token at 0.1 s, then 40 tokens/s, last token at 2.0 s), and the critical
path of a council is the scripted duration of its slowest fighter plus the synthesis.

1. One council of 6 (fighters 1.0 … 2.0 s, synthesis 0.5 s): wall ÷ critical path, median of N.
2. The same council with sequential awaits, and with a ThreadPoolExecutor over blocking http.client.
3. 200 concurrent councils (1,200 fighter streams at 40 tokens/s, one token per SSE frame):
   wall ÷ critical path, event-loop lag p99, client CPU per 1,000 tokens, peak RSS. Three
   repetitions, each a fresh session launched cold (every connection new), then a second round
   on the pooled connections; the median cold round is the headline. 3b: 25/50/100 councils.
4. 500 councils in batches of 50, a third cancelled mid-stream (task.cancel() or aclose()):
   tasks, connections and fds before and after.

Prints a table (figure, target, PASS/FAIL) and writes bench/results/council.json. The machine may
be shared: the CPU other processes used during each load round is measured and reported, and a
load round waits (up to 8 s) for the machine to be quiet before it starts.
"""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import http.client
import io
import json
import os
import platform
import pstats
import random
import sys
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import aclosing
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

try:
    from bench import _common as common
    from bench.fake_server_process import parse_model
except ImportError:  # run as a script from bench/
    import _common as common  # type: ignore[no-redef]
    from fake_server_process import parse_model  # type: ignore[no-redef]

from bot.config import Backend, CouncilConfig, Fighter, Synthesizer  # noqa: E402
from bot.council import CouncilEngine, collect  # noqa: E402
from bot.events import CouncilFinished, CouncilResult, FighterToken  # noqa: E402
from bot.llm import Delta, LLMClient, make_session  # noqa: E402
from bot.prompts import fighter_messages  # noqa: E402
from tests.leaks import client_connections  # noqa: E402

NAMES = ("GOKU", "VEGETA", "PICCOLO", "GOHAN", "KRILLIN", "FRIEZA")
QUESTION = "Should we shard the database now or wait until the next quarter?"
SPREAD_FIGHTERS = ("f-1.0-40", "f-1.2-40", "f-1.4-40", "f-1.6-40", "f-1.8-40", "f-2.0-40")
SYNTH_MODEL = "f-0.5-40"
LOAD_FIGHTER = "f-2.0-40"  # 77 one-token frames over 2.0 s (first at 0.1 s, then every 25 ms)

SWEEP = (25, 50, 100)  # councils, cold, one round each: the capacity curve below the 200 of the load test

TARGET_SINGLE = 1.02
TARGET_LOAD_RATIO = 1.10
TARGET_LAG_P99_MS = 20.0
TARGET_RSS_MB = 300.0


def scripted(model: str) -> float:
    return parse_model(model)[1]


def critical_path(fighters: Sequence[str], synth: str) -> float:
    return max(scripted(m) for m in fighters) + scripted(synth)


def make_council(url: str, fighters: Sequence[str], synth: str) -> CouncilConfig:
    backend = Backend(
        name="fake",
        base_url=url,
        max_concurrency=2000,
        connect_timeout_s=30.0,
        first_token_timeout_s=60.0,
        total_timeout_s=120.0,
    )
    roster = tuple(
        Fighter(
            name=NAMES[i % len(NAMES)] + ("" if i < len(NAMES) else str(i)),
            emoji="*",
            role=f"role {i}",
            persona=f"You are fighter {i}.",
            model=m,
            backend="fake",
        )
        for i, m in enumerate(fighters)
    )
    synthesizer = Synthesizer(
        name="SHENRON", emoji="*", model=synth, backend="fake", prompt="Combine the council's answers."
    )
    return CouncilConfig(backends={"fake": backend}, fighters=roster, synthesizer=synthesizer, round_deadline_s=180.0)


class LagMeter:
    """A ticker task: sleeps 10 ms, records how late it woke up."""

    def __init__(self, interval: float = 0.010) -> None:
        self.interval = interval
        self.samples: list[tuple[float, float]] = []  # (when the tick ended, how late it was)
        self.t0 = 0.0
        self._task: asyncio.Task[None] | None = None

    async def _run(self) -> None:
        while True:
            t = time.perf_counter()
            await asyncio.sleep(self.interval)
            end = time.perf_counter()
            self.samples.append((end, end - t - self.interval))

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="lag-meter")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
            self._task = None

    def summary(self, since: float | None = None, until: float | None = None) -> dict[str, float]:
        """Lateness in ms; since/until select ticks by when they ended, in seconds after ``t0``."""
        lo = -1e9 if since is None else since
        hi = 1e9 if until is None else until
        ms = [lag * 1000 for end, lag in self.samples if lo <= end - self.t0 < hi]
        return {
            "samples": len(ms),
            "p50_ms": common.percentile(ms, 0.5),
            "p99_ms": common.percentile(ms, 0.99),
            "max_ms": max(ms, default=0.0),
        }


def _round(x: Any, nd: int = 4) -> Any:
    return round(x, nd) if isinstance(x, float) else x


# --- 1. one council ---------------------------------------------------------------------------


def _timeline(r: CouncilResult) -> dict[str, Any]:
    return {
        "fighters": {
            a.fighter: {
                "model": a.model,
                "ok": a.ok,
                "first_token_s": _round(a.first_token_s),
                "last_token_s": _round(a.last_token_s),
                "elapsed_s": _round(a.elapsed_s),
                "tokens": a.tokens,
            }
            for a in r.answers
        },
        "synthesis": {
            "ok": r.synthesis.ok,
            "first_token_s": _round(r.synthesis.first_token_s),
            "last_token_s": _round(r.synthesis.last_token_s),
            "elapsed_s": _round(r.synthesis.elapsed_s),
            "tokens": r.synthesis.tokens,
        },
        "stats": {
            "wall_s": _round(r.stats.wall_s),
            "overlap": _round(r.stats.overlap),
            "first_answer_s": _round(r.stats.first_answer_s),
            "tokens": r.stats.tokens,
        },
    }


async def single_council(url: str, repeats: int) -> dict[str, Any]:
    council = make_council(url, SPREAD_FIGHTERS, SYNTH_MODEL)
    cp = critical_path(SPREAD_FIGHTERS, SYNTH_MODEL)
    runs = []
    async with make_session() as session:
        engine = CouncilEngine(LLMClient(session, council.backends), council)
        await collect(engine.run("warm-up"))  # connections pooled, code paths warm
        for _ in range(repeats):
            cpu0 = common.self_cpu_s()
            t0 = time.perf_counter()
            result = await collect(engine.run(QUESTION))
            wall = time.perf_counter() - t0
            slowest = max(result.answers, key=lambda a: a.elapsed_s)
            runs.append(
                {
                    "wall_s": wall,
                    "ratio": wall / cp,
                    "client_cpu_s": common.self_cpu_s() - cpu0,
                    "ok": result.stats.fighters_ok == len(SPREAD_FIGHTERS) and result.synthesis.ok,
                    # where the excess over the critical path sits: after the slowest fighter's scripted end,
                    # and after the synthesis's scripted duration
                    "slowest_fighter_done_s": slowest.elapsed_s,
                    "synthesis_first_token_s": result.synthesis.first_token_s,
                    "timeline": _timeline(result),
                }
            )
    ratios = [r["ratio"] for r in runs]
    return {
        "critical_path_s": cp,
        "repeats": repeats,
        "median_wall_s": common.median([r["wall_s"] for r in runs]),
        "median_ratio": common.median(ratios),
        "max_ratio": max(ratios),
        "all_ok": all(r["ok"] for r in runs),
        "runs": runs,
    }


# --- 2. sequential and thread pool --------------------------------------------------------------


async def _drain(client: LLMClient, model: str, messages: list[dict[str, str]], max_tokens: int) -> str:
    parts = []
    async with aclosing(client.stream_chat("fake", model, messages, max_tokens=max_tokens)) as stream:
        async for d in stream:
            assert isinstance(d, Delta)
            parts.append(d.content)
    return "".join(parts)


async def sequential_council(url: str, repeats: int) -> dict[str, Any]:
    council = make_council(url, SPREAD_FIGHTERS, SYNTH_MODEL)
    cp = critical_path(SPREAD_FIGHTERS, SYNTH_MODEL)
    walls = []
    async with make_session() as session:
        client = LLMClient(session, council.backends)
        await _drain(client, SYNTH_MODEL, [{"role": "user", "content": "warm-up"}], 100)
        for _ in range(repeats):
            t0 = time.perf_counter()
            answers = []
            for f in council.fighters:  # one after another
                answers.append(await _drain(client, f.model, fighter_messages(f, QUESTION, (), ()), f.max_tokens))
            synth = council.synthesizer
            await _drain(
                client,
                synth.model,
                [{"role": "system", "content": synth.prompt}, {"role": "user", "content": "\n\n".join(answers)}],
                synth.max_tokens,
            )
            walls.append(time.perf_counter() - t0)
    sum_path = sum(scripted(m) for m in SPREAD_FIGHTERS) + scripted(SYNTH_MODEL)
    return {
        "critical_path_s": cp,
        "sum_of_durations_s": sum_path,
        "repeats": repeats,
        "median_wall_s": common.median(walls),
        "median_ratio": common.median(walls) / cp,
        "walls_s": walls,
    }


def _blocking_stream(port: int, model: str, messages: list[dict[str, str]], max_tokens: int) -> dict[str, Any]:
    """One streamed chat completion over stdlib http.client, parsing the SSE lines by hand."""
    t0 = time.perf_counter()
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    try:
        body = json.dumps(
            {
                "model": model,
                "messages": messages,
                "stream": True,
                "max_tokens": max_tokens,
                "stream_options": {"include_usage": True},
            }
        ).encode()
        conn.request(
            "POST",
            "/v1/chat/completions",
            body=body,
            headers={"Content-Type": "application/json", "Accept": "text/event-stream"},
        )
        resp = conn.getresponse()
        if resp.status != 200:
            raise RuntimeError(f"{model}: HTTP {resp.status}")
        parts: list[str] = []
        first = last = None
        for raw in resp:  # readline() over the chunked body
            line = raw.strip()
            if not line.startswith(b"data:"):
                continue
            data = line[5:].strip()
            if data == b"[DONE]":
                break
            obj = json.loads(data)
            for choice in obj.get("choices") or []:
                text = (choice.get("delta") or {}).get("content")
                if text:
                    now = time.perf_counter() - t0
                    first = now if first is None else first
                    last = now
                    parts.append(text)
        return {
            "text": "".join(parts),
            "tokens": len(parts),
            "first_token_s": first,
            "last_token_s": last,
            "start_s": t0,
        }
    finally:
        conn.close()


def threadpool_council(port: int, url: str, repeats: int) -> dict[str, Any]:
    council = make_council(url, SPREAD_FIGHTERS, SYNTH_MODEL)
    cp = critical_path(SPREAD_FIGHTERS, SYNTH_MODEL)
    runs = []
    with ThreadPoolExecutor(max_workers=len(council.fighters), thread_name_prefix="fighter") as pool:
        list(
            pool.map(
                lambda _: _blocking_stream(port, SYNTH_MODEL, [{"role": "user", "content": "warm-up"}], 50),
                range(len(council.fighters)),
            )
        )  # threads started before the clock runs
        for _ in range(repeats):
            cpu0 = common.self_cpu_s()
            t0 = time.perf_counter()
            futures = [
                pool.submit(_blocking_stream, port, f.model, fighter_messages(f, QUESTION, (), ()), f.max_tokens)
                for f in council.fighters
            ]
            answers = [fut.result() for fut in futures]
            t_fighters = time.perf_counter() - t0
            synth = council.synthesizer
            _blocking_stream(
                port,
                synth.model,
                [
                    {"role": "system", "content": synth.prompt},
                    {"role": "user", "content": "\n\n".join(a["text"] for a in answers)},
                ],
                synth.max_tokens,
            )
            wall = time.perf_counter() - t0
            intervals = [
                (a["start_s"] - t0 + a["first_token_s"], a["start_s"] - t0 + a["last_token_s"]) for a in answers
            ]
            from bot.council import overlap

            runs.append(
                {
                    "wall_s": wall,
                    "ratio": wall / cp,
                    "fighters_done_s": t_fighters,
                    "overlap": overlap(intervals),
                    "client_cpu_s": common.self_cpu_s() - cpu0,
                }
            )
    return {
        "critical_path_s": cp,
        "repeats": repeats,
        "median_wall_s": common.median([r["wall_s"] for r in runs]),
        "median_ratio": common.median([r["ratio"] for r in runs]),
        "runs": runs,
    }


# --- 3. load ----------------------------------------------------------------------------------


async def _load_round(
    engine: CouncilEngine,
    server: common.ServerProc,
    n_councils: int,
    n_fighters: int,
    cp: float,
    profile: cProfile.Profile | None,
) -> dict[str, Any]:
    """Launch n_councils at once on this engine (one session) and measure until the last one ends."""
    await asyncio.sleep(0.1)
    server.stats(reset=True)
    lag = LagMeter()
    lag.start()
    await asyncio.sleep(0.1)
    lag.samples.clear()  # idle ticks before the launch are not wanted
    rss0 = common.current_rss_mb()
    s_cpu0 = server.cpu_s()
    busy0 = common.system_busy_s()
    cpu0 = common.self_cpu_s()

    async def one(i: int) -> tuple[float, CouncilResult]:
        t = time.perf_counter()
        r = await collect(engine.run(f"{QUESTION} #{i}"))
        return time.perf_counter() - t, r

    if profile is not None:
        profile.enable()
    t0_mono = time.monotonic()  # the server stamps request arrivals with the same clock
    t0 = time.perf_counter()
    lag.t0 = t0
    done = await asyncio.gather(*(one(i) for i in range(n_councils)))
    wall = time.perf_counter() - t0
    if profile is not None:
        profile.disable()
    cpu = common.self_cpu_s() - cpu0
    s_cpu = server.cpu_s() - s_cpu0
    other_cpu = common.system_busy_s() - busy0 - cpu - s_cpu
    await lag.stop()
    sstats = server.stats(arrivals=True)
    rss1 = common.current_rss_mb()
    arrivals = sorted(a - t0_mono for a in (sstats or {}).pop("arrivals", []))
    n_fighter_requests = n_councils * n_fighters
    fighter_arrivals, synth_arrivals = arrivals[:n_fighter_requests], arrivals[n_fighter_requests:]
    results = [r for _, r in done]
    per_council = [w / cp for w, _ in done]
    tokens = sum(r.stats.tokens for r in results)
    fighter_first = [a.first_token_s for r in results for a in r.answers if a.first_token_s is not None]
    fighter_done = [a.elapsed_s for r in results for a in r.answers]
    synth_done = [r.synthesis.elapsed_s for r in results]
    launched = fighter_arrivals[-1] if fighter_arrivals else 0.0

    def spread(xs: list[float]) -> dict[str, float | None]:
        return {"first": xs[0] if xs else None, "p50": common.median(xs), "last": xs[-1] if xs else None}

    return {
        "councils": n_councils,
        "streams": n_councils * (n_fighters + 1),
        "critical_path_s": cp,
        "wall_s": wall,
        "ratio": wall / cp,
        "per_council_ratio": {"median": common.median(per_council), "max": max(per_council)},
        "fighters_ok": sum(r.stats.fighters_ok for r in results),
        "fighters_total": n_councils * n_fighters,
        "synthesis_ok": sum(r.synthesis.ok for r in results),
        "tokens": tokens,
        "tokens_per_s": tokens / wall,
        "client_cpu_s": cpu,
        "client_cpu_utilisation": cpu / wall,
        "cpu_s_per_1000_tokens": cpu / tokens * 1000,
        "loop_lag": lag.summary(),
        # the launch burst (until the last fighter request reached the server) vs. the streaming after it
        "loop_lag_launch": lag.summary(until=launched),
        "loop_lag_streaming": lag.summary(since=launched),
        "rss_before_mb": rss0,
        "rss_after_mb": rss1,
        "peak_rss_mb": common.peak_rss_mb(),
        "server": {"impl": server.impl, "cpu_s": s_cpu, "cpu_utilisation": s_cpu / wall, "stats": sstats},
        "other_processes_cpu_s": other_cpu,
        "other_processes_cpu_utilisation": other_cpu / wall,
        # when the server received the requests, seconds after the councils were launched
        "fighter_request_arrival_s": spread(fighter_arrivals),
        "synthesis_request_arrival_s": spread(synth_arrivals),
        "fighter_first_token_s": {
            "p50": common.median(fighter_first),
            "p99": common.percentile(fighter_first, 0.99),
            "max": max(fighter_first, default=0.0),
        },
        "fighter_done_s": {"p50": common.median(fighter_done), "max": max(fighter_done, default=0.0)},
        "synthesis_done_s": {"p50": common.median(synth_done), "max": max(synth_done, default=0.0)},
    }


async def load(
    server: common.ServerProc, n_councils: int, profile: cProfile.Profile | None, warm_round: bool = True
) -> dict[str, Any]:
    """One repetition: a fresh session; a cold round (every connection new), then a warm one (pooled)."""
    fighters = (LOAD_FIGHTER,) * 6
    council = make_council(server.url, fighters, SYNTH_MODEL)
    cp = critical_path(fighters, SYNTH_MODEL)
    async with make_session() as session:
        engine = CouncilEngine(LLMClient(session, council.backends), council)
        await collect(engine.run("warm-up"))  # imports and code paths; one council's connections pooled
        background = await asyncio.to_thread(common.wait_quiet)
        cold = await _load_round(engine, server, n_councils, len(fighters), cp, profile)
        cold["background_cores_before"] = background
        warm = None
        if warm_round:
            background = await asyncio.to_thread(common.wait_quiet)
            warm = await _load_round(engine, server, n_councils, len(fighters), cp, None)
            warm["background_cores_before"] = background
    return {
        "fighter_model": LOAD_FIGHTER,
        "synth_model": SYNTH_MODEL,
        "frames": "1 token per SSE frame (no server-side batching)",
        "cold": cold,
        "warm_pool": warm,
    }


# --- 4. cancellation leaks ----------------------------------------------------------------------


def _snapshot(session: Any, port: int) -> dict[str, int]:
    conn = session.connector
    acquired = len(getattr(conn, "_acquired", ()))
    idle = sum(len(v) for v in getattr(conn, "_conns", {}).values())
    return {
        "tasks": len(asyncio.all_tasks()),
        "connections_in_use": acquired,
        "connections_idle_pooled": idle,
        "tcp_established_to_server": client_connections(port),
        **common.fd_counts(),
    }


async def cancellations(server: common.ServerProc, n_councils: int, batch: int, seed: int = 7) -> dict[str, Any]:
    rng = random.Random(seed)
    council = make_council(server.url, SPREAD_FIGHTERS, SYNTH_MODEL)
    outcomes: dict[str, int] = {"finished": 0, "cancelled_task": 0, "closed_generator": 0, "cancel_too_late": 0}

    async def consume(engine: CouncilEngine, i: int, mode: str, delay: float) -> str:
        """Drain one council; 'cancel' cancels this task, 'aclose' stops iterating and closes the generator."""
        me = asyncio.current_task()
        assert me is not None
        timer: asyncio.TimerHandle | None = None
        first: float | None = None
        gen = engine.run(f"{QUESTION} #{i}")
        try:
            async with aclosing(gen):
                async for ev in gen:
                    if isinstance(ev, CouncilFinished):
                        return "finished" if mode == "none" else "cancel_too_late"
                    if first is None and isinstance(ev, FighterToken):
                        first = time.perf_counter()
                        if mode == "cancel":
                            timer = asyncio.get_running_loop().call_later(delay, me.cancel)
                    if mode == "aclose" and first is not None and time.perf_counter() - first >= delay:
                        break  # aclosing() closes the generator on the way out
            return "closed_generator"
        finally:
            if timer is not None:
                timer.cancel()

    async def run_batch(engine: CouncilEngine, start: int, size: int, plan: bool) -> None:
        tasks = []
        for i in range(start, start + size):
            mode = "none"
            if plan and rng.random() < 1 / 3:
                mode = rng.choice(("cancel", "aclose"))
            tasks.append(asyncio.create_task(consume(engine, i, mode, rng.uniform(0.0, 2.2))))
        for res in await asyncio.gather(*tasks, return_exceptions=True):
            if isinstance(res, asyncio.CancelledError):
                outcomes["cancelled_task"] += 1
            elif isinstance(res, BaseException):
                raise res
            else:
                outcomes[res] += 1

    async with make_session() as session:
        engine = CouncilEngine(LLMClient(session, council.backends), council)
        await run_batch(engine, 0, batch, plan=False)  # warm-up: fills the pool with idle keep-alive connections
        await asyncio.sleep(0)
        for k in outcomes:
            outcomes[k] = 0
        before = _snapshot(session, server.port)
        server_before = server.stats()
        t0 = time.perf_counter()
        for start in range(0, n_councils, batch):
            await run_batch(engine, start, min(batch, n_councils - start), plan=True)
        wall = time.perf_counter() - t0
        await asyncio.sleep(0)  # one tick
        after = _snapshot(session, server.port)
        await asyncio.sleep(0.5)
        after_settled = _snapshot(session, server.port)
        server_after = server.stats()
    growth = {k: after[k] - before[k] for k in before}
    leak_keys = ("tasks", "connections_in_use", "tcp_established_to_server", "sockets", "fds")
    return {
        "councils": n_councils,
        "batch": batch,
        "wall_s": wall,
        "outcomes": outcomes,
        "before": before,
        "after_one_tick": after,
        "after_0_5_s": after_settled,
        "growth_after_one_tick": growth,
        "no_growth": all(growth[k] <= 0 for k in leak_keys),
        "server_before": server_before,
        "server_after": server_after,
    }


# --- main -------------------------------------------------------------------------------------


def verdict(ok: bool) -> str:
    return "PASS" if ok else "FAIL"


def main() -> None:
    ap = argparse.ArgumentParser(description="Council benchmark (see the module docstring).")
    ap.add_argument("--quick", action="store_true", help="fewer repeats, 50 councils under load, 100 cancelled-run")
    ap.add_argument(
        "--impl",
        choices=("fast", "fakellm"),
        default="fast",
        help="fake server: 'fast' (absolute-time frames) or the project's FakeLLM",
    )
    ap.add_argument("--councils", type=int, default=None, help="councils in the load test (default 200)")
    ap.add_argument("--only", default="1234", help="which scenarios to run, e.g. 13")
    ap.add_argument("--profile", action="store_true", help="cProfile the load test's client (slows it down)")
    args = ap.parse_args()

    repeats = 3 if args.quick else 5
    n_load = args.councils or (50 if args.quick else 200)
    n_cancel = 100 if args.quick else 500
    load_reps = 1 if args.quick else 3
    models = sorted({*SPREAD_FIGHTERS, SYNTH_MODEL, LOAD_FIGHTER})
    out: dict[str, Any] = {
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version(), "platform": platform.platform()},
        "args": vars(args),
        "server_impl": args.impl,
    }
    rows: list[list[Any]] = []
    t_start = time.perf_counter()
    with common.fake_server(args.impl, models) as server:
        out["server_pid"] = server.pid
        if "1" in args.only:
            s1 = asyncio.run(single_council(server.url, repeats))
            out["single"] = s1
            rows.append(
                [
                    "1 one council (6 fighters 1.0-2.0 s + synth 0.5 s)",
                    "wall / critical path (median)",
                    f"{s1['median_ratio']:.3f} ({s1['median_wall_s']:.3f} s / {s1['critical_path_s']:.1f} s)",
                    f"<= {TARGET_SINGLE}",
                    verdict(s1["median_ratio"] <= TARGET_SINGLE and s1["all_ok"]),
                ]
            )
        if "2" in args.only:
            seq = asyncio.run(sequential_council(server.url, 1 if args.quick else 2))
            thr = threadpool_council(server.port, server.url, repeats)
            out["sequential"], out["threadpool"] = seq, thr
            if "single" in out:
                s1 = out["single"]
                rows.append(
                    [
                        "2 asyncio engine",
                        "wall, wall / critical path",
                        f"{s1['median_wall_s']:.3f} s, {s1['median_ratio']:.3f}",
                        "~1",
                        "-",
                    ]
                )
            rows.append(
                [
                    "2 sequential awaits",
                    "wall, wall / critical path",
                    f"{seq['median_wall_s']:.3f} s, {seq['median_ratio']:.3f}",
                    f"~sum {seq['sum_of_durations_s'] / seq['critical_path_s']:.2f} (no overlap)",
                    "-",
                ]
            )
            rows.append(
                [
                    "2 ThreadPoolExecutor + http.client",
                    "wall, wall / critical path",
                    f"{thr['median_wall_s']:.3f} s, {thr['median_ratio']:.3f}",
                    "~1 (threads overlap)",
                    verdict(thr["median_ratio"] <= 1.10),
                ]
            )
        if "3" in args.only:
            prof = cProfile.Profile() if args.profile else None
            reps3 = [asyncio.run(load(server, n_load, prof if i == 0 else None)) for i in range(load_reps)]
            order = sorted(range(load_reps), key=lambda i: reps3[i]["cold"]["ratio"])
            pick = order[len(order) // 2]
            out["load"] = {
                "repeats": load_reps,
                "median_repeat": pick,
                "runs": reps3,
                "cold_ratios": [r["cold"]["ratio"] for r in reps3],
                "warm_ratios": [r["warm_pool"]["ratio"] for r in reps3],
            }
            if prof is not None:
                buf = io.StringIO()
                pstats.Stats(prof, stream=buf).sort_stats("tottime").print_stats(45)
                buf.write("\n\n---- by cumulative ----\n")
                pstats.Stats(prof, stream=buf).sort_stats("cumulative").print_stats(45)
                path = common.RESULTS_DIR / "council_profile.txt"
                common.RESULTS_DIR.mkdir(parents=True, exist_ok=True)
                path.write_text(buf.getvalue())
                out["load"]["profile_file"] = str(path)
            s3, w3 = reps3[pick]["cold"], reps3[pick]["warm_pool"]
            label = f"3 load: {n_load} councils, {s3['streams']} streams @40 tok/s, 1 token/frame"
            failed = sum(
                r[k]["fighters_total"] - r[k]["fighters_ok"] + n_load - r[k]["synthesis_ok"]
                for r in reps3
                for k in ("cold", "warm_pool")
            )
            rows.append(
                [
                    label,
                    f"wall / critical path (median of {load_reps}, new connections)",
                    f"{s3['ratio']:.3f} ({s3['wall_s']:.2f} s / {s3['critical_path_s']:.1f} s); all: "
                    + ", ".join(f"{x:.2f}" for x in out["load"]["cold_ratios"]),
                    f"<= {TARGET_LOAD_RATIO}",
                    verdict(s3["ratio"] <= TARGET_LOAD_RATIO and failed == 0),
                ]
            )
            rows.append(
                [
                    "",
                    "  same, 2nd round on pooled connections",
                    f"{w3['ratio']:.3f}; all: " + ", ".join(f"{x:.2f}" for x in out["load"]["warm_ratios"]),
                    "-",
                    "-",
                ]
            )
            arr = s3["fighter_request_arrival_s"]
            if arr["last"] is not None:  # the fast server stamps arrivals; FakeLLM does not
                rows.append(
                    [
                        "",
                        "  launch: fighter requests reached server (p50, last)",
                        f"{arr['p50']:.2f} s, {arr['last']:.2f} s after launch (pooled: "
                        f"{w3['fighter_request_arrival_s']['last']:.2f} s)",
                        "-",
                        "-",
                    ]
                )
            rows.append(
                [
                    "",
                    "event-loop lag p99 (p50, max)",
                    f"{s3['loop_lag']['p99_ms']:.0f} ms ({s3['loop_lag']['p50_ms']:.1f}, "
                    f"{s3['loop_lag']['max_ms']:.0f})",
                    f"<= {TARGET_LAG_P99_MS:g} ms",
                    verdict(s3["loop_lag"]["p99_ms"] <= TARGET_LAG_P99_MS),
                ]
            )
            rows.append(
                [
                    "",
                    "  lag p99 during launch / while streaming",
                    f"{s3['loop_lag_launch']['p99_ms']:.0f} ms / {s3['loop_lag_streaming']['p99_ms']:.0f} ms "
                    f"(pooled: {w3['loop_lag_launch']['p99_ms']:.0f} / {w3['loop_lag_streaming']['p99_ms']:.0f})",
                    "-",
                    "-",
                ]
            )
            rows.append(
                [
                    "",
                    "client CPU s per 1,000 tokens",
                    f"{s3['cpu_s_per_1000_tokens']:.3f} ({s3['client_cpu_s']:.2f} s for {s3['tokens']} tokens;"
                    f" {s3['client_cpu_utilisation']:.0%} of a core)",
                    "report",
                    "-",
                ]
            )
            peak = max(r[k]["peak_rss_mb"] for r in reps3 for k in ("cold", "warm_pool"))
            rows.append(
                [
                    "",
                    "peak RSS (client process)",
                    f"{peak:.0f} MB",
                    f"<= {TARGET_RSS_MB:g} MB",
                    verdict(peak <= TARGET_RSS_MB),
                ]
            )
            srv = s3["server"]
            late = (srv["stats"] or {}).get("lateness_ms", {})
            rows.append(
                [
                    "",
                    "fake server CPU (its own process)",
                    f"{srv['cpu_utilisation']:.0%} of a core"
                    + (f"; frames late p50 {late['p50']:.1f} ms, p99 {late['p99']:.0f} ms" if late else ""),
                    "< 100% (keeps up)",
                    verdict(srv["cpu_utilisation"] < 0.95),
                ]
            )
            rows.append(
                [
                    "",
                    "other processes' CPU during the round",
                    f"{s3['other_processes_cpu_utilisation']:.2f} cores (before: {s3['background_cores_before']:.2f})",
                    "~0 (quiet machine)",
                    "-",
                ]
            )
            rows.append(["", "failed fighters / syntheses (all rounds)", f"{failed}", "0", verdict(failed == 0)])
            if not args.quick:  # where does one event loop stop keeping up?
                sweep = []
                for n in SWEEP:
                    c = asyncio.run(load(server, n, None, warm_round=False))["cold"]
                    sweep.append(c)
                    bad = c["fighters_total"] - c["fighters_ok"] + n - c["synthesis_ok"]
                    rows.append(
                        [
                            "3b capacity sweep" if n == SWEEP[0] else "",
                            f"{n} councils ({c['streams']} streams): ratio, lag p99 all/streaming, CPU",
                            f"{c['ratio']:.3f}, {c['loop_lag']['p99_ms']:.0f} / "
                            f"{c['loop_lag_streaming']['p99_ms']:.0f} ms, {c['client_cpu_utilisation']:.0%} "
                            f"of a core" + (f", {bad} failed" if bad else ""),
                            f"<= {TARGET_LOAD_RATIO}, <= {TARGET_LAG_P99_MS:g} ms",
                            verdict(
                                c["ratio"] <= TARGET_LOAD_RATIO
                                and not bad
                                and c["loop_lag"]["p99_ms"] <= TARGET_LAG_P99_MS
                            ),
                        ]
                    )
                out["load"]["sweep"] = sweep
        if "4" in args.only:
            s4 = asyncio.run(cancellations(server, n_cancel, 50))
            out["cancel"] = s4
            g = s4["growth_after_one_tick"]
            b, a = s4["before"], s4["after_one_tick"]
            o = s4["outcomes"]
            rows.append(
                [
                    f"4 {n_cancel} councils / batches of 50, 1/3 cancelled",
                    "outcomes",
                    f"{o['finished']} finished, {o['cancelled_task']} task.cancel(), "
                    f"{o['closed_generator']} aclose(), {o['cancel_too_late']} cancel after end",
                    "-",
                    "-",
                ]
            )
            for key, label in (
                ("tasks", "asyncio tasks"),
                ("connections_in_use", "connections in use (connector)"),
                ("connections_idle_pooled", "idle pooled keep-alive connections"),
                ("tcp_established_to_server", "TCP connections to server (/proc)"),
                ("sockets", "socket fds"),
                ("fds", "all fds"),
            ):
                rows.append(
                    [
                        "",
                        f"{label} before -> after",
                        f"{b[key]} -> {a[key]} ({g[key]:+d})",
                        "no growth",
                        verdict(g[key] <= 0),
                    ]
                )
    out["runtime_s"] = time.perf_counter() - t_start
    out["rows"] = rows
    print()
    print(common.table(rows, ["scenario", "figure", "value", "target", "result"]))
    print()
    notes = [
        f"fake server: {args.impl}, a separate process (bench/fake_server_process.py); one token per SSE frame, "
        "no server-side batching"
        + (
            "; every frame has an absolute due time (no drift)"
            if args.impl == "fast"
            else "; FakeLLM sleeps between tokens, so its streams run long (drift)"
        ),
        f"machine: {os.cpu_count()} CPUs, Python {platform.python_version()}; benchmark runtime "
        f"{out['runtime_s']:.1f} s",
    ]
    print("\n".join(f"note: {n}" for n in notes))
    path = common.write_json("council.json", out)
    print(f"wrote {path.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
