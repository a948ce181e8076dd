"""The fault matrix at the engine: what the user sees for each backend fault, and that nothing is left.

Two backends: ALPHA serves GOKU, VEGETA and PICCOLO; BETA serves GOHAN, KRILLIN, FRIEZA and SHENRON.
Faults are injected on ALPHA; BETA's fighters and the synthesis must carry on.
"""

from __future__ import annotations

import asyncio
import socket
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass

import pytest

from bot.config import CouncilConfig, Fighter, Synthesizer
from bot.council import CouncilEngine, collect
from bot.events import CouncilFinished, CouncilResult, FighterToken
from bot.llm import LLMClient, make_session
from tests.factories import make_backend
from tests.fakeserver import FakeLLM, Script
from tests.leaks import client_connections, client_tasks

ALPHA = ("GOKU", "VEGETA", "PICCOLO")
BETA = ("GOHAN", "KRILLIN", "FRIEZA")
FIRST_TOKEN_TIMEOUT = 0.6
TOTAL_TIMEOUT = 1.2


def two_backend_council(
    alpha_url: str, beta_url: str, alpha_model: str | None = None, **alpha_kw: object
) -> CouncilConfig:
    kw = {"first_token_timeout_s": FIRST_TOKEN_TIMEOUT, "total_timeout_s": TOTAL_TIMEOUT, **alpha_kw}
    backends = {"alpha": make_backend(alpha_url, "alpha", **kw), "beta": make_backend(beta_url, "beta")}
    fighters = tuple(
        Fighter(
            name=n,
            emoji="🥋",
            role="r",
            persona="p",
            model=(n in ALPHA and alpha_model) or n.lower(),
            backend="alpha" if n in ALPHA else "beta",
        )
        for n in ALPHA + BETA
    )
    synth = Synthesizer(name="SHENRON", emoji="🐉", model="shenron", backend="beta", prompt="Synthesise.")
    return CouncilConfig(backends=backends, fighters=fighters, synthesizer=synth, round_deadline_s=10)


@dataclass
class Rig:
    alpha: FakeLLM
    beta: FakeLLM
    engine: CouncilEngine


@asynccontextmanager
async def rig(alpha: FakeLLM | None = None, **alpha_kw: object) -> AsyncIterator[Rig]:
    """Two fakes and an engine; on exit, checks that the round left no task and no connection."""
    async with FakeLLM() as beta:
        alpha = alpha or FakeLLM()
        if not alpha.url:
            await alpha.start()
        before = client_tasks()
        try:
            async with make_session() as session:
                url = str(alpha_kw.pop("url", alpha.url))
                model = alpha_kw.pop("alpha_model", None)
                council = two_backend_council(url, beta.url, model, **alpha_kw)  # type: ignore[arg-type]
                yield Rig(alpha, beta, CouncilEngine(LLMClient(session, council.backends), council))
            await asyncio.sleep(0)  # one tick: closed transports release their sockets
            assert client_tasks() == before, "the round left tasks behind"
            for fake in (alpha, beta):
                assert client_connections(fake.port) == 0, "the round left connections open"
        finally:
            await alpha.close()


def assert_final_and_timely(
    result: CouncilResult, failing: tuple[str, ...], kind: str, words: str, limit: float = TOTAL_TIMEOUT
) -> None:
    by_name = {a.fighter: a for a in result.answers}
    assert set(by_name) == set(ALPHA + BETA), "every fighter ends in a final state"
    for name in failing:
        a = by_name[name]
        assert not a.ok and a.error_kind == kind, (name, a.error_kind, a.error)
        assert words in a.error, a.error
        assert a.elapsed_s <= limit + 1.0
    for name in set(ALPHA + BETA) - set(failing):
        assert by_name[name].ok, by_name[name].error
    assert result.ok, result.synthesis.error
    assert set(result.missing) == set(failing)


