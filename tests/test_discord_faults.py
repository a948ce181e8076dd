"""Faults around a Discord council: Discord refusing posts and edits, the gateway dropping, the bot
stopped and started again, the LLM backend dying mid-stream.

Each case checks what the user sees, read back from the thread, and that nothing is left behind:
no message still looking alive (⏳ 💭 ✍️, "is writing…"), no bot task, no round in flight.

simcord replaces discord.py's HTTP transport, so an injected 429/5xx reaches the bot at once; in
production it is what the bot sees after discord.py's own retries gave up (or at once, for a 503).
simcord's injected errors carry no ``retry_after``.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable

import aiohttp
import discord
import pytest
from discord import app_commands
from discord.ext import commands

from bot.config import CouncilConfig, Settings
from bot.council import CouncilEngine
from bot.discord_bot import DISCORD_TRIES, EditThrottle, LiveMessage, ShenronBot
from bot.llm import LLMClient
from bot.stats import CouncilCounters
from cogs.render import COLOUR_BUSY
from tests.discord_fixtures import GatedKnowledge, Scene, script_council
from tests.factories import NAMES
from tests.fakeserver import FakeLLM, Script
from tests.leaks import client_connections, client_tasks

QUESTION = "Should I run ZFS or ext4 on my R730?"
FOLLOW_UP = "And what about SSD wear?"
ALIVE = ("⏳", "💭", "✍️")
BOARD = "⚔️ Council — round"


# --- reading the thread back --------------------------------------------------------------------


def embeds_in(scene: Scene, thread) -> list[discord.Embed]:
    """Every embed the bot shows in the thread, oldest first, as ``thread.history()`` returns it."""
    me = scene.bot.user
    assert me is not None
    return [e for m in thread.history() if m.author.id == me.id for e in m.embeds]


def boards(scene: Scene, thread) -> list[discord.Embed]:
    return [e for e in embeds_in(scene, thread) if (e.title or "").startswith(BOARD)]


def assert_all_final(scene: Scene, thread) -> list[discord.Embed]:
    """No board, seat or synthesis in the thread still looks alive. Returns the boards."""
    shown = embeds_in(scene, thread)
    assert not [e.title for e in shown if (e.title or "").endswith("is writing…")]
    found = [e for e in shown if (e.title or "").startswith(BOARD)]
    assert found
    for board in found:
        assert board.footer.text.startswith(("✅", "❌", "⏹️")), board.footer.text
        assert board.colour is not None and board.colour.value != COLOUR_BUSY
        for field in board.fields[:2]:  # the fighters, then SHENRON
            assert not [line for line in field.value.splitlines() if line.startswith(ALIVE)], field.value
    return found


def answers(scene: Scene, thread) -> list[discord.Embed]:
    return [e for e in embeds_in(scene, thread) if e.author.name and any(n in e.author.name for n in NAMES)]


def assert_nothing_left(*bots: ShenronBot) -> None:
    for bot in bots:
        assert not bot.rounds
    me = asyncio.current_task()
    assert {t.get_name() for t in client_tasks() if t is not me} == set()


def posts_to(scene: Scene, channel_id: int) -> int:
    path = f"/channels/{channel_id}/messages"
    return sum(1 for r in scene.env.http_requests if r.method == "POST" and r.path == path)


def fighter_prompts(fake: FakeLLM, model: str) -> list[list[dict[str, str]]]:
    return [r.body["messages"] for r in fake.requests if r.path.endswith("/chat/completions") and r.model == model]


# --- Discord refusing posts and edits ----------------------------------------------------------


async def test_the_first_post_rate_limited_once_is_retried(scene: Scene, fake_llm: FakeLLM) -> None:
    script_council(fake_llm)
    # The board is the first message posted to any channel's /messages in a round.
    scene.env.inject_error("POST", "/channels/*/messages", status=429, message="You are being rate limited.")
    await scene.alice.slash(scene.channel, "shenron", question=QUESTION)

    thread = scene.thread()
    [board] = assert_all_final(scene, thread)
    assert board.footer.text.startswith("✅ Done · 6/6 answered")
    assert len(answers(scene, thread)) == 6
    assert posts_to(scene, thread.id) == len(scene.bot_messages(thread)) + 1  # one refused, none doubled
    assert_nothing_left(scene.bot)


class TestHeldInRetrieval:
    """The round waits in retrieval (board posted) while the test arranges Discord's next answers."""

    @pytest.fixture
    def knowledge(self) -> GatedKnowledge:
        return GatedKnowledge()

    async def held_round(self, scene: Scene, fake: FakeLLM, knowledge: GatedKnowledge):
        knowledge.env = scene.env
        script_council(fake)
        await scene.alice.slash(scene.channel, "shenron", question=QUESTION)
        return scene.thread()

    async def release(self, scene: Scene, knowledge: GatedKnowledge) -> None:
        knowledge.gate.set()
        await scene.env.settle()

    @pytest.mark.parametrize(
        ("status", "times"), [(429, 1), (500, 2), (503, DISCORD_TRIES - 1)], ids=["429-once", "500-twice", "503"]
    )
    async def test_answers_refused_for_a_while_still_all_land(
        self, scene: Scene, fake_llm: FakeLLM, knowledge: GatedKnowledge, status: int, times: int
    ) -> None:
        thread = await self.held_round(scene, fake_llm, knowledge)
        scene.env.inject_error("POST", f"/channels/{thread.id}/messages", status=status, times=times)
        await self.release(scene, knowledge)

        [board] = assert_all_final(scene, thread)
        assert board.footer.text.startswith("✅ Done · 6/6 answered")
        assert sorted(e.author.name.split()[1] for e in answers(scene, thread)) == sorted(NAMES)
        assert embeds_in(scene, thread)[-2].title == "🐉 SHENRON — synthesis"
        assert posts_to(scene, thread.id) == len(scene.bot_messages(thread)) + times
        assert scene.bot.stats.served == 1 and scene.bot.stats.failed == 0
        assert_nothing_left(scene.bot)

    async def test_posts_refused_for_good_end_the_round_visibly_failed(
        self, scene: Scene, fake_llm: FakeLLM, knowledge: GatedKnowledge
    ) -> None:
        thread = await self.held_round(scene, fake_llm, knowledge)
        scene.env.inject_error("POST", f"/channels/{thread.id}/messages", status=502, times=None)
        await self.release(scene, knowledge)

        # Nothing more could be posted, but the board (an edit) says the round failed.
        [board] = assert_all_final(scene, thread)
        assert board.footer.text.startswith("❌ SHENRON hit an error (HTTPException)")
        assert board.colour.value == 0xED4245
        assert len(scene.bot_messages(thread)) == 1
        assert posts_to(scene, thread.id) == 1 + 2 * DISCORD_TRIES  # an answer, then the synthesis state
        assert scene.bot.stats.failed == 1
        await fake_llm.wait_until_idle()  # the fighters still running were stopped
        assert_nothing_left(scene.bot)

    async def test_board_edits_refused_twice_still_end_final(
        self, scene: Scene, fake_llm: FakeLLM, knowledge: GatedKnowledge
    ) -> None:
        thread = await self.held_round(scene, fake_llm, knowledge)
        [board_message] = scene.bot_messages(thread)
        path = f"/channels/{thread.id}/messages/{board_message.id}"
        before = sum(1 for r in scene.env.http_requests if r.path == path)
        scene.env.inject_error("PATCH", path, status=503, times=2)
        await self.release(scene, knowledge)

        [board] = assert_all_final(scene, thread)
        assert board.footer.text.startswith("✅ Done · 6/6 answered")
        assert sum(1 for r in scene.env.http_requests if r.path == path) - before >= 3  # 2 refused, then more
        assert_nothing_left(scene.bot)

    async def test_edits_refused_for_good_the_outcome_is_still_posted(
        self, scene: Scene, fake_llm: FakeLLM, knowledge: GatedKnowledge
    ) -> None:
        thread = await self.held_round(scene, fake_llm, knowledge)
        scene.env.inject_error("PATCH", f"/channels/{thread.id}/messages/*", status=503, times=None)
        await self.release(scene, knowledge)

        shown = embeds_in(scene, thread)
        # The board could not change, so a message below it says how the round ended...
        assert shown[0].footer.text == "📚 Searching the knowledge base…"
        assert shown[-1].description.startswith(
            "⚠️ Discord would not update the status board above. This round ended: ✅ Done · 6/6 answered"
        )
        # ...and the synthesis was posted anew, the streaming placeholder removed.
        assert [e.title for e in shown if "SHENRON" in (e.title or "")] == ["🐉 SHENRON — synthesis"]
        assert shown[-3].description == "The council agrees: use ZFS."
        assert len(answers(scene, thread)) == 6
        assert_nothing_left(scene.bot)

        # The reposted synthesis is the thread's history: a follow-up builds on it.
        fake_llm.requests.clear()
        await scene.bob.send(thread, FOLLOW_UP)
        [prompt] = fighter_prompts(fake_llm, "goku")
        assert [m["content"] for m in prompt[1:]] == [QUESTION, "The council agrees: use ZFS.", FOLLOW_UP]
        assert_nothing_left(scene.bot)


