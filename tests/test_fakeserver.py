"""The fake OpenAI server's wire format, checked with raw aiohttp (not the project's client)."""

import asyncio
import json
import math
from typing import Any

import aiohttp
import pytest

from tests.fakeserver import FakeLLM, FakeLLMThread, Script

Frames = list[Any]  # parsed JSON frames, plus "[DONE]" and raw strings for unparsable ones


async def stream_frames(url: str, model: str, **extra: Any) -> Frames:
    """POST a streamed chat request and return every `data:` frame in order."""
    body = {"model": model, "messages": [{"role": "user", "content": "hi there"}], "stream": True}
    frames: Frames = []
    async with (
        aiohttp.ClientSession() as session,
        session.post(f"{url}/chat/completions", json=body | extra) as resp,
    ):
        assert resp.status == 200, await resp.text()
        assert resp.headers["Content-Type"].startswith("text/event-stream")
        async for raw in resp.content:
            line = raw.decode().rstrip("\n")
            if not line.startswith("data: "):
                continue
            data = line.removeprefix("data: ")
            if data == "[DONE]":
                frames.append(data)
                continue
            try:
                frames.append(json.loads(data))
            except ValueError:
                frames.append(data)
    return frames


def content_of(frames: Frames, field: str = "content") -> str:
    return "".join(
        f["choices"][0]["delta"].get(field) or "" for f in frames if isinstance(f, dict) and f.get("choices")
    )


async def test_stream_framing(fake_llm: FakeLLM) -> None:
    fake_llm.script("m", Script(text="one two three", timings=True))
    frames = await stream_frames(fake_llm.url, "m")
    assert frames[-1] == "[DONE]"
    chunks = frames[:-1]
    assert all(c["object"] == "chat.completion.chunk" and c["model"] == "m" for c in chunks)
    assert len({c["id"] for c in chunks}) == 1
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": None}
    assert [c["choices"][0]["delta"].get("content") for c in chunks[1:4]] == [
        "one ",
        "two ",
        "three",
    ]
    assert chunks[-1]["choices"][0]["finish_reason"] == "stop"
    assert chunks[-1]["timings"]["predicted_n"] == 3
    assert fake_llm.requests[0].body["messages"][0]["content"] == "hi there"
    assert fake_llm.requests[0].path == "/v1/chat/completions"


async def test_usage_chunk(fake_llm: FakeLLM) -> None:
    fake_llm.script("m", Script(text="abcdef", chunk_chars=2))
    frames = await stream_frames(fake_llm.url, "m", stream_options={"include_usage": True})
    assert content_of(frames) == "abcdef"
    usage_chunk = frames[-2]
    assert usage_chunk["choices"] == []
    # 3 content chunks; "hi there" is 8 chars -> 2 prompt tokens
    assert usage_chunk["usage"] == {"prompt_tokens": 2, "completion_tokens": 3, "total_tokens": 5}
    frames = await stream_frames(fake_llm.url, "m")  # not asked for: no usage chunk
    assert not any("usage" in f for f in frames if isinstance(f, dict))


async def test_non_streaming_and_models(fake_llm: FakeLLM) -> None:
    fake_llm.script("m", Script(text="plain answer", reasoning="hmm"))
    async with aiohttp.ClientSession() as session:
        body = {"model": "m", "messages": [{"role": "user", "content": "q"}]}
        async with session.post(f"{fake_llm.url}/chat/completions", json=body) as resp:
            data = await resp.json()
        async with session.get(f"{fake_llm.url}/models") as resp:
            models = await resp.json()
    assert data["object"] == "chat.completion"
    assert data["choices"][0]["message"]["content"] == "plain answer"
    assert data["choices"][0]["message"]["reasoning_content"] == "hmm"
    assert data["usage"]["completion_tokens"] == 3
    assert models == {"object": "list", "data": [{"id": "m", "object": "model", "owned_by": "fake"}]}


async def test_unknown_model_404_and_auth() -> None:
    async with (
        FakeLLM(models=["known"], api_key="sekrit") as fake,
        aiohttp.ClientSession() as session,
    ):
        url = f"{fake.url}/chat/completions"
        body = {"model": "nope", "messages": [], "stream": True}
        async with session.post(url, json=body) as resp:
            assert resp.status == 401
            assert (await resp.json())["error"]["message"] == "Invalid API key"
        auth = {"Authorization": "Bearer sekrit"}
        async with session.post(url, json=body, headers=auth) as resp:
            assert resp.status == 404
            err = (await resp.json())["error"]
        assert err["message"] == "model 'nope' not found"
        assert err["code"] == "model_not_found"
        async with session.post(url, json=body | {"model": "known"}, headers=auth) as resp:
            assert resp.status == 200


