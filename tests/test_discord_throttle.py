"""The per-channel edit budget: coalesced, spaced, shared between messages, finals always written."""

from __future__ import annotations

import asyncio
import itertools
import time
from types import SimpleNamespace
from typing import Any

import discord

from bot.discord_bot import EditThrottle, LiveMessage

INTERVAL = 0.2
# An edit is logged when its task first runs, a loop pass after its slot opened; on a busy machine
# that pass can be late by a few ms, which shortens the *logged* gap. The slack covers that.
SLACK = 0.02


class RecordingMessage:
    """Stands in for discord.Message at the network edge: records each edit and when it happened."""

    def __init__(self, log: list[tuple[float, str, Any]], name: str, fail_first: bool = False) -> None:
        self.id = hash(name)
        self.channel = SimpleNamespace(id=1)
        self.log, self.name, self.fail_first = log, name, fail_first
        self.changed = asyncio.Event()

    async def edit(self, **payload: Any) -> None:
        if self.fail_first:
            self.fail_first = False
            raise discord.NotFound(SimpleNamespace(status=404, reason="Not Found"), "Unknown Message")
        self.log.append((time.perf_counter(), self.name, payload["state"]))
        self.changed.set()
        self.changed = asyncio.Event()


def live(
    throttle: EditThrottle, log: list[tuple[float, str, Any]], name: str, state: dict[str, int], **kw: bool
) -> tuple[LiveMessage, RecordingMessage]:
    message = RecordingMessage(log, name, **kw)
    return LiveMessage(message, throttle, lambda: {"state": state["n"]}), message  # type: ignore[arg-type]


async def test_bursts_coalesce_and_the_final_state_is_written() -> None:
    log: list[tuple[float, str, Any]] = []
    throttle = EditThrottle(INTERVAL)
    state = {"n": 0}
    board, message = live(throttle, log, "board", state)
    for n in range(1, 51):
        state["n"] = n
        board.touch()
    first = message.changed
    await first.wait()  # the slot was free: the first change went out at once
    await message.changed.wait()  # the rest coalesce into one edit at the next slot
    await board.finish(state="final")
    board.touch()  # after the final state, nothing moves it again

    assert [entry[2] for entry in log] == [1, 50, "final"]
    times = [entry[0] for entry in log]
    assert all(b - a >= INTERVAL - SLACK for a, b in itertools.pairwise(times))
    assert throttle.edits == 3 and throttle.idle


async def test_messages_in_one_channel_share_one_budget() -> None:
    log: list[tuple[float, str, Any]] = []
    throttle = EditThrottle(INTERVAL)
    state = {"n": 0}
    board, _ = live(throttle, log, "board", state)
    synthesis, synth_message = live(throttle, log, "synthesis", state)
    for n in range(1, 6):
        state["n"] = n
        board.touch()
        synthesis.touch()
        await synth_message.changed.wait()

    names = [entry[1] for entry in log]
    assert names[:4] == ["board", "synthesis", "board", "synthesis"]  # round-robin, not one hogging
    times = [entry[0] for entry in log]
    assert all(b - a >= INTERVAL - SLACK for a, b in itertools.pairwise(times))
    await board.finish(state="done")
    await synthesis.finish(state="done")
    assert log[-2][1:] == ("board", "done") and log[-1][1:] == ("synthesis", "done")


async def test_a_failed_edit_does_not_stop_later_ones() -> None:
    log: list[tuple[float, str, Any]] = []
    throttle = EditThrottle(INTERVAL)
    state = {"n": 1}
    board, _message = live(throttle, log, "board", state, fail_first=True)
    board.touch()  # refused by Discord: logged, not raised
    await board.finish(state="final")
    assert [entry[2] for entry in log] == ["final"]
    assert throttle.edits == 1