async def test_a_final_edit_refused_twice_lands_on_the_third_try(scene: Scene, fake_llm: FakeLLM) -> None:
    """The throttle's final write, against simcord's Discord: 503, then 429, then accepted."""
    script_council(fake_llm)
    await scene.alice.slash(scene.channel, "shenron", question=QUESTION)
    thread = scene.bot.get_channel(scene.thread().id)
    assert isinstance(thread, discord.Thread)
    throttle = EditThrottle(0.01)

    message = await thread.send("working…")
    path = f"/channels/{thread.id}/messages/{message.id}"
    scene.env.inject_error("PATCH", path, status=503)
    scene.env.inject_error("PATCH", path, status=429)
    assert await LiveMessage(message, throttle, lambda: {"content": "final"}).finish()
    assert scene.bot_messages(scene.thread())[-1].content == "final"

    stuck = await thread.send("working…")
    path = f"/channels/{thread.id}/messages/{stuck.id}"
    scene.env.inject_error("PATCH", path, status=500, times=None)
    assert not await LiveMessage(stuck, throttle, lambda: {"content": "final"}).finish()
    assert sum(1 for r in scene.env.http_requests if r.path == path) == DISCORD_TRIES
    assert throttle.idle

    gone = await thread.send("working…")
    scene.env.inject_error("PATCH", f"/channels/{thread.id}/messages/{gone.id}", status=404, code=10008)
    assert not await LiveMessage(gone, throttle, lambda: {"content": "final"}).finish()  # not worth a retry
    assert sum(1 for r in scene.env.http_requests if r.path.endswith(f"/{gone.id}")) == 1