async def test_429_retry_after_then_success(fake_llm: FakeLLM) -> None:
    fake_llm.script("m", Script(text="ok", status=429, retry_after=2, fail_times=1))
    async with aiohttp.ClientSession() as session:
        body = {"model": "m", "messages": [], "stream": True}
        async with session.post(f"{fake_llm.url}/chat/completions", json=body) as resp:
            assert resp.status == 429
            assert resp.headers["Retry-After"] == "2"
            assert (await resp.json())["error"]["type"] == "rate_limit_error"
    assert content_of(await stream_frames(fake_llm.url, "m")) == "ok"


@pytest.mark.parametrize(("max_parallel", "peak"), [(1, 1), (None, 3)])
async def test_max_parallel(max_parallel: int | None, peak: int) -> None:
    async with FakeLLM(max_parallel=max_parallel, default=Script(first_token_delay=0.1)) as fake:
        results = await asyncio.gather(*(stream_frames(fake.url, f"m{i}") for i in range(3)))
        assert all(frames[-1] == "[DONE]" for frames in results)
        assert fake.peak_parallel == peak
        await fake.wait_until_idle()


async def test_think_tags_and_reasoning_field(fake_llm: FakeLLM) -> None:
    fake_llm.script("t", Script(text="answer", reasoning="pondering it", think_tags=True))
    frames = await stream_frames(fake_llm.url, "t")
    assert content_of(frames) == "<think>pondering it</think>answer"
    fake_llm.script("d", Script(text="answer", reasoning="x", drop_open_think_tag=True))
    assert content_of(await stream_frames(fake_llm.url, "d")) == "x</think>answer"
    fake_llm.script("r", Script(text="answer", reasoning="why", reasoning_field="reasoning"))
    frames = await stream_frames(fake_llm.url, "r")
    assert content_of(frames, "reasoning") == "why"
    assert content_of(frames) == "answer"


async def test_drop_after_aborts(fake_llm: FakeLLM) -> None:
    fake_llm.script("m", Script(text="a b c d", drop_after=2))
    with pytest.raises(aiohttp.ClientPayloadError):
        await stream_frames(fake_llm.url, "m")
    await fake_llm.wait_until_idle()


async def test_stream_error_malformed_and_no_done(fake_llm: FakeLLM) -> None:
    fake_llm.script("e", Script(text="a b c", stream_error_after=1, error_message="boom"))
    frames = await stream_frames(fake_llm.url, "e")
    assert frames[-1] == {"error": {"message": "boom", "type": "invalid_request_error", "code": None}}
    assert "[DONE]" not in frames
    fake_llm.script("x", Script(text="a b", malformed_after=1))
    assert "{not json" in await stream_frames(fake_llm.url, "x")
    fake_llm.script("n", Script(text="a b", no_done=True))
    frames = await stream_frames(fake_llm.url, "n")
    assert content_of(frames) == "a b"
    assert "[DONE]" not in frames


async def test_hang_until_release(fake_llm: FakeLLM) -> None:
    fake_llm.script("m", Script(hang=True))
    task = asyncio.create_task(stream_frames(fake_llm.url, "m"))
    await fake_llm.wait_for_requests(1)
    assert not task.done()
    fake_llm.release()
    with pytest.raises(aiohttp.ClientError):
        await task


async def test_kill_refuses_new_connections(fake_llm: FakeLLM) -> None:
    fake_llm.script("m", Script(stall_after=1))
    task = asyncio.create_task(stream_frames(fake_llm.url, "m"))
    await fake_llm.wait_for_requests(1)
    assert fake_llm.open_connections == 1
    await fake_llm.kill()
    with pytest.raises(aiohttp.ClientError):
        await task
    with pytest.raises(aiohttp.ClientConnectorError):
        await stream_frames(fake_llm.url, "m")


async def test_embeddings_are_deterministic_and_similar(fake_llm: FakeLLM) -> None:
    texts = ["The cat sat on the mat", "the CAT sat on a mat", "quarterly tax filing deadline"]
    async with (
        aiohttp.ClientSession() as session,
        session.post(f"{fake_llm.url}/embeddings", json={"model": "e", "input": texts}) as resp,
    ):
        vectors = [d["embedding"] for d in (await resp.json())["data"]]
    assert all(len(v) == 64 and math.isclose(sum(x * x for x in v), 1.0) for v in vectors)

    def cos(a: list[float], b: list[float]) -> float:
        return sum(x * y for x, y in zip(a, b, strict=True))

    assert cos(vectors[0], vectors[1]) > 0.7 > cos(vectors[0], vectors[2])


def test_thread_helper_from_blocking_code() -> None:
    async def fetch(url: str) -> str:
        return content_of(await stream_frames(url, "m"))

    with FakeLLMThread(max_parallel=1) as fake:
        fake.script("m", Script(text="from a thread"))
        assert asyncio.run(fetch(fake.url)) == "from a thread"
        assert len(fake.requests) == 1
        fake.wait_until_idle()
