"""The parallelism probe: one-at-a-time vs side-by-side servers told apart over real HTTP, and the verdicts."""

from __future__ import annotations

import pytest

from bot.config import CouncilConfig, Fighter
from bot.llm import LLMClient, make_session
from bot.parallelism import (
    MIXED,
    Sample,
    analyse_round,
    guess_server,
    judge,
    peak_concurrency,
    plan_probes,
    probe_parallelism,
)
from tests.factories import make_backend, make_council
from tests.fakeserver import FakeLLM, Script

# Eight chunks 25 ms apart: each generation lasts ~175 ms, long against scheduling jitter.
PROBE_SCRIPT = Script(text="one two three four five six seven eight", token_interval=0.025)


async def probe(fake: FakeLLM, models: list[str], n: int = 4, *, max_concurrency: int = 4, **kw: object):
    async with make_session() as session:
        client = LLMClient(session, {"fake": make_backend(fake.url, max_concurrency=max_concurrency)})
        return await probe_parallelism(client, "fake", models, n, timeout_s=10, **kw)


def serial(n: int, length: float = 0.2, handover: float = 0.0005) -> list[Sample]:
    """n generations one after another; each next one starts a hair before the last ends (jitter)."""
    return [Sample("m", i * length - (handover if i else 0), (i + 1) * length, 8) for i in range(n)]


def side_by_side(n: int, length: float = 0.2, skew: float = 0.01) -> list[Sample]:
    return [Sample("m", i * skew, i * skew + length, 8) for i in range(n)]


# --- the arithmetic ----------------------------------------------------------------------------


def test_peak_ignores_a_handover_but_counts_real_overlap() -> None:
    assert peak_concurrency([(0, 1), (0.999, 2), (1.999, 3)], min_span=0.3) == 1
    assert peak_concurrency([(0, 1), (0.999, 2), (1.999, 3)]) == 2  # without the jitter guard
    assert peak_concurrency([(0, 1), (0.1, 1.1), (0.2, 1.2), (0.3, 1.3)], min_span=0.3) == 4
    assert peak_concurrency([(0, 1), (0, 1), (1, 2), (1, 2)], min_span=0.3) == 2  # two batches of two
    assert peak_concurrency([]) == 0
    assert peak_concurrency([(1, 1)]) == 0


def test_round_figures_for_serial_and_parallel() -> None:
    one = analyse_round("m", ["m"], serial(4), wall_s=0.8)
    assert (one.at_once, one.peak, round(one.overlap, 2)) == (1, 1, 1.0)
    assert one.waited == 3 and one.first_token_spread_s == pytest.approx(0.6, abs=0.01)

    four = analyse_round("m", ["m"], side_by_side(4), wall_s=0.25)
    assert (four.at_once, four.peak) == (4, 4) and four.overlap > 3.4
    assert four.waited == 0 and four.first_token_spread_s == pytest.approx(0.03)


def test_a_round_without_timings_is_inconclusive() -> None:
    whole = [Sample("m", 0.1, 0.1, 1) for _ in range(4)]  # every reply in one chunk
    r = analyse_round("m", ["m"], whole, wall_s=0.1)
    assert r.at_once is None
    report = judge("b", "http://h:1/v1", [r], requested=4, max_concurrency=4)
    assert report.status == "warn" and report.at_once is None and "could not measure" in report.verdict


def test_serial_ollama_verdict_names_the_setting_and_the_mismatch() -> None:
    r = analyse_round("llama3", ["llama3"], serial(4), wall_s=0.8)
    report = judge("ollama", "http://box:11434/v1", [r], requested=4, max_concurrency=4, users=6)
    assert report.server == "ollama"
    assert report.verdict == "serves one at a time" and report.at_once == 1 and report.status == "warn"
    assert report.matches_config is False
    advice = " ".join(report.advice)
    assert "OLLAMA_NUM_PARALLEL=4" in advice and "max_concurrency = 1 in [backends.ollama]" in advice
    assert "3 of 4 waited" in report.findings[0]


def test_serial_with_matching_max_concurrency_still_warns_when_fighters_share_it() -> None:
    r = analyse_round("m", ["m"], serial(4), wall_s=0.8)
    report = judge("lm", "http://box:1234/v1", [r], requested=4, max_concurrency=1, users=6)
    assert report.matches_config is True and report.status == "warn"
    assert "Max Concurrent Predictions" in " ".join(report.advice)
    alone = judge("lm", "http://box:1234/v1", [r], requested=4, max_concurrency=1, users=1)
    assert alone.status == "ok" and alone.advice == ()