async def test_opening_the_thread_refused_once_is_retried(scene: Scene, fake_llm: FakeLLM) -> None:
    script_council(fake_llm)
    scene.env.inject_error("POST", "/channels/*/messages/*/threads", status=503)
    await scene.alice.slash(scene.channel, "shenron", question=QUESTION)

    [board] = assert_all_final(scene, scene.thread())
    assert board.footer.text.startswith("✅ Done · 6/6 answered")
    assert_nothing_left(scene.bot)


async def test_no_thread_at_all_is_said_and_the_user_may_ask_again(scene: Scene, fake_llm: FakeLLM) -> None:
    script_council(fake_llm)
    scene.env.inject_error("POST", "/channels/*/messages/*/threads", status=503, times=DISCORD_TRIES)
    result = await scene.alice.slash(scene.channel, "shenron", question=QUESTION)

    [error] = scene.env.errors  # logged by the command tree's error handler
    assert isinstance(error, app_commands.CommandInvokeError) and error.original.status == 503
    [followup] = result.followups
    assert followup.content == "Something went wrong on SHENRON's side; the details are in the bot's log."
    assert scene.channel.threads == [] and fake_llm.requests == []
    assert_nothing_left(scene.bot)

    again = await scene.alice.slash(scene.channel, "shenron", question=QUESTION)  # not "still in session"
    assert not again.ephemeral
    assert assert_all_final(scene, scene.thread())[0].footer.text.startswith("✅ Done")


