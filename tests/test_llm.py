"""The OpenAI-compatible client against a real HTTP fake server."""

from __future__ import annotations

import asyncio
import socket

import pytest

from bot.llm import (
    AuthError,
    BackendUnreachable,
    Delta,
    HTTPStatusError,
    IncompleteStream,
    LLMClient,
    LLMTimeout,
    MalformedChunk,
    ModelNotFound,
    Overloaded,
    StreamError,
    ThinkSplitter,
    make_session,
)
from tests.factories import make_backend
from tests.fakeserver import FakeLLM, Script

MESSAGES = [{"role": "user", "content": "hi"}]


async def stream_all(client: LLMClient, model: str, backend: str = "fake") -> tuple[str, str, list[Delta]]:
    answer, reasoning, deltas = "", "", []
    async for d in client.stream_chat(backend, model, MESSAGES, temperature=0.1, max_tokens=50):
        deltas.append(d)
        answer = ("" if d.reset else answer) + d.content
        reasoning += d.reasoning
    return answer, reasoning, deltas


@pytest.fixture
async def client(fake_llm: FakeLLM):
    async with make_session() as session:
        yield LLMClient(session, {"fake": make_backend(fake_llm.url, first_token_timeout_s=2.0, total_timeout_s=4.0)})


async def test_streams_answer_with_usage_and_finish_reason(fake_llm: FakeLLM, client: LLMClient) -> None:
    fake_llm.script("m", Script(text="The answer is forty two."))
    answer, reasoning, deltas = await stream_all(client, "m")
    assert answer == "The answer is forty two."
    assert reasoning == ""
    end = deltas[-1]
    assert end.done and end.finish_reason == "stop"
    assert end.completion_tokens == 5  # the fake counts one token per word
    body = fake_llm.requests[-1].body
    assert body["stream"] is True and body["stream_options"] == {"include_usage": True}
    assert body["temperature"] == 0.1 and body["max_tokens"] == 50


@pytest.mark.parametrize("field", ["reasoning_content", "reasoning"])
async def test_reasoning_fields_are_kept_apart(fake_llm: FakeLLM, client: LLMClient, field: str) -> None:
    fake_llm.script("m", Script(text="Use ext4.", reasoning="Let me think about ZFS.", reasoning_field=field))
    answer, reasoning, _ = await stream_all(client, "m")
    assert answer == "Use ext4."
    assert reasoning == "Let me think about ZFS."


async def test_inline_think_tags_are_kept_apart(fake_llm: FakeLLM, client: LLMClient) -> None:
    fake_llm.script("m", Script(text="Use ext4.", reasoning="hmm, ZFS wants RAM", think_tags=True, chunk_chars=3))
    answer, reasoning, _ = await stream_all(client, "m")
    assert answer == "Use ext4."
    assert reasoning == "hmm, ZFS wants RAM"


async def test_think_without_opening_tag_is_reclassified(fake_llm: FakeLLM, client: LLMClient) -> None:
    fake_llm.script(
        "m", Script(text="Use ext4.", reasoning="hmm, ZFS wants RAM", drop_open_think_tag=True, chunk_chars=4)
    )
    answer, reasoning, deltas = await stream_all(client, "m")
    assert answer == "Use ext4."
    assert "ZFS wants RAM" in reasoning
    assert any(d.reset for d in deltas), "the consumer must be told to drop what it streamed"


@pytest.mark.parametrize(
    ("chunks", "answer", "reasoning"),
    [
        (["<thi", "nk>a", "b</th", "ink>\nc"], "c", "ab"),
        (["  <think>x</think>y"], "y", "x"),
        (["plain ", "text <b>"], "plain text <b>", ""),
        (["x</think>", "y"], "y", "x"),
        (["<think>never closed"], "", "never closed"),
        (["<", "3 you"], "<3 you", ""),
    ],
)
def test_think_splitter(chunks: list[str], answer: str, reasoning: str) -> None:
    s = ThinkSplitter()
    got_a, got_r = "", ""
    for c in chunks:
        a, r, reset = s.feed(c)
        got_a = ("" if reset else got_a) + a
        got_r += r
    a, r = s.flush()
    assert (got_a + a, got_r + r) == (answer, reasoning)