def test_parallel_verdict_and_config_comparison() -> None:
    r = analyse_round("m", ["m"], side_by_side(4), wall_s=0.25)
    ok = judge("b", "http://h:9/v1", [r], requested=4, max_concurrency=4)
    assert ok.status == "ok" and ok.verdict == "serves 4 at once" and ok.matches_config and ok.advice == ()
    assert ok.headline.startswith("serves 4 at once (overlap ")

    held_back = judge("b", "http://h:9/v1", [r], requested=4, max_concurrency=2)
    assert held_back.status == "warn" and held_back.matches_config is False
    assert "set max_concurrency = 4" in held_back.advice[0] and "at least 4" in held_back.advice[0]

    more_than_probed = judge("b", "http://h:9/v1", [r], requested=4, max_concurrency=16)
    assert more_than_probed.status == "ok" and more_than_probed.matches_config  # cannot tell: at least 4


def test_two_at_once_on_llama_cpp() -> None:
    two = [Sample("m", 0, 0.2, 8), Sample("m", 0.001, 0.2, 8), Sample("m", 0.2, 0.4, 8), Sample("m", 0.2, 0.4, 8)]
    report = judge("l", "http://h:8080/v1", [analyse_round("m", ["m"], two, 0.4)], requested=4, max_concurrency=4)
    assert report.verdict == "serves 2 at once" and report.status == "warn"
    assert "--parallel 4" in report.advice[0] and "max_concurrency = 2" in report.advice[0]


def test_interleaved_models_that_take_turns_mean_model_swapping() -> None:
    a = analyse_round("a", ["a"], side_by_side(4), 0.25)
    b = analyse_round("b", ["b"], side_by_side(4), 0.25)
    mixed = analyse_round(MIXED, ["a", "b"], serial(4, length=2.0), 8.0)
    report = judge("lm", "http://box:1234/v1", [a, b, mixed], requested=4, max_concurrency=4)
    assert report.swaps_models is True and report.status == "warn"
    assert report.verdict == "serves 4 at once"
    assert "Auto-evict" in " ".join(report.advice)
    assert any("interleaved" in f for f in report.findings)


def test_interleaved_models_with_slow_first_tokens_mean_model_loading() -> None:
    a = analyse_round("a", ["a"], side_by_side(4), 0.25)
    b = analyse_round("b", ["b"], side_by_side(4), 0.25)
    loading = [Sample(m, 5.0 + i * 0.01, 5.2 + i * 0.01, 8) for i, m in enumerate("abab")]
    report = judge(
        "o",
        "http://box:11434/v1",
        [a, b, analyse_round(MIXED, ["a", "b"], loading, 5.3)],
        requested=4,
        max_concurrency=4,
    )
    assert report.swaps_models is True and "OLLAMA_MAX_LOADED_MODELS=2" in " ".join(report.advice)


def test_failed_probe_is_an_error_report() -> None:
    failed = [Sample("m", error="backend b refused the connection", error_kind="connect")]
    report = judge("b", "http://h:1/v1", [analyse_round("m", ["m"], failed, 0.0)], requested=4, max_concurrency=4)
    assert report.status == "error" and "refused" in report.error and report.at_once is None


def test_guess_server_from_the_port() -> None:
    assert guess_server("http://localhost:11434/v1") == "ollama"
    assert guess_server("http://localhost:1234/v1") == "lmstudio"
    assert guess_server("http://localhost:8080/v1") == "llama.cpp"
    assert guess_server("http://gpu:8000/v1") == "vllm"
    assert guess_server("https://api.example.com/v1") == "unknown"


def test_plan_probes_uses_each_backends_fighters() -> None:
    council = make_council("http://127.0.0.1:1/v1", names=("GOKU", "VEGETA", "PICCOLO"), max_concurrency=2)
    other = make_backend("http://127.0.0.1:2/v1", name="other", max_concurrency=6)
    fighters = (
        *council.fighters[:2],
        Fighter(name="PICCOLO", emoji="🧘", role="r", persona="p", model="big", backend="other"),
    )
    council = CouncilConfig(
        backends={**council.backends, "other": other}, fighters=fighters, synthesizer=council.synthesizer
    )
    plans = {p.backend: p for p in plan_probes(council)}
    assert plans["fake"].models == ("goku", "vegeta") and plans["fake"].users == 2 and plans["fake"].requests == 4
    assert plans["other"].models == ("big",) and plans["other"].users == 1 and plans["other"].requests == 6