# --- the gateway drops and comes back mid-council ----------------------------------------------


class ShardedShenronBot(ShenronBot, commands.AutoShardedBot):
    """ShenronBot on discord.py's sharded client: simcord lets a test drop and restore its gateway."""


@pytest.mark.simcord(shard_count=1)
class TestGatewayDrop:
    @pytest.fixture
    def simcord_bot(
        self, bot_settings: Settings, council_config: CouncilConfig, llm_session: aiohttp.ClientSession
    ) -> ShenronBot:
        engine = CouncilEngine(LLMClient(llm_session, council_config.backends), council_config)
        return ShardedShenronBot(settings=bot_settings, engine=engine, session=llm_session, stats=CouncilCounters())

    async def test_the_round_completes_and_the_thread_works_after_reconnecting(
        self, scene: Scene, fake_llm: FakeLLM
    ) -> None:
        script_council(fake_llm)
        fake_llm.script("shenron", Script(text="Use ZFS mirrors. " * 8, chunk_chars=8, token_interval=0.02))
        bot = scene.bot
        seen: list[str] = []

        async def drop_and_restore() -> None:
            shard = bot.get_shard(0)
            assert shard is not None
            await bot.wait_for("message", check=lambda m: bool(m.embeds) and m.embeds[0].author.name is not None)
            await shard.disconnect()
            seen.append(f"closed={shard.is_closed()} rounds={len(bot.rounds)}")
            await fake_llm.wait_for_requests(len(NAMES) + 1)  # the synthesis is asked for, unseen by the gateway
            await shard.reconnect()
            seen.append(f"closed={shard.is_closed()} rounds={len(bot.rounds)}")

        events: list[discord.Message] = []

        async def heard(message: discord.Message) -> None:
            events.append(message)

        bot.add_listener(heard, "on_message")
        dropper = asyncio.create_task(drop_and_restore())
        await scene.alice.slash(scene.channel, "shenron", question=QUESTION)
        await asyncio.wait_for(dropper, 5)

        assert seen == ["closed=True rounds=1", "closed=False rounds=1"]  # both while the round ran
        thread = scene.thread()
        messages = scene.bot_messages(thread)
        assert len(events) < len(messages)  # some of the bot's own posts never reached its gateway
        [board] = assert_all_final(scene, thread)
        assert board.footer.text.startswith("✅ Done · 6/6 answered")
        assert embeds_in(scene, thread)[-2].description == ("Use ZFS mirrors. " * 8).strip()
        assert_nothing_left(bot)

        # After reconnecting the bot hears the thread again.
        script_council(fake_llm)
        await scene.bob.send(thread, FOLLOW_UP)
        assert [b.description for b in assert_all_final(scene, thread)] == [QUESTION, FOLLOW_UP]
        assert_nothing_left(bot)


# --- the bot stopped and started again ---------------------------------------------------------


