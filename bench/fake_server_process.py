"""A fake OpenAI-compatible streaming server in its own process, for the benchmarks.

Run as ``python bench/fake_server_process.py [--impl fast|fakellm] [--models m1,m2,...]``. It binds
127.0.0.1 on a random port, prints one JSON line ``{"port": ..., "pid": ..., "impl": ...}`` on
stdout, and serves until stdin closes (the parent died or closed the pipe) or SIGTERM.

The timing of a reply is encoded in the model name, so the client needs no side channel:

    f-<total>-<tps>[-<ttft>]   first token after <ttft> s (default 0.1), then steady tokens at
                               <tps> tokens/s, the last one exactly <total> s after the request
                               arrived; e.g. "f-2.0-40" is 77 one-token frames over 2.0 s.

Two implementations, same wire format (OpenAI ``chat.completion.chunk`` SSE frames, one token per
frame, a role-only first delta, a finish chunk, a usage chunk, ``data: [DONE]``, chunked HTTP/1.1
with keep-alive):

* ``fakellm``: the project's ``tests.fakeserver.FakeLLM`` (aiohttp.web). Each token is an
  ``asyncio.sleep(interval)`` after the previous write, so lateness accumulates along a stream
  (each sleep wakes up to ~1 ms late: epoll rounds timeouts up to the millisecond).
* ``fast`` (default): a bare ``asyncio.Protocol`` HTTP server. Every frame has an absolute due time
  (request arrival + ttft + k × interval), so server lateness never accumulates, and per-frame work
  is one precomputed ``transport.write``. Its lateness (how long after its due time each frame was
  written) is kept and served at ``GET /stats`` (``GET /stats?reset=1`` clears it).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import stat
import sys
import threading
import time
from typing import Any

DEFAULT_TTFT = 0.1
_WORDS = (
    "the ",
    "council ",
    "answers ",
    "with ",
    "one ",
    "token ",
    "per ",
    "frame ",
    "so ",
    "we ",
    "measure ",
    "honest ",
    "streaming ",
    "cost ",
)


# '{"content":"the "},"logprobs":null,"finish_reason":null}]}\n\n' etc.: the tail of every content frame
_DELTAS = tuple(
    json.dumps({"content": w}, separators=(",", ":")) + ',"logprobs":null,"finish_reason":null}]}\n\n' for w in _WORDS
)


def parse_model(model: str) -> tuple[float, float, int, float]:
    """(ttft, total, n_tokens, interval) for a model name ``f-<total>-<tps>[-<ttft>]``."""
    parts = model.split("-")
    if len(parts) not in (3, 4) or parts[0] != "f":
        raise ValueError(f"model {model!r} is not f-<total>-<tps>[-<ttft>]")
    total, tps = float(parts[1]), float(parts[2])
    ttft = float(parts[3]) if len(parts) == 4 else DEFAULT_TTFT
    if total < ttft:
        raise ValueError(f"model {model!r}: total {total} < ttft {ttft}")
    n = max(1, round((total - ttft) * tps) + 1)
    interval = (total - ttft) / (n - 1) if n > 1 else 0.0
    return ttft, total, n, interval


# --- the fast implementation ------------------------------------------------------------------


def _chunked(data: bytes) -> bytes:
    return b"%x\r\n%s\r\n" % (len(data), data)


def _sse(obj: Any) -> bytes:
    return b"data: " + json.dumps(obj, separators=(",", ":")).encode() + b"\n\n"


class _Stats:
    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self.frames = 0
        self.lateness: list[float] = []
        self.streams = 0
        self.completed = 0
        self.aborted = 0  # client hung up mid-stream
        self.connections_opened = 0
        self.arrivals: list[float] = []  # time.monotonic() of each chat request (comparable across processes)

    def summary(self, open_connections: int, active_streams: int, arrivals: bool) -> dict[str, Any]:
        late = sorted(self.lateness)

        def pct(p: float) -> float:
            return late[min(len(late) - 1, int(p * len(late)))] * 1000 if late else 0.0

        return {
            "frames": self.frames,
            "streams": self.streams,
            "completed": self.completed,
            "aborted": self.aborted,
            "connections_opened": self.connections_opened,
            "open_connections": open_connections,
            "active_streams": active_streams,
            **({"arrivals": self.arrivals} if arrivals else {}),
            "lateness_ms": {"p50": pct(0.50), "p99": pct(0.99), "max": late[-1] * 1000 if late else 0.0},
        }


class _Conn(asyncio.Protocol):
    server: _FastServer

    def __init__(self, server: _FastServer) -> None:
        self.server = server
        self.transport: asyncio.Transport | None = None
        self.buf = bytearray()
        self.busy = False  # a response is being streamed; pipelined requests wait in buf
        self.handle: asyncio.TimerHandle | None = None
        self.n = 0  # content frames in this reply
        self.pre = ""  # a frame's JSON up to the delta (per stream: it carries the id)
        self.tail = b""
        self.k = 0
        self.t0 = 0.0
        self.ttft = self.interval = 0.0
        self.close_after = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        self.server.conns.add(self)
        self.server.stats.connections_opened += 1

    def connection_lost(self, exc: Exception | None) -> None:
        self.server.conns.discard(self)
        if self.handle is not None:
            self.handle.cancel()
            self.handle = None
        if self.busy:
            self.busy = False
            self.server.active -= 1
            self.server.stats.aborted += 1
        self.transport = None

    def data_received(self, data: bytes) -> None:
        self.buf += data
        self._process()

    def _process(self) -> None:
        while not self.busy and self.transport is not None:
            end = self.buf.find(b"\r\n\r\n")
            if end < 0:
                return
            head = bytes(self.buf[:end]).decode("latin-1").split("\r\n")
            try:
                method, target, _ = head[0].split(" ", 2)
            except ValueError:
                self._respond(400, b'{"error":{"message":"bad request line"}}', close=True)
                return
            length = 0
            close = False
            for line in head[1:]:
                name, _, value = line.partition(":")
                name = name.strip().lower()
                if name == "content-length":
                    length = int(value.strip())
                elif name == "connection" and value.strip().lower() == "close":
                    close = True
            if len(self.buf) < end + 4 + length:
                return
            body = bytes(self.buf[end + 4 : end + 4 + length])
            del self.buf[: end + 4 + length]
            self._handle(method, target, body, close)

    def _respond(self, status: int, body: bytes, *, close: bool = False) -> None:
        assert self.transport is not None
        reason = {200: "OK", 400: "Bad Request", 404: "Not Found"}.get(status, "Error")
        self.transport.write(
            b"HTTP/1.1 %d %s\r\nContent-Type: application/json\r\nContent-Length: %d\r\n%s\r\n%s"
            % (status, reason.encode(), len(body), b"Connection: close\r\n" if close else b"", body)
        )
        if close:
            self.transport.close()

    def _handle(self, method: str, target: str, body: bytes, close: bool) -> None:
        path, _, query = target.partition("?")
        if method == "GET" and path == "/stats":
            summary = self.server.stats.summary(len(self.server.conns), self.server.active, "arrivals" in query)
            if "reset" in query:
                self.server.stats.reset()
            self._respond(200, json.dumps(summary).encode(), close=close)
            return
        if method == "GET" and path == "/v1/models":
            self._respond(200, b'{"object":"list","data":[]}', close=close)
            return
        if method != "POST" or path != "/v1/chat/completions":
            self._respond(404, b'{"error":{"message":"not found"}}', close=close)
            return
        try:
            req = json.loads(body)
            model = req["model"]
            ttft, _total, n, interval = parse_model(model)
        except (ValueError, KeyError, TypeError) as exc:
            self._respond(400, json.dumps({"error": {"message": str(exc)}}).encode(), close=close)
            return
        if not req.get("stream"):
            self._respond(400, b'{"error":{"message":"this fake only streams"}}', close=close)
            return
        loop = self.server.loop
        self.server.stats.streams += 1
        self.server.active += 1
        self.busy = True
        self.close_after = close
        self.t0 = loop.time()  # the default loop's clock is time.monotonic()
        self.server.stats.arrivals.append(self.t0)
        self.ttft, self.interval = ttft, interval
        sid = next(self.server.ids)
        created = int(time.time())
        head = (
            f'data: {{"id":"chatcmpl-fast-{sid}","object":"chat.completion.chunk","created":{created},'
            f'"model":{json.dumps(model)},'
        )
        pre = head + '"choices":[{"index":0,"delta":'

        def frame(delta: str, finish: str = "null") -> bytes:
            return _chunked((pre + delta + ',"logprobs":null,"finish_reason":' + finish + "}]}\n\n").encode())

        self.pre, self.n = pre, n  # content frames are built when due: a burst of requests stays cheap
        usage = {"prompt_tokens": len(body) // 4, "completion_tokens": n, "total_tokens": len(body) // 4 + n}
        usage_line = head + '"choices":[],"usage":' + json.dumps(usage) + "}\n\n"
        self.tail = frame("{}", '"stop"') + _chunked(usage_line.encode()) + _chunked(b"data: [DONE]\n\n") + b"0\r\n\r\n"
        self.k = 0
        assert self.transport is not None
        self.transport.write(
            b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nCache-Control: no-cache\r\n"
            b"Transfer-Encoding: chunked\r\n%s\r\n"
            % (b"Connection: close\r\n" if close else b"")
            + frame('{"role":"assistant","content":null}')
        )
        self.handle = loop.call_at(self.t0 + ttft, self._tick)

    def _tick(self) -> None:
        self.handle = None
        if self.transport is None:
            return
        loop = self.server.loop
        now = loop.time()
        stats = self.server.stats
        out = []
        n = self.n
        # everything due by now goes out (one token per frame; several frames only if we fell behind)
        while self.k < n:
            due = self.t0 + self.ttft + self.k * self.interval
            if due > now:
                break
            out.append(_chunked((self.pre + _DELTAS[self.k % len(_DELTAS)]).encode()))
            stats.lateness.append(now - due)
            self.k += 1
        stats.frames += len(out)
        if self.k >= n:
            out.append(self.tail)
            self.transport.write(b"".join(out))
            self.busy = False
            self.server.active -= 1
            stats.completed += 1
            if self.close_after:
                self.transport.close()
                return
            self._process()  # a pipelined next request
            return
        self.transport.write(b"".join(out) if len(out) > 1 else out[0])
        self.handle = loop.call_at(self.t0 + self.ttft + self.k * self.interval, self._tick)


class _FastServer:
    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        import itertools

        self.loop = loop
        self.conns: set[_Conn] = set()
        self.stats = _Stats()
        self.active = 0
        self.ids = itertools.count(1)

    async def start(self) -> int:
        srv = await self.loop.create_server(lambda: _Conn(self), "127.0.0.1", 0, backlog=4096)
        self._srv = srv
        return srv.sockets[0].getsockname()[1]


# --- the FakeLLM implementation ---------------------------------------------------------------


async def _start_fakellm(models: list[str]) -> tuple[int, Any]:
    from tests.fakeserver import FakeLLM, Script

    fake = FakeLLM()
    await fake.start()
    for m in models:
        ttft, _total, n, interval = parse_model(m)
        words = "".join(_WORDS[k % len(_WORDS)] for k in range(n))
        fake.script(m, Script(text=words, first_token_delay=ttft, token_interval=interval))
    return fake.port, fake


# --- main -------------------------------------------------------------------------------------


async def _main(impl: str, models: list[str]) -> None:
    loop = asyncio.get_running_loop()
    keep: Any
    if impl == "fast":
        keep = _FastServer(loop)
        port = await keep.start()
    else:
        port, keep = await _start_fakellm(models)
    print(json.dumps({"port": port, "pid": os.getpid(), "impl": impl}), flush=True)
    stop = asyncio.Event()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    if stat.S_ISFIFO(os.fstat(sys.stdin.fileno()).st_mode):  # a parent's pipe: its closing stops us

        def watch_stdin() -> None:
            while os.read(sys.stdin.fileno(), 4096):
                pass
            loop.call_soon_threadsafe(stop.set)

        threading.Thread(target=watch_stdin, daemon=True).start()
    await stop.wait()


def main() -> None:
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # for tests.fakeserver
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--impl", choices=("fast", "fakellm"), default="fast")
    ap.add_argument("--models", default="", help="comma-separated model names (needed by --impl fakellm)")
    args = ap.parse_args()
    models = [m for m in args.models.split(",") if m]
    for m in models:
        parse_model(m)
    asyncio.run(_main(args.impl, models))


if __name__ == "__main__":
    main()