@pytest.mark.parametrize(
    ("script", "kind", "words"),
    [
        (Script(hang=True), "timeout", f"sent no token for {FIRST_TOKEN_TIMEOUT:g} s"),
        (Script(text="a b c d", stall_after=1), "timeout", f"did not finish within {TOTAL_TIMEOUT:g} s"),
        (Script(status=500, error_message="CUDA error: out of memory"), "http_500", "CUDA error: out of memory"),
        (Script(status=503, retry_after=0.05, error_message="loading model"), "http_503", "loading model"),
        (Script(text="a b c", stream_error_after=1, error_message="KV cache full"), "stream_error", "KV cache full"),
        (Script(text="a b c", malformed_after=1), "malformed", "malformed chunk"),
        (Script(text="a b c d", drop_after=2), "incomplete", "mid-answer"),
    ],
    ids=[
        "accepts-never-answers",
        "first-token-then-stall",
        "500-with-body",
        "503-never-clears",
        "error-inside-stream",
        "malformed-sse",
        "dropped-mid-stream",
    ],
)
async def test_fault_on_one_backend(script: Script, kind: str, words: str) -> None:
    async with rig() as r:
        for name in ALPHA:
            r.alpha.script(name.lower(), script)
        task = asyncio.create_task(collect(r.engine.run("q")))
        if script.hang or script.stall_after is not None:
            await r.alpha.wait_for_requests(3)
        result = await task
        r.alpha.release()
    assert_final_and_timely(result, ALPHA, kind, words)


@pytest.mark.parametrize(
    "script",
    [
        Script(text="fine answer", status=429, retry_after=0.05, fail_times=1),
        Script(text="fine answer", status=503, retry_after=0.05, fail_times=2),
        Script(text="fine answer", no_done=True),
        Script(text="fine answer", close_connection=True),
        Script(text="fine answer", first_token_delay=FIRST_TOKEN_TIMEOUT / 2),
    ],
    ids=[
        "429-retry-after",
        "503-retry-after",
        "no-done-but-finished",
        "close-after-each-response",
        "slow-first-token-within-its-timeout",
    ],
)
async def test_recoverable_faults_still_give_answers(script: Script) -> None:
    async with rig() as r:
        for name in ALPHA:
            r.alpha.script(name.lower(), script)
        result = await collect(r.engine.run("q"))
    assert [a.fighter for a in result.answers if not a.ok] == []
    assert all(a.text == "fine answer" for a in result.answers if a.fighter in ALPHA)


async def test_backend_down_before_the_round() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    async with rig(url=f"http://127.0.0.1:{port}/v1", max_retries=0) as r:
        result = await collect(r.engine.run("q"))
    assert_final_and_timely(result, ALPHA, "connect", "refused the connection")


async def test_backend_killed_mid_stream() -> None:
    slow = Script(text="word " * 400, token_interval=0.005)
    async with rig() as r:
        for name in ALPHA:
            r.alpha.script(name.lower(), slow)
        streaming: set[str] = set()
        events = r.engine.run("q")
        result = None
        async for event in events:
            if isinstance(event, FighterToken) and event.fighter in ALPHA and len(streaming) < 3:
                streaming.add(event.fighter)
                if len(streaming) == 3:
                    await r.alpha.kill()
            if isinstance(event, CouncilFinished):
                result = event.result
    assert result is not None
    assert_final_and_timely(result, ALPHA, "incomplete", "connection broke mid-answer")


async def test_wrong_api_key_names_backend_and_variable() -> None:
    async with rig(FakeLLM(api_key="right-key"), api_key_env="ALPHA_KEY", api_key="wrong-key") as r:
        result = await collect(r.engine.run("q"))
    assert_final_and_timely(result, ALPHA, "http_401", "backend alpha rejected the API key")
    assert all("ALPHA_KEY" in a.error and "wrong-key" not in a.error for a in result.answers if not a.ok)


async def test_unknown_model_lists_what_is_served() -> None:
    async with rig(FakeLLM(models=["qwen2.5-7b-instruct"])) as r:
        result = await collect(r.engine.run("q"))
    assert_final_and_timely(result, ALPHA, "model_not_found", "(it serves: qwen2.5-7b-instruct)")


async def test_server_that_aborts_an_earlier_stream_when_a_new_request_arrives() -> None:
    # Like a server that swaps models: each new request kills one stream already running.
    async with rig(alpha_model="shared") as r:
        r.alpha.script("shared", Script(text="word " * 100, token_interval=0.01, abort_previous_on_new=True))
        result = await collect(r.engine.run("q"))
    alpha = [a for a in result.answers if a.fighter in ALPHA]
    assert any(not a.ok and a.error_kind == "incomplete" for a in alpha)
    assert any(a.ok for a in alpha), "the last request's stream is not aborted"
    assert all(a.ok for a in result.answers if a.fighter in BETA) and result.ok