async def test_restart_mid_round_interrupts_it_and_the_thread_carries_on(
    scene: Scene, fake_llm: FakeLLM, make_bot: Callable[..., ShenronBot]
) -> None:
    script_council(fake_llm, synthesis="Use ZFS, with ECC RAM.")
    await scene.alice.slash(scene.channel, "shenron", question=QUESTION)
    thread = scene.thread()
    old = scene.bot

    fake_llm.script("shenron", Script(text="Partial thoughts on SSD wear. " * 10, chunk_chars=8, token_interval=0.05))

    async def sigterm_while_synthesis_streams() -> None:
        def streaming(_: discord.Message, after: discord.Message) -> bool:
            return any(e.title == "🐉 SHENRON is writing…" and "Partial" in (e.description or "") for e in after.embeds)

        await old.wait_for("message_edit", check=streaming)
        await old.close()  # what run_bot does on SIGTERM

    stopper = asyncio.create_task(sigterm_while_synthesis_streams())
    await scene.bob.send(thread, FOLLOW_UP)
    await asyncio.wait_for(stopper, 5)

    first, second = assert_all_final(scene, thread)
    assert first.footer.text.startswith("✅ Done")
    assert second.footer.text.startswith("⏹️ Interrupted — SHENRON was shut down")
    assert embeds_in(scene, thread)[-1].title == "🐉 SHENRON — interrupted"
    assert old.is_closed() and old.stats.interrupted == 1
    assert_nothing_left(old)

    new = make_bot()
    await scene.env.restart_bot(new)
    script_council(fake_llm, synthesis="Mirrors, and watch the SSD wear.")
    fake_llm.requests.clear()
    await scene.alice.send(thread, "Third question")

    assert [(b.title, b.footer.text[:2]) for b in assert_all_final(scene, thread)] == [
        ("⚔️ Council — round 1", "✅ "),
        ("⚔️ Council — round 2", "⏹️"),
        ("⚔️ Council — round 3", "✅ "),
    ]
    # The interrupted round is not an answered turn: only round 1 is history.
    [prompt] = fighter_prompts(fake_llm, "vegeta")
    assert [(m["role"], m["content"]) for m in prompt[1:]] == [
        ("user", QUESTION),
        ("assistant", "Use ZFS, with ECC RAM."),
        ("user", "Third question"),
    ]
    assert new.stats.served == 1
    assert_nothing_left(old, new)


# --- the LLM backend dies mid-stream ----------------------------------------------------------


async def test_backend_killed_mid_stream(scene: Scene, fake_llm: FakeLLM) -> None:
    for i, name in enumerate(NAMES):
        # First tokens 0.1 s apart: each finds the board's edit slot free, so the board shows them.
        fake_llm.script(name.lower(), Script(text="word " * 400, first_token_delay=0.1 * i, token_interval=0.005))
    bot = scene.bot

    async def kill_when_all_are_writing() -> None:
        def all_writing(_: discord.Message, after: discord.Message) -> bool:
            board = after.embeds[0] if after.embeds else None
            if board is None or not (board.title or "").startswith(BOARD):
                return False
            return all(line.startswith("✍️") for line in board.fields[0].value.splitlines())

        await bot.wait_for("message_edit", check=all_writing)
        await fake_llm.kill()

    killer = asyncio.create_task(kill_when_all_are_writing())
    await scene.alice.slash(scene.channel, "shenron", question=QUESTION)
    await asyncio.wait_for(killer, 5)

    thread = scene.thread()
    [board] = assert_all_final(scene, thread)
    lines = board.fields[0].value.splitlines()
    assert len(lines) == 6 and all(line.startswith("❌") and line.endswith("· cut off") for line in lines)
    assert board.footer.text.startswith("❌ no synthesis — no fighter answered")
    failures = answers(scene, thread)
    assert len(failures) == 6
    for embed in failures:
        assert embed.colour.value == 0xED4245
        assert embed.description.startswith("**cut off** — ")
        assert "the connection broke mid-answer" in embed.description
    synthesis, timeline = embeds_in(scene, thread)[-2:]
    assert synthesis.title == "🐉 SHENRON — no synthesis" and timeline.title == "⏱️ Timeline"
    assert synthesis.description == "no fighter answered, so there is nothing to synthesise"
    assert synthesis.footer.text.startswith("0/6 answered")
    assert not any(r.model == "shenron" for r in fake_llm.requests)
    assert client_connections(fake_llm.port) == 0
    assert_nothing_left(bot)
