"""A scriptable fake OpenAI-compatible server over real HTTP, for tests and benchmarks.

``FakeLLM`` is an ``aiohttp.web`` app on ``127.0.0.1`` (random port) that serves
``/v1/chat/completions`` (streamed SSE or one JSON), ``/v1/models`` and ``/v1/embeddings``.
Each model gets a ``Script`` saying how to misbehave: delays, HTTP errors, hangs, stalls,
dropped connections, in-stream errors, malformed frames, reasoning, missing ``[DONE]``...
``FakeLLMThread`` runs one in a background thread for blocking callers (benchmarks).
"""

from __future__ import annotations

import asyncio
import hashlib
import itertools
import json
import math
import re
import threading
import time
from collections import defaultdict
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any, Self, TypeVar

from aiohttp import web

__all__ = ["EMBEDDING_DIM", "FakeLLM", "FakeLLMThread", "RecordedRequest", "Script", "embed"]

EMBEDDING_DIM = 64
_T = TypeVar("_T")
_BODY = web.RequestKey("fake_llm_body", object)  # the JSON body, parsed once by the wrapper
_Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


@dataclass
class Script:
    """How the fake answers one request for a model (see the field comments)."""

    text: str = "Hello from the fake model."  # the answer, streamed as deltas
    chunk_chars: int | None = None  # chunk size in characters; None = one chunk per word
    first_token_delay: float = 0.0  # seconds before the first content chunk (headers already sent)
    header_delay: float = 0.0  # seconds before the response headers are sent at all
    token_interval: float = 0.0  # seconds between content chunks
    status: int = 200  # non-200: JSON error body {"error": {"message", "type", "code"}}
    error_message: str = "fake error"
    error_code: str | None = None
    retry_after: float | None = None  # Retry-After header (seconds) on non-200 responses
    fail_times: int | None = None  # with a non-200 status: only the first N requests fail
    hang: bool = False  # never send headers (until release() / close())
    stall_after: int | None = None  # send N content chunks, then hang (until release() / close())
    drop_after: int | None = None  # send N content chunks, then abort the TCP connection
    stream_error_after: int | None = None  # send N chunks, then an error frame, close, no [DONE]
    no_done: bool = False  # end the stream cleanly without `data: [DONE]`
    malformed_after: int | None = None  # after N chunks send one `data: {not json` frame
    reasoning: str | None = None  # streamed before the answer as delta.<reasoning_field>
    reasoning_field: str = "reasoning_content"  # or "reasoning"
    think_tags: bool = False  # reasoning inline in content as "<think>…</think>" before the answer
    drop_open_think_tag: bool = False  # like think_tags, without the opening "<think>"
    usage: bool = True  # honour stream_options.include_usage with a final choices-[] usage chunk
    usage_null_choices: bool = False  # "choices": null instead of [] in the usage chunk
    close_connection: bool = False  # `Connection: close` and close after each streamed response
    keepalive_comments: bool = False  # ": keep-alive" comment lines before content chunks
    finish_reason: str = "stop"
    timings: bool = False  # llama.cpp-style "timings" object on the finishing chunk
    role_first: bool = True  # first delta carries only {"role": "assistant", "content": null}
    abort_previous_on_new: bool = False  # a new request aborts one stream of this model in flight


@dataclass
class RecordedRequest:
    path: str
    model: str | None
    body: Any  # parsed JSON, or None (GET, or a body that is not JSON)
    headers: dict[str, str]
    at: float  # time.perf_counter() on arrival


def embed(text: str) -> list[float]:
    """Deterministic bag-of-words vector: lowercase words hashed into buckets, L2-normalised."""
    vec = [0.0] * EMBEDDING_DIM
    for word in re.findall(r"\w+", text.lower()):
        # blake2b, not hash(): stable across processes (PYTHONHASHSEED)
        digest = hashlib.blake2b(word.encode(), digest_size=8).digest()
        vec[int.from_bytes(digest, "big") % EMBEDDING_DIM] += 1.0
    norm = math.sqrt(sum(v * v for v in vec))
    if norm == 0.0:  # no words: a fixed unit vector, since zero vectors break cosine distance
        return [1.0 / math.sqrt(EMBEDDING_DIM)] * EMBEDDING_DIM
    return [v / norm for v in vec]


def _split(text: str, chunk_chars: int | None) -> list[str]:
    if not text:
        return []
    if chunk_chars is None:
        return re.findall(r"\s+|\S+\s*", text)  # word plus trailing spaces; joins back exactly
    return [text[i : i + chunk_chars] for i in range(0, len(text), chunk_chars)]