# --- over real HTTP ----------------------------------------------------------------------------


@pytest.mark.parametrize("max_parallel", [1, 2, 4])
async def test_probe_tells_apart_one_two_and_four_at_once(max_parallel: int) -> None:
    async with FakeLLM(max_parallel=max_parallel, default=PROBE_SCRIPT) as fake:
        report = await probe(fake, ["m"], warmup=False)
        assert fake.peak_parallel == max_parallel  # the probe did offer four at once
    assert report.at_once == max_parallel, report.to_dict()
    assert report.verdict == ("serves one at a time" if max_parallel == 1 else f"serves {max_parallel} at once")
    assert report.status == ("ok" if max_parallel == 4 else "warn")
    assert report.overlap == pytest.approx(max_parallel, abs=0.6)
    first = report.rounds[0]
    assert len(first.samples) == 4 and all(s.ok and s.pieces == 8 for s in first.samples)
    assert first.waited == 4 - max_parallel


async def test_probe_measures_the_server_not_our_own_max_concurrency() -> None:
    async with FakeLLM(max_parallel=4, default=PROBE_SCRIPT) as fake:
        report = await probe(fake, ["m"], max_concurrency=1)
    assert report.at_once == 4 and report.matches_config is False
    assert "set max_concurrency = 4" in report.advice[0]


async def test_probe_warms_up_then_interleaves_the_models() -> None:
    async with FakeLLM(max_parallel=4, default=PROBE_SCRIPT) as fake:
        report = await probe(fake, ["a", "b"], n=4)
        chats = [r.model for r in fake.requests if r.path.endswith("/chat/completions")]
    assert chats == ["a", "a", "a", "a", "a", "b", "b", "b", "b", "b", "a", "b", "a", "b"]
    assert [r.label for r in report.rounds] == ["a", "b", MIXED]
    assert report.swaps_models is False and report.status == "ok" and report.at_once == 4
    assert report.to_dict()["rounds"][2]["models"] == ["a", "b"]


async def test_probe_against_a_refused_port() -> None:
    async with FakeLLM() as fake:
        url = fake.url
    async with make_session() as session:
        client = LLMClient(session, {"gone": make_backend(url, name="gone", max_retries=0)})
        report = await probe_parallelism(client, "gone", ["m"], timeout_s=5)
    assert report.status == "error" and "refused the connection" in report.error
    assert len(report.rounds) == 1  # the warm-up failed, so nothing more was sent


async def test_probe_against_a_missing_model() -> None:
    async with FakeLLM(models=["real"], default=PROBE_SCRIPT) as fake:
        report = await probe(fake, ["imaginary"])
    assert report.status == "error" and "does not serve model 'imaginary'" in report.error
    assert "real" in report.error


async def test_probe_with_a_wrong_api_key_names_the_variable() -> None:
    async with FakeLLM(api_key="right", default=PROBE_SCRIPT) as fake, make_session() as session:
        backend = make_backend(fake.url, api_key_env="FAKE_KEY", api_key="sk-wrong-1234")
        report = await probe_parallelism(LLMClient(session, {"fake": backend}), "fake", ["m"], timeout_s=5)
    assert report.status == "error" and "FAKE_KEY" in report.error and "sk-wrong-1234" not in report.error


async def test_a_request_failing_mid_probe_is_reported() -> None:
    async with FakeLLM(max_parallel=4, default=PROBE_SCRIPT) as fake:
        fake.script("m", [PROBE_SCRIPT, PROBE_SCRIPT, PROBE_SCRIPT, Script(status=500, error_message="GPU on fire")])
        report = await probe(fake, ["m"], warmup=False)
    assert report.at_once == 3 and report.status == "warn"
    assert any("GPU on fire" in f for f in report.findings)


async def test_replies_too_short_to_time_are_retried_longer_then_reported() -> None:
    async with FakeLLM(max_parallel=4, default=Script(text="one")) as fake:
        report = await probe(fake, ["m"], warmup=False)
        bodies = [r.body for r in fake.requests if r.path.endswith("/chat/completions")]
    assert [b["max_tokens"] for b in bodies] == [24] * 4 + [128] * 4
    assert report.at_once is None and report.status == "warn" and "could not measure" in report.verdict
