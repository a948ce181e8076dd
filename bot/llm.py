"""A small streaming client for OpenAI-compatible servers, on aiohttp.

Errors, from the most general::

    LLMError                      any failure talking to a backend; str() is a sentence a user can act on
    ├── BackendUnreachable        nothing answered: connection refused, name not resolved, TLS, reset
    ├── LLMTimeout                .phase: "connect", "first_token" or "total"
    ├── HTTPStatusError           the server answered with an error status; .status, .server_message
    │   ├── AuthError             401/403: wrong or missing API key
    │   ├── ModelNotFound         the server does not serve the model; .available lists what it does
    │   └── Overloaded            429/503 still failing after the retries; .retry_after
    └── BadStream                 the response started but could not be used
        ├── StreamError           the server sent an error inside the stream
        ├── IncompleteStream      the stream stopped before it finished (no [DONE], connection dropped)
        └── MalformedChunk        a frame that is not the JSON it should be

Retries happen only while nothing has been received: connect errors, 429/503 (honouring
Retry-After) and a pooled connection that the server had already closed.
"""

from __future__ import annotations

import asyncio
import json
import logging
import random
import socket
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from contextlib import aclosing
from dataclasses import dataclass
from typing import Any

import aiohttp

from bot.config import Backend

log = logging.getLogger(__name__)

USER_AGENT = "shenron/0.1 (+aiohttp)"
MAX_RETRY_AFTER_S = 30.0
MAX_ERROR_CHARS = 300


# --- errors -----------------------------------------------------------------------------------


class LLMError(Exception):
    kind = "error"

    def __init__(self, message: str, *, backend: str = "", model: str = "") -> None:
        super().__init__(message)
        self.backend, self.model = backend, model


class BackendUnreachable(LLMError):
    kind = "connect"


class LLMTimeout(LLMError):
    kind = "timeout"

    def __init__(self, message: str, *, phase: str, seconds: float, **kw: Any) -> None:
        super().__init__(message, **kw)
        self.phase, self.seconds = phase, seconds


class HTTPStatusError(LLMError):
    def __init__(self, message: str, *, status: int, server_message: str = "", **kw: Any) -> None:
        super().__init__(message, **kw)
        self.status, self.server_message = status, server_message

    @property
    def kind(self) -> str:  # type: ignore[override]
        return f"http_{self.status}"


class AuthError(HTTPStatusError):
    pass


class ModelNotFound(HTTPStatusError):
    def __init__(self, message: str, *, available: Sequence[str] = (), **kw: Any) -> None:
        super().__init__(message, **kw)
        self.available = list(available)

    @property
    def kind(self) -> str:  # type: ignore[override]
        return "model_not_found"


class Overloaded(HTTPStatusError):
    def __init__(self, message: str, *, retry_after: float | None = None, **kw: Any) -> None:
        super().__init__(message, **kw)
        self.retry_after = retry_after


class BadStream(LLMError):
    kind = "bad_stream"


class StreamError(BadStream):
    kind = "stream_error"


class IncompleteStream(BadStream):
    kind = "incomplete"


class MalformedChunk(BadStream):
    kind = "malformed"


# --- stream pieces ----------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Delta:
    """One step of a streamed reply.

    ``content`` and ``reasoning`` are new text. ``reset`` means the content streamed so far was in
    fact reasoning (a bare ``</think>`` arrived): drop it. The last Delta has ``done=True`` with the
    finish reason and usage.
    """

    content: str = ""
    reasoning: str = ""
    reset: bool = False
    pieces: int = 1  # how many streamed chunks this Delta carries (a token count when usage is absent)
    done: bool = False
    finish_reason: str | None = None
    prompt_tokens: int | None = None
    completion_tokens: int | None = None


