"""Shutdown in the middle of a council, and a council that outlives its interaction token."""

from __future__ import annotations

import asyncio

import discord
import pytest

from bot.config import Settings
from tests.discord_fixtures import GatedKnowledge, Scene, script_council
from tests.factories import NAMES
from tests.fakeserver import FakeLLM, Script

QUESTION = "Should I run ZFS or ext4 on my R730?"


def authored_by(message: discord.Message, name: str) -> bool:
    return bool(message.embeds) and name in (message.embeds[0].author.name or "")


async def test_shutdown_mid_council_leaves_everything_in_a_final_state(scene: Scene, fake_llm: FakeLLM) -> None:
    fake_llm.script("goku", Script(text="GOKU answers at once."))
    for name in NAMES[1:]:
        fake_llm.script(name.lower(), Script(hang=True))  # the rest are still waiting for their model
    bot = scene.bot

    async def sigterm_when_goku_lands() -> None:
        # What the SIGTERM handler does: close the bot while the council is in flight.
        await bot.wait_for("message", check=lambda m: authored_by(m, "GOKU"))
        await bot.close()

    shutdown = asyncio.create_task(sigterm_when_goku_lands())
    await scene.alice.slash(scene.channel, "shenron", question=QUESTION)
    await asyncio.wait_for(shutdown, 5)

    messages = scene.bot_messages(scene.thread())
    board = messages[0].embeds[0]
    assert board.footer.text.startswith("⏹️ Interrupted — SHENRON was shut down")
    assert board.colour.value == 0xE67E22
    states = [line.split()[0] for line in board.fields[0].value.splitlines()]
    assert states == ["✅", *["⏹️"] * 5]
    assert board.fields[1].value.startswith("⏹️")
    assert authored_by(messages[1], "GOKU")
    synthesis = messages[-1].embeds[0]
    assert synthesis.title == "🐉 SHENRON — interrupted"
    assert "SHENRON was shut down" in synthesis.description
    assert bot.stats.interrupted == 1 and not bot.rounds
    assert bot.is_closed()
    await fake_llm.wait_until_idle()  # the hung requests were cancelled, not left open


async def test_shutdown_while_streaming_the_synthesis_keeps_what_was_written(scene: Scene, fake_llm: FakeLLM) -> None:
    script_council(fake_llm)
    # A steady stream: each token finds the edit slot free again, so partial text is shown.
    fake_llm.script(
        "shenron", Script(text="Use ZFS mirrors and never look back. " * 6, chunk_chars=8, token_interval=0.06)
    )
    bot = scene.bot

    async def sigterm_once_synthesis_streams() -> None:
        def streamed(_: discord.Message, after: discord.Message) -> bool:
            return any(e.title == "🐉 SHENRON is writing…" and "ZFS" in (e.description or "") for e in after.embeds)

        await bot.wait_for("message_edit", check=streamed)
        await bot.close()

    shutdown = asyncio.create_task(sigterm_once_synthesis_streams())
    await scene.alice.slash(scene.channel, "shenron", question=QUESTION)
    await asyncio.wait_for(shutdown, 5)

    messages = scene.bot_messages(scene.thread())
    synthesis = messages[-1].embeds[0]
    assert synthesis.title == "🐉 SHENRON — interrupted"
    assert synthesis.description.startswith("Use ZFS")
    assert "never look back. Use ZFS mirrors and never look back. Use" not in synthesis.description
    assert messages[0].embeds[0].footer.text.startswith("⏹️ Interrupted")
    assert len(messages) == 1 + 6 + 1


class TestSlowRetrieval:
    @pytest.fixture
    def knowledge(self) -> GatedKnowledge:
        return GatedKnowledge()

    @pytest.fixture
    def bot_settings(self) -> Settings:
        return Settings(edit_interval_s=0.05)

    async def test_a_council_outlives_the_15_minute_interaction_token(
        self, scene: Scene, fake_llm: FakeLLM, knowledge: GatedKnowledge
    ) -> None:
        knowledge.env = scene.env
        script_council(fake_llm)
        await scene.alice.slash(scene.channel, "shenron", question=QUESTION)
        await scene.env.advance_time(16 * 60)  # the interaction token is dead now

        knowledge.gate.set()
        await scene.env.settle()

        messages = scene.bot_messages(scene.thread())
        assert messages[0].embeds[0].footer.text.startswith("✅ Done · 6/6 answered")
        assert len(messages) == 1 + 6 + 1
        webhook = [r for r in scene.env.http_requests if r.path.startswith("/webhooks/")]
        assert len(webhook) == 1  # only the header, before the token expired

    async def test_shutdown_while_waiting_for_retrieval(
        self, scene: Scene, fake_llm: FakeLLM, knowledge: GatedKnowledge
    ) -> None:
        knowledge.env = scene.env
        script_council(fake_llm)
        await scene.alice.slash(scene.channel, "shenron", question=QUESTION)

        await scene.bot.close()

        messages = scene.bot_messages(scene.thread())
        board = messages[0].embeds[0]
        assert board.footer.text.startswith("⏹️ Interrupted")
        assert all(line.startswith("⏹️") for line in board.fields[0].value.splitlines())
        assert messages[-1].embeds[0].title == "🐉 SHENRON — interrupted"
        assert fake_llm.requests == []
