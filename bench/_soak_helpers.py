"""The soak test's fault vocabulary and its fake server (tests.fakeserver.FakeLLM) in a separate process.

A model name says how the fake answers it, so the client needs no side channel::

    <anything>-<kind>-<words>      e.g. "c123-goku-hang-6", "c7-shenron-normal-9"

``kind`` is one of ``KINDS`` (a normal answer, a recoverable oddity, or a hard fault) and ``words``
the length of the scripted answer. ``SoakLLM`` is a FakeLLM that scripts an unknown model the first
time it is asked for it, from its name; the script is kept, so ``fail_times`` (429/503 once, then
success) counts per model. Both sides use ``script_for``/``scripted_s``/``expected`` from here.

Run as ``python bench/_soak_helpers.py serve``: prints ``{"port", "pid"}`` on one line, then answers
each ``stats`` line on stdin with one JSON line (server-side in-flight requests and open
connections; it also forgets the recorded requests); stops when stdin closes.
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import tempfile
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bench._common import server_process  # noqa: E402
from tests.fakeserver import FakeLLM, Script  # noqa: E402

# Timing of every scripted answer: the first content chunk after FIRST_DELAY, then one per INTERVAL.
FIRST_DELAY = 0.05
INTERVAL = 0.02
RETRY_AFTER = 0.05  # Retry-After on the 429/503 that clears after one refusal
FAULT_AFTER = 2  # drop / stream error / malformed frame / stall after this many content chunks
REASONING = "weighing the options"  # 3 chunks of <think> reasoning for the "think" kind
_POOL = (
    "shard ",
    "later ",
    "because ",
    "the ",
    "load ",
    "is ",
    "still ",
    "modest ",
    "and ",
    "growing ",
    "slowly ",
    "so ",
    "wait ",
)

# Normal answers and oddities the client must absorb (the fighter still answers).
BENIGN = ("normal", "think", "no_done", "close", "r429", "r503")
# Faults the fighter cannot survive: it must fail with a reason of this kind.
HARD = ("e500", "hang", "stall", "drop", "stream_err", "malformed")
KINDS = BENIGN + HARD

# error_kind and words of the reason a hard fault must produce (see bot/llm.py).
EXPECTED_FAILURE = {
    "e500": ("http_500", "answered 500"),
    "hang": ("timeout", "sent no token"),
    "stall": ("timeout", "did not finish"),
    "drop": ("incomplete", "mid-answer"),
    "stream_err": ("stream_error", "reported an error mid-answer"),
    "malformed": ("malformed", "malformed chunk"),
}


def answer_text(words: int) -> str:
    return "".join(_POOL[k % len(_POOL)] for k in range(words)).strip()


def model_name(prefix: str, kind: str, words: int) -> str:
    assert kind in KINDS and words >= FAULT_AFTER + 1
    return f"{prefix}-{kind}-{words}"


def parse_name(model: str) -> tuple[str, int]:
    """(kind, words) from a model name; ValueError when it is not one of ours."""
    parts = model.rsplit("-", 2)
    if len(parts) != 3 or parts[1] not in KINDS:
        raise ValueError(f"model {model!r} is not <prefix>-<kind>-<words>")
    return parts[1], int(parts[2])


def script_for(kind: str, words: int) -> Script:
    s = Script(text=answer_text(words), first_token_delay=FIRST_DELAY, token_interval=INTERVAL)
    if kind == "think":
        s.think_tags, s.reasoning = True, REASONING
    elif kind == "no_done":
        s.no_done = True
    elif kind == "close":
        s.close_connection = True
    elif kind in ("r429", "r503"):
        s.status, s.retry_after, s.fail_times = int(kind[1:]), RETRY_AFTER, 1
        s.error_message = "busy, retry shortly"
    elif kind == "e500":
        s.status, s.error_message = 500, "CUDA error: out of memory"
    elif kind == "hang":
        s.hang = True
    elif kind == "stall":
        s.stall_after = FAULT_AFTER
    elif kind == "drop":
        s.drop_after = FAULT_AFTER
    elif kind == "stream_err":
        s.stream_error_after, s.error_message = FAULT_AFTER, "KV cache full"
    elif kind == "malformed":
        s.malformed_after = FAULT_AFTER
    return s


def scripted_s(kind: str, words: int, first_token_timeout_s: float, total_timeout_s: float) -> float:
    """How long the server's script (or the client's timeout it provokes) takes, from the request."""
    if kind == "e500":
        return 0.0
    if kind == "hang":
        return first_token_timeout_s
    if kind == "stall":
        return total_timeout_s
    if kind in ("drop", "stream_err", "malformed"):
        return FIRST_DELAY + INTERVAL * (FAULT_AFTER - 1)
    pieces = words + (2 + len(REASONING.split()) if kind == "think" else 0)
    duration = FIRST_DELAY + INTERVAL * (pieces - 1)
    return duration + (RETRY_AFTER if kind in ("r429", "r503") else 0.0)


# --- the server --------------------------------------------------------------------------------


class SoakLLM(FakeLLM):
    """A FakeLLM that scripts each model from its name the first time it is asked for it."""

    def _resolve(self, model: str) -> Script | None:
        if model not in self._scripts:
            try:
                kind, words = parse_name(model)
            except ValueError:
                return None  # a 404, like any model the server does not serve
            self.script(model, script_for(kind, words))
        return super()._resolve(model)

    def counters(self) -> dict[str, Any]:
        out = {
            "in_flight": self.in_flight,
            "active": self.active,
            "open_connections": self.open_connections,
            "requests_since_last": len(self.requests),
            "models_scripted": len(self._scripts),
        }
        self.reset_stats()  # forget the recorded requests: they would only grow the server's memory
        return out


async def _serve() -> None:
    loop = asyncio.get_running_loop()
    fake = SoakLLM()
    await fake.start()
    stop = asyncio.Event()

    async def counters() -> dict[str, Any]:
        return fake.counters()

    def read_commands() -> None:
        for line in sys.stdin:
            if line.strip() == "stats":
                reply = asyncio.run_coroutine_threadsafe(counters(), loop).result(10)
                sys.stdout.write(json.dumps(reply) + "\n")
                sys.stdout.flush()
        loop.call_soon_threadsafe(stop.set)  # stdin closed: the parent is done (or gone)

    print(json.dumps({"port": fake.port, "pid": os.getpid()}), flush=True)
    threading.Thread(target=read_commands, name="soak-commands", daemon=True).start()
    await stop.wait()
    await fake.close()


@dataclass
class SoakServer:
    proc: subprocess.Popen[str]
    port: int
    pid: int
    stderr: IO[str]

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    def counters(self) -> dict[str, Any]:
        """The server's own view (blocking; call it between councils)."""
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.proc.stdin.write("stats\n")
        self.proc.stdin.flush()
        return json.loads(self.proc.stdout.readline())

    def stderr_lines(self) -> list[str]:
        self.stderr.flush()
        self.stderr.seek(0)
        return [line.rstrip("\n") for line in self.stderr]


@contextmanager
def soak_server() -> Iterator[SoakServer]:
    """Start ``SoakLLM`` in its own process (own CPU, own fds, own memory); stop it on exit."""
    with (
        tempfile.TemporaryFile("w+", prefix="soak-server-stderr") as err,
        server_process([sys.executable, __file__, "serve"], "soak server", 10.0, stderr=err, text=True) as (
            proc,
            info,
        ),
    ):
        yield SoakServer(proc=proc, port=info["port"], pid=info["pid"], stderr=err)


if __name__ == "__main__":
    if sys.argv[1:] != ["serve"]:
        sys.exit("usage: python bench/_soak_helpers.py serve")

    asyncio.run(_serve())