class ThinkSplitter:
    """Separates inline ``<think>…</think>`` reasoning from the answer in streamed content.

    Handles tags split across chunks and a closing tag whose opening tag the chat template ate:
    content is streamed optimistically and, if a bare ``</think>`` shows up, everything before it
    is reclassified as reasoning (the caller gets ``reset``).
    """

    OPEN, CLOSE = "<think>", "</think>"

    def __init__(self) -> None:
        # Answer text streamed so far, kept only while a bare </think> could still make it reasoning.
        self._streamed: list[str] = []
        self._pending = ""  # text that may be the start of a tag
        self._state = "start"  # start -> (think | answer); answer may still see a bare </think>
        self._seen_close = False

    def feed(self, text: str) -> tuple[str, str, bool]:
        """Returns (answer_text, reasoning_text, reset) produced by this piece."""
        if self._state == "answer" and not self._pending and (self._seen_close or "<" not in text):
            # The hot path: plain answer text. Every prefix of "</think>" starts with "<".
            if not self._seen_close:
                self._streamed.append(text)
            return text, "", False
        buf = self._pending + text
        self._pending = ""
        out_answer: list[str] = []
        out_reason: list[str] = []
        reset = False
        while buf:
            if self._state == "start":
                stripped = buf.lstrip()
                if not stripped:
                    self._pending = buf
                    break
                if stripped.startswith(self.OPEN):
                    self._state = "think"
                    buf = stripped[len(self.OPEN) :]
                    continue
                if self.OPEN.startswith(stripped):  # maybe the tag is still arriving
                    self._pending = buf
                    break
                self._state = "answer"
                continue
            if self._state == "think":
                idx = buf.find(self.CLOSE)
                if idx >= 0:
                    out_reason.append(buf[:idx])
                    buf = buf[idx + len(self.CLOSE) :].lstrip("\n")
                    self._state, self._seen_close = "answer", True
                    continue
                keep = _partial_suffix(buf, self.CLOSE)
                out_reason.append(buf[: len(buf) - keep])
                self._pending = buf[len(buf) - keep :]
                break
            # answer
            if self._seen_close:
                out_answer.append(buf)
                break
            idx = buf.find(self.CLOSE)
            if idx >= 0:
                # A closing tag with no opening one: all the "answer" so far was reasoning.
                out_reason.append("".join(self._streamed) + "".join(out_answer) + buf[:idx])
                self._streamed.clear()
                out_answer.clear()
                reset = True
                buf = buf[idx + len(self.CLOSE) :].lstrip("\n")
                self._seen_close = True
                continue
            keep = _partial_suffix(buf, self.CLOSE)
            out_answer.append(buf[: len(buf) - keep])
            self._pending = buf[len(buf) - keep :]
            break
        a, r = "".join(out_answer), "".join(out_reason)
        if a and not self._seen_close:
            self._streamed.append(a)
        return a, r, reset

    def flush(self) -> tuple[str, str]:
        """End of stream: whatever was held back goes where the state says."""
        pending, self._pending = self._pending, ""
        if self._state == "think":
            return "", pending
        if self._state == "start":
            pending = pending.strip()
        return pending, ""


def _partial_suffix(text: str, tag: str) -> int:
    """Length of the longest suffix of text that is a proper prefix of tag."""
    for n in range(min(len(tag) - 1, len(text)), 0, -1):
        if text.endswith(tag[:n]):
            return n
    return 0


# --- the client -------------------------------------------------------------------------------


def make_session(**kwargs: Any) -> aiohttp.ClientSession:
    """The process's one HTTP session. Concurrency is limited per backend, not by the pool."""
    connector = aiohttp.TCPConnector(limit=0, limit_per_host=0, ttl_dns_cache=300)
    return aiohttp.ClientSession(
        connector=connector, headers={"User-Agent": USER_AGENT}, raise_for_status=False, **kwargs
    )


def _server_message(body: bytes) -> str:
    """The server's own words from an error body, whichever shape it uses."""
    text = body.decode("utf-8", "replace").strip()
    try:
        data = json.loads(text)
    except ValueError:
        return text[:MAX_ERROR_CHARS]
    msg: Any = data
    if isinstance(data, dict):
        msg = data.get("error", data.get("detail", data.get("message", data)))
        if isinstance(msg, dict):
            msg = msg.get("message") or msg.get("detail") or json.dumps(msg)
    return str(msg)[:MAX_ERROR_CHARS]


