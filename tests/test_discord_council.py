"""/shenron end to end: a real ShenronBot on simcord's Discord, fighters on the fake LLM server."""

from __future__ import annotations

import re
import time

from tests.discord_fixtures import (  # noqa: F401 - fixtures
    EDIT_INTERVAL_S,
    Scene,
    bot_settings,
    council_config,
    knowledge,
    llm_session,
    make_bot,
    scene,
    script_council,
    simcord_bot,
)
from tests.factories import NAMES
from tests.fakeserver import FakeLLM

QUESTION = "Should I run ZFS or ext4 on my R730?"


async def test_full_council(scene: Scene, fake_llm: FakeLLM) -> None:
    arrival = script_council(fake_llm)
    started = time.perf_counter()
    result = await scene.alice.slash(scene.channel, "shenron", question=QUESTION)
    wall = time.perf_counter() - started

    # Acknowledged by deferring, then the reply became the question header.
    callbacks = [r for r in scene.env.http_requests if r.path.startswith("/interactions/")]
    assert [c.json["type"] for c in callbacks] == [5]  # DEFERRED_CHANNEL_MESSAGE_WITH_SOURCE
    header = result.response
    assert header is not None and not header.ephemeral
    assert header.embeds[0].description == QUESTION

    # A public thread on the reply, named after the question.
    thread = scene.thread()
    assert thread.name == QUESTION
    assert thread.id == header.id  # opened on the reply message

    messages = scene.bot_messages(thread)
    board, answers, synthesis = messages[0], messages[1:7], messages[7:]

    # Each answer in its own embed, in arrival order (not roster order), fighter by fighter.
    authors = [m.embeds[0].author.name for m in answers]
    assert [a.split()[1] for a in authors] == arrival
    for message, name in zip(answers, arrival, strict=True):
        [embed] = message.embeds
        assert embed.author.name == f"{embed.author.name.split()[0]} {name} · The {name.title()}"
        assert embed.description.startswith(f"{name} thinks ZFS")
        assert re.fullmatch(rf"{name.lower()} · \d+\.\d s · \d+ tokens", embed.footer.text)

    # The board ends done, one ✅ line per fighter.
    [board_embed] = board.embeds
    assert board_embed.title == "⚔️ Council — round 1"
    assert board_embed.description == QUESTION
    lines = board_embed.fields[0].value.splitlines()
    assert len(lines) == 6 and all(line.startswith("✅") for line in lines)
    assert board_embed.footer.text.startswith("✅ Done · 6/6 answered")

    # The synthesis, with the council's figures and a timeline.
    [message] = synthesis
    text_embed, timeline = message.embeds
    assert text_embed.title == "🐉 SHENRON — synthesis"
    assert text_embed.description == "The council agrees: use ZFS."
    assert re.match(r"6/6 answered · \d+\.\d s wall · \d+\.\d s of model time · \d+\.\d× overlap",
                    text_embed.footer.text)
    assert timeline.title == "⏱️ Timeline"
    rows = timeline.description.strip("`\n").splitlines()
    assert [r.split()[0] for r in rows[:7]] == [*arrival, "SHENRON"]

    # Edits stay within the per-channel budget: at most one per interval, plus the first.
    edits = scene.edits(thread)
    assert 2 <= edits <= wall / EDIT_INTERVAL_S + 1
    # After the deferral nothing went through the interaction webhook but the one header edit.
    webhook = [r for r in scene.env.http_requests if r.path.startswith("/webhooks/")]
    assert [(r.method, r.path.rsplit("/", 1)[-1]) for r in webhook] == [("PATCH", "@original")]
    assert scene.bot.stats.served == 1 and scene.bot.stats.failed == 0