def _error_type(status: int) -> str:
    if status == 401:
        return "authentication_error"
    if status == 429:
        return "rate_limit_error"
    if status >= 500:
        return "server_error"
    return "invalid_request_error"


def _error_body(message: str, status: int, code: str | None) -> dict[str, Any]:
    return {"error": {"message": message, "type": _error_type(status), "code": code}}


def _sse(payload: Any) -> bytes:
    return b"data: " + json.dumps(payload, separators=(",", ":")).encode() + b"\n\n"


class FakeLLM:
    """Scriptable OpenAI-compatible server; ``async with FakeLLM() as fake: fake.url``."""

    def __init__(
        self,
        *,
        max_parallel: int | None = None,
        default: Script | None = None,
        models: list[str] | None = None,
        api_key: str | None = None,
    ) -> None:
        self.max_parallel = max_parallel
        self.default = default
        self.models = list(models) if models is not None else None
        self.api_key = api_key
        self.requests: list[RecordedRequest] = []
        self.peak_parallel = 0
        self.in_flight = 0
        self.active = 0  # generations holding a slot right now (what peak_parallel measures)
        self.port = 0
        self.url = ""
        self._scripts: dict[str, list[Script]] = {}
        self._model_requests: defaultdict[str, int] = defaultdict(int)
        self._failures: defaultdict[tuple[str, int], int] = defaultdict(int)
        self._streams: defaultdict[str, list[asyncio.BaseTransport]] = defaultdict(list)
        self._slots = asyncio.Semaphore(max_parallel) if max_parallel else None
        self._release = asyncio.Event()
        self._changed = asyncio.Event()
        self._ids = itertools.count(1)
        self._runner: web.AppRunner | None = None
        self._site: web.TCPSite | None = None

    # -- lifecycle --------------------------------------------------------------------------

    async def start(self) -> None:
        app = web.Application()
        app.router.add_post("/v1/chat/completions", self._tracked(self._chat))
        app.router.add_get("/v1/models", self._tracked(self._list_models))
        app.router.add_post("/v1/embeddings", self._tracked(self._embeddings))
        # handler_cancellation: a client hanging up cancels its generation and frees the slot
        self._runner = web.AppRunner(app, handler_cancellation=True, access_log=None, shutdown_timeout=0.5)
        await self._runner.setup()
        self._site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await self._site.start()
        self.port = self._site.port
        self.url = f"http://127.0.0.1:{self.port}/v1"

    async def close(self) -> None:
        if self._runner is None:
            return
        await self.kill()  # nothing graceful to wait for in a fake: hangs and streams just end
        await self._runner.cleanup()
        self._runner = None

    async def __aenter__(self) -> Self:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def kill(self) -> None:
        """The backend died: stop listening and abort every open connection at once."""
        if self._site is not None:
            await self._site.stop()  # closes the listening socket: new connects are refused
            self._site = None
        if self._runner is not None and self._runner.server is not None:
            for handler in self._runner.server.connections:
                if handler.transport is not None:
                    handler.transport.abort()
        self.release()  # anything still parked on a hang/stall ends now

    stop_accepting = kill

    def release(self) -> None:
        """Wake every hang/stall so it ends (a hang closes the connection, a stall the stream)."""
        self._release.set()
        self._release = asyncio.Event()  # later hangs hang again

    # -- scripting and observation ----------------------------------------------------------

    def script(self, model: str, script: Script | list[Script]) -> None:
        """Script a model; a list gives one script per successive request, the last repeats."""
        scripts = [script] if isinstance(script, Script) else list(script)
        if not scripts:
            raise ValueError("script list must not be empty")
        self._scripts[model] = scripts
        self._model_requests[model] = 0

    @property
    def open_connections(self) -> int:
        if self._runner is None or self._runner.server is None:
            return 0
        return sum(1 for h in self._runner.server.connections if h.transport is not None)

    def reset_stats(self) -> None:
        """Forget recorded requests and the parallelism peak (e.g. between benchmark rounds)."""
        self.requests.clear()
        self.peak_parallel = self.active

    # timeout parameters (ASYNC109) are the agreed API: tests read better with them inline
    async def wait_for_requests(self, n: int, timeout: float = 5.0) -> None:  # noqa: ASYNC109
        await self._wait(lambda: len(self.requests) >= n, timeout, f"{n} requests")

    async def wait_until_idle(self, timeout: float = 5.0) -> None:  # noqa: ASYNC109
        await self._wait(lambda: self.in_flight == 0, timeout, "idle")

    async def _wait(self, done: Callable[[], bool], limit: float, what: str) -> None:
        try:
            async with asyncio.timeout(limit):
                while not done():
                    await self._changed.wait()
        except TimeoutError:
            raise TimeoutError(
                f"fake LLM not {what} after {limit}s (requests={len(self.requests)}, in_flight={self.in_flight})"
            ) from None

    def _notify(self) -> None:
        self._changed.set()
        self._changed = asyncio.Event()

    # -- request plumbing -------------------------------------------------------------------

    def _tracked(self, handler: _Handler) -> _Handler:
        async def wrapper(request: web.Request) -> web.StreamResponse:
            body: Any = None
            if request.can_read_body:
                try:
                    body = await request.json()
                except ValueError:
                    body = None
            request[_BODY] = body
            model = body.get("model") if isinstance(body, dict) else None
            self.requests.append(
                RecordedRequest(
                    path=request.path,
                    model=model if isinstance(model, str) else None,
                    body=body,
                    headers=dict(request.headers),
                    at=time.perf_counter(),
                )
            )
            self.in_flight += 1
            self._notify()
            try:
                expected = f"Bearer {self.api_key}"
                if self.api_key is not None and request.headers.get("Authorization") != expected:
                    return web.json_response(_error_body("Invalid API key", 401, "invalid_api_key"), status=401)
                return await handler(request)
            finally:
                self.in_flight -= 1
                self._notify()

        return wrapper

    def _known_models(self) -> list[str]:
        return list(dict.fromkeys([*self._scripts, *(self.models or [])]))

    def _resolve(self, model: str) -> Script | None:
        """The script for this request, or None when the model does not exist."""
        if model in self._scripts:
            scripts = self._scripts[model]
            index = min(self._model_requests[model], len(scripts) - 1)
            self._model_requests[model] += 1
            return scripts[index]
        if self.models is not None:  # an explicit list makes every other model unknown
            return (self.default or Script()) if model in self.models else None
        return self.default or Script()

    def _failure(self, model: str, script: Script) -> web.Response | None:
        if script.status == 200:
            return None
        if script.fail_times is not None:
            key = (model, id(script))
            if self._failures[key] >= script.fail_times:
                return None
            self._failures[key] += 1
        headers = {}
        if script.retry_after is not None:
            headers["Retry-After"] = f"{script.retry_after:g}"
        body = _error_body(script.error_message, script.status, script.error_code)
        return web.json_response(body, status=script.status, headers=headers)

    def _lookup(self, body: Any) -> tuple[str, Script | web.Response]:
        if not isinstance(body, dict) or not isinstance(body.get("model"), str):
            return "", web.json_response(_error_body("model is required", 400, None), status=400)
        model = body["model"]
        script = self._resolve(model)
        if script is None:
            err = _error_body(f"model '{model}' not found", 404, "model_not_found")
            return model, web.json_response(err, status=404)
        return model, self._failure(model, script) or script

    @asynccontextmanager
    async def _slot(self) -> AsyncIterator[None]:
        """One generation in progress; queues here when max_parallel slots are busy."""
        if self._slots is not None:
            await self._slots.acquire()
        self.active += 1
        self.peak_parallel = max(self.peak_parallel, self.active)
        try:
            yield
        finally:
            self.active -= 1
            if self._slots is not None:
                self._slots.release()

    async def _wait_release(self) -> None:
        await self._release.wait()

    # -- endpoints --------------------------------------------------------------------------

    async def _list_models(self, request: web.Request) -> web.StreamResponse:
        data = [{"id": m, "object": "model", "owned_by": "fake"} for m in self._known_models()]
        return web.json_response({"object": "list", "data": data})

    async def _embeddings(self, request: web.Request) -> web.StreamResponse:
        body = request[_BODY]
        model, script = self._lookup(body)
        if isinstance(script, web.Response):
            return script
        if script.header_delay:
            await asyncio.sleep(script.header_delay)
        raw = body.get("input", "")
        inputs = [raw] if isinstance(raw, str) else [str(x) for x in raw]
        data = [{"object": "embedding", "index": i, "embedding": embed(text)} for i, text in enumerate(inputs)]
        tokens = sum(len(t) for t in inputs) // 4
        usage = {"prompt_tokens": tokens, "total_tokens": tokens}
        return web.json_response({"object": "list", "data": data, "model": model, "usage": usage})

    async def _chat(self, request: web.Request) -> web.StreamResponse:
        body = request[_BODY]
        model, script = self._lookup(body)
        if isinstance(script, web.Response):
            return script
        if script.abort_previous_on_new and self._streams[model]:
            self._streams[model][0].abort()  # like a server swapping models under a live stream
        async with self._slot():
            if script.header_delay:
                await asyncio.sleep(script.header_delay)
            if script.hang:
                await self._wait_release()
                _abort(request)
                return web.Response()
            if not body.get("stream"):
                return await self._complete(request, model, script, body)
            transport = request.transport
            if transport is not None:
                self._streams[model].append(transport)
            try:
                return await self._stream(request, model, script, body)
            except ConnectionResetError:  # the client (or kill/abort_previous_on_new) hung up
                return web.Response()
            finally:
                if transport is not None:
                    self._streams[model].remove(transport)

    def _pieces(self, script: Script) -> list[tuple[str, str]]:
        """(delta field, text) for every content chunk: reasoning first, then the answer."""
        pieces: list[tuple[str, str]] = []
        if script.think_tags or script.drop_open_think_tag:
            if not script.drop_open_think_tag:
                pieces.append(("content", "<think>"))
            pieces += [("content", p) for p in _split(script.reasoning or "", script.chunk_chars)]
            pieces.append(("content", "</think>"))
        elif script.reasoning is not None:
            field = script.reasoning_field
            pieces += [(field, p) for p in _split(script.reasoning, script.chunk_chars)]
        pieces += [("content", p) for p in _split(script.text, script.chunk_chars)]
        return pieces

    def _usage(self, body: dict[str, Any], completion_tokens: int) -> dict[str, int]:
        messages = body.get("messages") or []
        chars = 0
        for message in messages:
            content = message.get("content") if isinstance(message, dict) else None
            if isinstance(content, str):
                chars += len(content)
            elif isinstance(content, list):  # multi-part content: count the text parts
                chars += sum(len(p.get("text", "")) for p in content if isinstance(p, dict))
        prompt = chars // 4
        return {
            "prompt_tokens": prompt,
            "completion_tokens": completion_tokens,
            "total_tokens": prompt + completion_tokens,
        }

    @staticmethod
    def _timings(prompt: int, predicted: int, elapsed_ms: float) -> dict[str, float]:
        per_token = elapsed_ms / predicted if predicted else 0.0
        return {
            "prompt_n": prompt,
            "prompt_ms": 1.0,
            "prompt_per_token_ms": 1.0 / prompt if prompt else 0.0,
            "prompt_per_second": prompt * 1000.0,
            "predicted_n": predicted,
            "predicted_ms": elapsed_ms,
            "predicted_per_token_ms": per_token,
            "predicted_per_second": 1000.0 / per_token if per_token else 0.0,
        }

    async def _complete(
        self, request: web.Request, model: str, script: Script, body: dict[str, Any]
    ) -> web.StreamResponse:
        pieces = self._pieces(script)
        started = time.perf_counter()
        # the whole generation time, as a non-streaming server would spend it
        delay = script.first_token_delay + script.token_interval * max(len(pieces) - 1, 0)
        if delay:
            await asyncio.sleep(delay)
        if script.stall_after is not None:
            await self._wait_release()
        if script.drop_after is not None or script.stall_after is not None:
            _abort(request)
            return web.Response()
        content = "".join(text for field, text in pieces if field == "content")
        message: dict[str, Any] = {"role": "assistant", "content": content}
        reasoning = "".join(text for field, text in pieces if field != "content")
        if reasoning:
            message[script.reasoning_field] = reasoning
        usage = self._usage(body, len(pieces))
        payload: dict[str, Any] = {
            "id": f"chatcmpl-fake-{next(self._ids)}",
            "object": "chat.completion",
            "created": int(time.time()),
            "model": model,
            "choices": [{"index": 0, "message": message, "finish_reason": script.finish_reason}],
            "usage": usage,
        }
        if script.timings:
            elapsed = (time.perf_counter() - started) * 1000.0
            payload["timings"] = self._timings(usage["prompt_tokens"], len(pieces), elapsed)
        return web.json_response(payload)

    async def _stream(
        self, request: web.Request, model: str, script: Script, body: dict[str, Any]
    ) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"})
        if script.close_connection:
            response.headers["Connection"] = "close"
            response.force_close()
        await response.prepare(request)  # StreamResponse flushes the headers right here
        started = time.perf_counter()
        chunk_id = f"chatcmpl-fake-{next(self._ids)}"
        created = int(time.time())

        def chunk(delta: dict[str, Any], finish: str | None = None) -> dict[str, Any]:
            choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}
            return {
                "id": chunk_id,
                "object": "chat.completion.chunk",
                "created": created,
                "model": model,
                "choices": [choice],
            }

        if script.role_first:
            await response.write(_sse(chunk({"role": "assistant", "content": None})))
        pieces = self._pieces(script)
        for i in range(len(pieces) + 1):  # i == len(pieces): the "after N" points at the very end
            if i == script.stall_after:
                await self._wait_release()
                await response.write_eof()
                return response
            if i == script.drop_after:
                _abort(request)
                return response
            if i == script.stream_error_after:
                err = _error_body(script.error_message, script.status, script.error_code)
                await response.write(_sse(err))
                await response.write_eof()
                return response
            if i == script.malformed_after:
                await response.write(b"data: {not json\n\n")
            if i == len(pieces):
                break
            delay = script.first_token_delay if i == 0 else script.token_interval
            if delay:
                await asyncio.sleep(delay)
            if script.keepalive_comments:
                await response.write(b": keep-alive\n\n")
            field, text = pieces[i]
            await response.write(_sse(chunk({field: text})))

        usage = self._usage(body, len(pieces))
        final = chunk({}, script.finish_reason)
        if script.timings:
            elapsed = (time.perf_counter() - started) * 1000.0
            final["timings"] = self._timings(usage["prompt_tokens"], len(pieces), elapsed)
        await response.write(_sse(final))
        options = body.get("stream_options")
        if script.usage and isinstance(options, dict) and options.get("include_usage"):
            usage_chunk = chunk({})
            usage_chunk["choices"] = None if script.usage_null_choices else []
            usage_chunk["usage"] = usage
            await response.write(_sse(usage_chunk))
        if not script.no_done:
            await response.write(b"data: [DONE]\n\n")
        await response.write_eof()
        return response