def _redact(b: Backend, text: str) -> str:
    """Server text goes into messages users see; some proxies echo the key they rejected."""
    return text.replace(b.api_key, "***") if b.api_key else text


def _retry_after(headers: Mapping[str, str]) -> float | None:
    raw = headers.get("Retry-After")
    if not raw:
        return None
    try:
        return max(0.0, float(raw))
    except ValueError:
        return None  # an HTTP date: rare from LLM servers, fall back to our own backoff


def _looks_like_missing_model(status: int, message: str) -> bool:
    low = message.lower()
    return (
        status in (400, 404)
        and "model" in low
        and ("not found" in low or "does not exist" in low or "not loaded" in low or "no such" in low)
    )


class LLMClient:
    """Talks to the council's backends. Takes the process's session; never closes it."""

    def __init__(self, session: aiohttp.ClientSession, backends: Mapping[str, Backend]) -> None:
        self.session = session
        self.backends = dict(backends)
        self._slots = {name: asyncio.Semaphore(b.max_concurrency) for name, b in self.backends.items()}

    def backend(self, name: str) -> Backend:
        try:
            return self.backends[name]
        except KeyError:
            raise LLMError(f"no backend named {name!r}", backend=name) from None

    def _headers(self, b: Backend) -> dict[str, str]:
        h = {"Accept": "text/event-stream, application/json"}
        if b.api_key:
            h["Authorization"] = f"Bearer {b.api_key}"
        return h

    def _unreachable(self, b: Backend, exc: BaseException, model: str = "") -> LLMError:
        cause = getattr(exc, "os_error", None) or exc
        if (
            isinstance(cause, socket.gaierror)
            or "Name or service not known" in str(exc)
            or (isinstance(exc, aiohttp.ClientConnectorDNSError))
        ):
            msg = f"backend {b.name}: the name in {b.base_url} could not be resolved — check the host name"
        elif isinstance(cause, ConnectionRefusedError) or "Connect call failed" in str(exc):
            msg = f"backend {b.name} refused the connection at {b.base_url} — is the server running?"
        elif isinstance(exc, aiohttp.ClientSSLError):
            msg = f"backend {b.name}: TLS failed at {b.base_url} ({exc.__class__.__name__}) — check http vs https"
        else:
            msg = f"backend {b.name} at {b.base_url} could not be reached ({exc.__class__.__name__}: {exc})"
        return BackendUnreachable(msg, backend=b.name, model=model)

    async def _error_from_response(self, b: Backend, model: str, resp: aiohttp.ClientResponse) -> LLMError:
        body = await resp.read()
        message = _redact(b, _server_message(body))
        status = resp.status
        if status in (401, 403):
            hint = (
                f"check {b.api_key_env} in .env"
                if b.api_key_env
                else f"the server wants a key: set api_key_env for [backends.{b.name}] in council.toml"
            )
            return AuthError(
                f"backend {b.name} rejected the API key ({status}: {message}) — {hint}",
                status=status,
                server_message=message,
                backend=b.name,
                model=model,
            )
        if status == 404 or _looks_like_missing_model(status, message):
            try:
                available = await self.list_models(b.name, timeout_s=min(5.0, b.connect_timeout_s * 2))
            except LLMError:
                available = []
            if status == 404 and not available and not _looks_like_missing_model(status, message):
                return HTTPStatusError(
                    f"backend {b.name} answered 404 at {b.base_url}/chat/completions — does base_url end in /v1?",
                    status=status,
                    server_message=message,
                    backend=b.name,
                    model=model,
                )
            served = ", ".join(available[:15]) if available else "none listed"
            return ModelNotFound(
                f"backend {b.name} does not serve model {model!r} (it serves: {served}) — "
                f"load it on the server or change the model in council.toml",
                available=available,
                status=status,
                server_message=message,
                backend=b.name,
                model=model,
            )
        if status in (429, 503):
            return Overloaded(
                f"backend {b.name} is busy ({status}: {message}) and kept refusing after retries",
                retry_after=_retry_after(resp.headers),
                status=status,
                server_message=message,
                backend=b.name,
                model=model,
            )
        return HTTPStatusError(
            f"backend {b.name} answered {status}: {message or resp.reason}",
            status=status,
            server_message=message,
            backend=b.name,
            model=model,
        )

    async def list_models(self, backend: str, *, timeout_s: float | None = None) -> list[str]:
        """What ``GET /models`` says the backend serves."""
        b = self.backend(backend)
        timeout = aiohttp.ClientTimeout(
            total=timeout_s or max(b.connect_timeout_s * 2, 10.0), sock_connect=b.connect_timeout_s
        )
        try:
            async with self.session.get(f"{b.base_url}/models", headers=self._headers(b), timeout=timeout) as resp:
                if resp.status != 200:
                    raise await self._error_from_response(b, "", resp)
                try:
                    data = await resp.json(content_type=None)
                except ValueError:
                    raise MalformedChunk(f"backend {b.name}: /models did not return JSON", backend=b.name) from None
        except TimeoutError:
            raise LLMTimeout(
                f"backend {b.name} did not list its models within {timeout.total:g} s",
                phase="total",
                seconds=timeout.total or 0,
                backend=b.name,
            ) from None
        except aiohttp.ClientConnectionError as exc:
            raise self._unreachable(b, exc) from None
        items = data.get("data", data.get("models", [])) if isinstance(data, dict) else data
        models = []
        for item in items or []:
            if isinstance(item, dict):
                name = item.get("id") or item.get("name") or item.get("model")
                if name:
                    models.append(str(name))
            elif isinstance(item, str):
                models.append(item)
        return models

    async def stream_chat(
        self,
        backend: str,
        model: str,
        messages: Sequence[Mapping[str, str]],
        *,
        temperature: float | None = None,
        max_tokens: int | None = None,
        timeout_s: float | None = None,
        extra: Mapping[str, Any] | None = None,
        on_sent: Callable[[], None] | None = None,
    ) -> AsyncIterator[Delta]:
        """Stream a chat completion. Closing the generator early releases the connection.

        ``timeout_s`` overrides the backend's total timeout. Waiting for a concurrency slot counts
        toward the total, not toward the first-token timeout; ``on_sent`` is called once a slot is
        held and the request is about to go out.
        """
        b = self.backend(backend)
        total_s = timeout_s or b.total_timeout_s
        loop = asyncio.get_running_loop()
        deadline = loop.time() + total_s
        payload: dict[str, Any] = {
            "model": model,
            "messages": list(messages),
            "stream": True,
            "stream_options": {"include_usage": True},
        }
        if temperature is not None:
            payload["temperature"] = temperature
        if max_tokens is not None:
            payload["max_tokens"] = max_tokens
        if extra:
            payload.update(extra)

        def total_timeout() -> LLMTimeout:
            return LLMTimeout(
                f"{model} on backend {b.name} did not finish within {total_s:g} s",
                phase="total",
                seconds=total_s,
                backend=b.name,
                model=model,
            )

        try:
            async with asyncio.timeout_at(deadline):
                await self._slots[backend].acquire()
        except TimeoutError:
            raise total_timeout() from None
        try:
            if on_sent is not None:
                on_sent()  # past our own queue: from here on, any wait is the server's
            resp, first_deadline = await self._open_stream(b, model, payload, deadline, total_timeout)
            clean = False
            try:
                stream = self._read_stream(b, model, resp, first_deadline, deadline, total_timeout)
                async with aclosing(stream):
                    async for delta in stream:
                        clean = delta.done
                        yield delta
            finally:
                # A finished stream may go back to the pool; one stopped early must not.
                if clean:
                    resp.release()
                else:
                    resp.close()
        finally:
            self._slots[backend].release()

    @staticmethod
    def _first_token_timeout(b: Backend, model: str, limit: float, deadline: float, total_timeout: Any) -> LLMTimeout:
        if limit >= deadline:
            return total_timeout()
        return LLMTimeout(
            f"{model} on backend {b.name} sent no token for {b.first_token_timeout_s:g} s — "
            "the server may be loading the model or queueing requests",
            phase="first_token",
            seconds=b.first_token_timeout_s,
            backend=b.name,
            model=model,
        )

    async def _open_stream(
        self, b: Backend, model: str, payload: dict[str, Any], deadline: float, total_timeout: Any
    ) -> tuple[aiohttp.ClientResponse, float]:
        """POST the request, retrying only while nothing has been received."""
        loop = asyncio.get_running_loop()
        url = f"{b.base_url}/chat/completions"
        attempt = 0
        while True:
            first_token_deadline = min(deadline, loop.time() + b.first_token_timeout_s)
            timeout = aiohttp.ClientTimeout(total=None, sock_connect=b.connect_timeout_s)
            retry_in: float | None = None
            error: LLMError
            try:
                async with asyncio.timeout_at(first_token_deadline):
                    resp = await self.session.post(url, json=payload, headers=self._headers(b), timeout=timeout)
            except (aiohttp.ConnectionTimeoutError, aiohttp.SocketTimeoutError):
                # aiohttp's own timeouts subclass TimeoutError: catch them before asyncio's.
                error = LLMTimeout(
                    f"backend {b.name} at {b.base_url} did not accept a connection within "
                    f"{b.connect_timeout_s:g} s — is the host up and the port right?",
                    phase="connect",
                    seconds=b.connect_timeout_s,
                    backend=b.name,
                    model=model,
                )
                retry_in = self._backoff(attempt)
            except TimeoutError:
                raise self._first_token_timeout(b, model, first_token_deadline, deadline, total_timeout) from None
            except aiohttp.ServerDisconnectedError as exc:
                # A keep-alive connection the server had closed: safe to resend, nothing was received.
                error = self._unreachable(b, exc, model)
                retry_in = 0.0
            except aiohttp.ClientConnectorDNSError as exc:
                raise self._unreachable(b, exc, model) from None
            except aiohttp.ClientConnectionError as exc:
                error = self._unreachable(b, exc, model)
                retry_in = self._backoff(attempt)
            else:
                if resp.status == 200:
                    return resp, first_token_deadline
                try:
                    error = await self._error_from_response(b, model, resp)
                finally:
                    resp.release()
                if isinstance(error, Overloaded):
                    retry_in = (
                        min(error.retry_after, MAX_RETRY_AFTER_S)
                        if error.retry_after is not None
                        else self._backoff(attempt)
                    )
            if retry_in is None or attempt >= b.max_retries or loop.time() + retry_in >= deadline:
                raise error
            attempt += 1
            log.info("backend %s: %s; retrying in %.2f s (attempt %d)", b.name, error, retry_in, attempt + 1)
            await asyncio.sleep(retry_in)

    @staticmethod
    def _backoff(attempt: int) -> float:
        return 0.25 * (2**attempt) * (0.5 + random.random())

    async def _read_stream(
        self,
        b: Backend,
        model: str,
        resp: aiohttp.ClientResponse,
        first_deadline: float,
        deadline: float,
        total_timeout: Any,
    ) -> AsyncIterator[Delta]:
        """Parse the SSE stream. Everything that arrived in one read becomes one Delta: under load
        that batches frames and keeps the per-token cost down."""
        loop = asyncio.get_running_loop()
        splitter = ThinkSplitter()
        finish_reason: str | None = None
        prompt_tokens = completion_tokens = None
        buffer = b""
        data_lines: list[bytes] = []
        done = got_first = False
        # One timer per stream, not a timeout per read: when it fires it closes the response, and
        # the pending read returns or raises; ``expired`` says which limit it was.
        expired: list[float] = []

        def fire(limit: float) -> None:
            expired.append(limit)
            # Fail the pending read with an exception of our own first: on close aiohttp raises one
            # shared "Connection closed" error whose traceback grows with every stream it is raised
            # in and is never cleared, which kept each timed-out stream in memory (found by the soak).
            resp.content.set_exception(aiohttp.ClientConnectionError("deadline passed"))
            resp.close()

        def bad(what: str) -> MalformedChunk:
            return MalformedChunk(
                f"{model} on backend {b.name} sent a malformed chunk: {what}", backend=b.name, model=model
            )

        timer = loop.call_at(first_deadline, fire, first_deadline)
        try:
            while not done:
                try:
                    chunk = await resp.content.readany()
                except (aiohttp.ClientPayloadError, aiohttp.ClientConnectionError) as exc:
                    if expired:
                        raise self._first_token_timeout(b, model, expired[0], deadline, total_timeout) from None
                    raise IncompleteStream(
                        f"{model} on backend {b.name}: the connection broke mid-answer ({exc})",
                        backend=b.name,
                        model=model,
                    ) from None
                if not chunk:
                    if expired:
                        raise self._first_token_timeout(b, model, expired[0], deadline, total_timeout)
                    break
                buffer += chunk
                *lines, buffer = buffer.split(b"\n")
                contents: list[str] = []
                reasonings: list[str] = []
                reset = False
                pieces = 0
                for line in lines:
                    if line.startswith(b"data:"):
                        data_lines.append(line[5:])
                        continue
                    if line.strip() or not data_lines:
                        continue  # comments (":"), event:/id: fields, stray blank lines
                    raw = (data_lines[0] if len(data_lines) == 1 else b"\n".join(data_lines)).strip()
                    data_lines = []
                    if raw == b"[DONE]":
                        done = True
                        break
                    try:
                        obj = json.loads(raw)
                    except ValueError:
                        raise bad(repr(_redact(b, raw[:80].decode("utf-8", "replace")))) from None
                    if not isinstance(obj, dict):
                        raise bad("not a JSON object")
                    if obj.get("error"):
                        err = obj["error"]
                        msg = _redact(b, err.get("message", str(err)) if isinstance(err, dict) else str(err))
                        raise StreamError(
                            f"{model} on backend {b.name} reported an error mid-answer: {msg[:MAX_ERROR_CHARS]}",
                            backend=b.name,
                            model=model,
                        )
                    usage = obj.get("usage")
                    if usage and isinstance(usage, dict):
                        prompt_tokens = usage.get("prompt_tokens", prompt_tokens)
                        completion_tokens = usage.get("completion_tokens", completion_tokens)
                    choices = obj.get("choices")
                    if not choices:
                        continue
                    choice = choices[0]
                    if not isinstance(choice, dict):
                        raise bad("a choice that is not an object")
                    if choice.get("finish_reason"):
                        finish_reason = choice["finish_reason"]
                    delta = choice.get("delta")
                    if not delta:
                        continue
                    if not isinstance(delta, dict):
                        raise bad("a delta that is not an object")
                    content = delta.get("content") or ""
                    reasoning = delta.get("reasoning_content") or delta.get("reasoning") or ""
                    if not isinstance(content, str) or not isinstance(reasoning, str):
                        raise bad("content that is not text")
                    if reasoning:
                        reasonings.append(reasoning)
                        pieces += 1
                    if content:
                        answer, inline, was_reset = splitter.feed(content)
                        if was_reset:
                            contents.clear()
                            reset = True
                        if answer:
                            contents.append(answer)
                        if inline:
                            reasonings.append(inline)
                        pieces += 1
                if pieces:
                    if not got_first:
                        got_first = True
                        timer.cancel()
                        timer = loop.call_at(deadline, fire, deadline)
                    yield Delta(content="".join(contents), reasoning="".join(reasonings), reset=reset, pieces=pieces)
            if expired:
                raise self._first_token_timeout(b, model, expired[0], deadline, total_timeout)
        finally:
            timer.cancel()
        if not done and finish_reason is None:
            raise IncompleteStream(
                f"{model} on backend {b.name} stopped mid-answer (the stream ended without [DONE])",
                backend=b.name,
                model=model,
            )
        answer, reasoning = splitter.flush()
        if answer or reasoning:
            yield Delta(content=answer, reasoning=reasoning, pieces=0)
        yield Delta(
            done=True,
            pieces=0,
            finish_reason=finish_reason,
            prompt_tokens=prompt_tokens,
            completion_tokens=completion_tokens,
        )