async def test_usage_chunk_with_null_choices(fake_llm: FakeLLM, client: LLMClient) -> None:
    fake_llm.script("m", Script(text="ok then", usage_null_choices=True, keepalive_comments=True, timings=True))
    answer, _, deltas = await stream_all(client, "m")
    assert answer == "ok then"
    assert deltas[-1].completion_tokens == 2


async def test_connection_closed_after_every_response_is_retried_safely(fake_llm: FakeLLM, client: LLMClient) -> None:
    fake_llm.script("m", Script(text="fresh connection", close_connection=True))
    for _ in range(3):  # the pooled connection is dead each time; the client must not fail
        answer, _, _ = await stream_all(client, "m")
        assert answer == "fresh connection"


async def test_429_with_retry_after_then_success(fake_llm: FakeLLM, client: LLMClient) -> None:
    fake_llm.script("m", Script(text="finally", status=429, retry_after=0.05, fail_times=2, error_message="slow down"))
    answer, _, _ = await stream_all(client, "m")
    assert answer == "finally"
    assert len([r for r in fake_llm.requests if r.model == "m"]) == 3


async def test_503_that_never_clears_says_busy(fake_llm: FakeLLM, client: LLMClient) -> None:
    fake_llm.script("m", Script(status=503, retry_after=0.01, error_message="model is loading"))
    with pytest.raises(Overloaded) as info:
        await stream_all(client, "m")
    assert "busy" in str(info.value) and "model is loading" in str(info.value)
    assert len(fake_llm.requests) == 3  # the first try and max_retries=2


async def test_500_is_not_retried_and_carries_the_servers_message(fake_llm: FakeLLM, client: LLMClient) -> None:
    fake_llm.script("m", Script(status=500, error_message="CUDA out of memory"))
    with pytest.raises(HTTPStatusError) as info:
        await stream_all(client, "m")
    assert info.value.status == 500
    assert "CUDA out of memory" in str(info.value)
    assert len(fake_llm.requests) == 1


async def test_unknown_model_lists_what_the_server_serves() -> None:
    async with FakeLLM(models=["qwen2.5-7b", "llama-3.1-8b"]) as fake, make_session() as session:
        client = LLMClient(session, {"fake": make_backend(fake.url)})
        with pytest.raises(ModelNotFound) as info:
            await stream_all(client, "gpt-5")
    msg = str(info.value)
    assert "'gpt-5'" in msg and "qwen2.5-7b" in msg and "llama-3.1-8b" in msg
    assert info.value.available == ["qwen2.5-7b", "llama-3.1-8b"]


async def test_wrong_api_key_names_the_env_var() -> None:
    async with FakeLLM(api_key="right") as fake, make_session() as session:
        backend = make_backend(fake.url, api_key_env="FAKE_KEY", api_key="wrong")
        client = LLMClient(session, {"fake": backend})
        with pytest.raises(AuthError) as info:
            await stream_all(client, "m")
        assert "FAKE_KEY" in str(info.value) and "wrong" not in str(info.value)
        ok = LLMClient(session, {"fake": make_backend(fake.url, api_key="right")})
        answer, _, _ = await stream_all(ok, "m")
    assert answer


async def test_error_inside_the_stream(fake_llm: FakeLLM, client: LLMClient) -> None:
    fake_llm.script("m", Script(text="one two three", stream_error_after=1, error_message="context length exceeded"))
    with pytest.raises(StreamError, match="context length exceeded"):
        await stream_all(client, "m")


async def test_stream_without_done_but_finished_is_accepted(fake_llm: FakeLLM, client: LLMClient) -> None:
    fake_llm.script("m", Script(text="complete answer", no_done=True))
    answer, _, deltas = await stream_all(client, "m")
    assert answer == "complete answer" and deltas[-1].finish_reason == "stop"


async def test_stream_cut_before_finishing_is_incomplete(fake_llm: FakeLLM, client: LLMClient) -> None:
    fake_llm.script("m", Script(text="one two three four", stall_after=2))
    task = asyncio.create_task(stream_all(client, "m"))
    await fake_llm.wait_for_requests(1)
    await asyncio.sleep(0)  # let the stall begin; release() then ends the stream without [DONE]
    fake_llm.release()
    with pytest.raises((IncompleteStream, LLMTimeout)) as info:
        await task
    assert "m on backend fake" in str(info.value)