def _abort(request: web.Request) -> None:
    if request.transport is not None:
        request.transport.abort()


class FakeLLMThread:
    """A FakeLLM on its own event loop in a daemon thread, for blocking code (benchmarks).

    ``with FakeLLMThread(max_parallel=1) as fake: fake.script(...); call(fake.url)``.
    Methods hop onto the server's loop, so they are safe to call from any thread.
    """

    def __init__(self, **kwargs: Any) -> None:
        self._kwargs = kwargs
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self.fake: FakeLLM | None = None

    def start(self) -> None:
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="FakeLLMThread", daemon=True)
        self._thread.start()

        async def create() -> FakeLLM:
            fake = FakeLLM(**self._kwargs)  # built on the loop that will serve it
            await fake.start()
            return fake

        self.fake = self._run(create())

    def close(self) -> None:
        if self._loop is None or self._thread is None:
            return
        if self.fake is not None:
            self._run(self.fake.close())
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join()
        self._loop.close()
        self._loop = self._thread = None

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _run(self, coro: Coroutine[Any, Any, _T], timeout: float | None = None) -> _T:
        assert self._loop is not None, "FakeLLMThread not started"
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(timeout)

    def _call(self, fn: Callable[..., _T], *args: Any) -> _T:
        async def on_loop() -> _T:
            return fn(*args)

        return self._run(on_loop())

    @property
    def _server(self) -> FakeLLM:
        assert self.fake is not None, "FakeLLMThread not started"
        return self.fake

    @property
    def url(self) -> str:
        return self._server.url

    @property
    def port(self) -> int:
        return self._server.port

    @property
    def requests(self) -> list[RecordedRequest]:
        return self._call(lambda: list(self._server.requests))  # a snapshot, copied on the loop

    @property
    def peak_parallel(self) -> int:
        return self._server.peak_parallel

    @property
    def in_flight(self) -> int:
        return self._server.in_flight

    @property
    def open_connections(self) -> int:
        return self._call(lambda: self._server.open_connections)

    def script(self, model: str, script: Script | list[Script]) -> None:
        self._call(self._server.script, model, script)

    def release(self) -> None:
        self._call(self._server.release)

    def reset_stats(self) -> None:
        self._call(self._server.reset_stats)

    def kill(self) -> None:
        self._run(self._server.kill())

    stop_accepting = kill

    def wait_for_requests(self, n: int, timeout: float = 5.0) -> None:
        self._run(self._server.wait_for_requests(n, timeout))

    def wait_until_idle(self, timeout: float = 5.0) -> None:
        self._run(self._server.wait_until_idle(timeout))
