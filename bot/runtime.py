"""The event loop SHENRON runs on: uvloop where it is installed (Linux, macOS), asyncio's otherwise.

uvloop does the socket and callback work of a loop in C; with a council's many small SSE frames that
work is most of the per-token cost. SHENRON_LOOP=asyncio turns it off.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Callable, Coroutine
from typing import Any, TypeVar

T = TypeVar("T")


def loop_factory() -> Callable[[], asyncio.AbstractEventLoop] | None:
    if os.environ.get("SHENRON_LOOP", "").strip().lower() == "asyncio":
        return None
    try:
        import uvloop
    except ImportError:
        return None
    return uvloop.new_event_loop


def loop_name() -> str:
    return "uvloop" if loop_factory() else "asyncio"


def run(coro: Coroutine[Any, Any, T]) -> T:
    """asyncio.run on the best loop available (asyncio.Runner: Python 3.11 has no asyncio.run(loop_factory=))."""
    with asyncio.Runner(loop_factory=loop_factory()) as runner:
        return runner.run(coro)