async def test_dropped_connection_mid_stream(fake_llm: FakeLLM, client: LLMClient) -> None:
    fake_llm.script("m", Script(text="one two three four", drop_after=2))
    with pytest.raises(IncompleteStream, match=r"broke mid-answer|stopped mid-answer"):
        await stream_all(client, "m")


async def test_malformed_chunk(fake_llm: FakeLLM, client: LLMClient) -> None:
    fake_llm.script("m", Script(text="one two", malformed_after=1))
    with pytest.raises(MalformedChunk, match="malformed chunk"):
        await stream_all(client, "m")


async def test_first_token_timeout_names_the_phase(fake_llm: FakeLLM) -> None:
    fake_llm.script("m", Script(hang=True))
    async with make_session() as session:
        client = LLMClient(session, {"fake": make_backend(fake_llm.url, first_token_timeout_s=0.2)})
        with pytest.raises(LLMTimeout) as info:
            await stream_all(client, "m")
    assert info.value.phase == "first_token"
    assert "sent no token for 0.2 s" in str(info.value)


async def test_stall_after_first_token_hits_the_total_timeout(fake_llm: FakeLLM) -> None:
    fake_llm.script("m", Script(text="a b c", stall_after=1))
    async with make_session() as session:
        client = LLMClient(session, {"fake": make_backend(fake_llm.url, total_timeout_s=0.3)})
        with pytest.raises(LLMTimeout) as info:
            await stream_all(client, "m")
    assert info.value.phase == "total"
    assert "did not finish within 0.3 s" in str(info.value)


async def test_connection_refused_says_is_the_server_running() -> None:
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    async with make_session() as session:
        client = LLMClient(session, {"fake": make_backend(f"http://127.0.0.1:{port}/v1", max_retries=1)})
        with pytest.raises(BackendUnreachable) as info:
            await stream_all(client, "m")
    assert f"refused the connection at http://127.0.0.1:{port}/v1" in str(info.value)
    assert "is the server running?" in str(info.value)


async def test_name_not_resolved() -> None:
    async with make_session() as session:
        client = LLMClient(session, {"fake": make_backend("http://no-such-host.invalid:1234/v1")})
        with pytest.raises(BackendUnreachable, match="could not be resolved"):
            await stream_all(client, "m")


async def test_max_concurrency_is_respected() -> None:
    async with FakeLLM(default=Script(text="a b c d", token_interval=0.01)) as fake, make_session() as session:
        client = LLMClient(session, {"fake": make_backend(fake.url, max_concurrency=2)})
        await asyncio.gather(*(stream_all(client, f"m{i}") for i in range(6)))
        assert fake.peak_parallel == 2


async def test_closing_the_stream_early_releases_the_connection(fake_llm: FakeLLM) -> None:
    fake_llm.script("m", Script(text="a " * 200, token_interval=0.01))
    async with make_session() as session:
        client = LLMClient(session, {"fake": make_backend(fake_llm.url, max_concurrency=1)})
        stream = client.stream_chat("fake", "m", MESSAGES)
        first = await anext(stream)
        assert first.content
        await stream.aclose()
        await fake_llm.wait_until_idle()
        # the slot is free again: a second request goes through at once
        answer, _, _ = await stream_all(client, "short")
    assert answer


async def test_list_models(fake_llm: FakeLLM, client: LLMClient) -> None:
    fake_llm.script("alpha", Script())
    assert "alpha" in await client.list_models("fake")


async def test_timed_out_streams_are_not_kept_alive(fake_llm: FakeLLM) -> None:
    # Regression: a deadline hit mid-read used to surface aiohttp's one shared "Connection closed"
    # error, whose traceback kept every timed-out stream (response, frames, buffers) alive for good.
    import gc

    import aiohttp

    fake_llm.script("m", Script(text="a b c", stall_after=1))
    async with make_session() as session:
        client = LLMClient(session, {"fake": make_backend(fake_llm.url, total_timeout_s=0.05)})
        for _ in range(5):
            with pytest.raises(LLMTimeout):
                await stream_all(client, "m")
    fake_llm.release()
    gc.collect()
    assert [o for o in gc.get_objects() if isinstance(o, aiohttp.ClientResponse)] == []
