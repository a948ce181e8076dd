"""Thread follow-ups: each message in a council thread is a new round that remembers the thread."""

from __future__ import annotations

from collections.abc import Callable

import discord
import pytest

from bot.discord_bot import ShenronBot
from tests.discord_fixtures import GatedKnowledge, Scene, script_council
from tests.fakeserver import FakeLLM, Script

QUESTION = "Should I run ZFS or ext4 on my R730?"
FOLLOW_UP = "And what about SSD wear?"


def boards(scene: Scene) -> list[discord.Embed]:
    return [
        e
        for m in scene.bot_messages(scene.thread())
        for e in m.embeds
        if (e.title or "").startswith("⚔️ Council — round")
    ]


def fighter_messages_sent(fake: FakeLLM, model: str) -> list[list[dict[str, str]]]:
    return [r.body["messages"] for r in fake.requests if r.path.endswith("/chat/completions") and r.model == model]


async def first_round(scene: Scene, fake: FakeLLM) -> None:
    script_council(fake, synthesis="Use ZFS, with ECC RAM.")
    await scene.alice.slash(scene.channel, "shenron", question=QUESTION)
    fake.requests.clear()


async def test_follow_up_is_a_new_round_with_the_threads_history(scene: Scene, fake_llm: FakeLLM) -> None:
    await first_round(scene, fake_llm)
    await scene.bob.send(scene.thread(), FOLLOW_UP)

    assert [(b.title, b.description) for b in boards(scene)] == [
        ("⚔️ Council — round 1", QUESTION),
        ("⚔️ Council — round 2", FOLLOW_UP),
    ]
    assert boards(scene)[1].footer.text.startswith("✅ Done · 6/6")
    [messages] = fighter_messages_sent(fake_llm, "goku")
    assert [(m["role"], m["content"]) for m in messages[1:]] == [
        ("user", QUESTION),
        ("assistant", "Use ZFS, with ECC RAM."),
        ("user", FOLLOW_UP),
    ]
    [synthesis] = fighter_messages_sent(fake_llm, "shenron")
    assert synthesis[1:3] == [
        {"role": "user", "content": QUESTION},
        {"role": "assistant", "content": "Use ZFS, with ECC RAM."},
    ]
    assert scene.bot.stats.served == 2


async def test_history_survives_a_restart(scene: Scene, fake_llm: FakeLLM, make_bot: Callable[..., ShenronBot]) -> None:
    await first_round(scene, fake_llm)
    old = scene.bot
    await scene.env.restart_bot(make_bot())
    assert scene.bot is not old and scene.bot.stats.served == 0  # a fresh process knows nothing

    await scene.bob.send(scene.thread(), FOLLOW_UP)

    assert [b.title for b in boards(scene)] == ["⚔️ Council — round 1", "⚔️ Council — round 2"]
    [messages] = fighter_messages_sent(fake_llm, "vegeta")
    assert [(m["role"], m["content"]) for m in messages[1:]] == [
        ("user", QUESTION),
        ("assistant", "Use ZFS, with ECC RAM."),
        ("user", FOLLOW_UP),
    ]


async def test_messages_outside_council_threads_are_ignored(scene: Scene, fake_llm: FakeLLM) -> None:
    await first_round(scene, fake_llm)
    await scene.bob.send(scene.channel, "ZFS is great")  # the parent channel, not the thread
    assert fake_llm.requests == []
    assert len(boards(scene)) == 1


async def test_a_failed_round_is_not_history(scene: Scene, fake_llm: FakeLLM) -> None:
    await first_round(scene, fake_llm)
    fake_llm.script("shenron", Script(status=400, error_message="context too long"))
    fake_llm.script("shenron-fallback", Script(status=400, error_message="context too long"))
    await scene.bob.send(scene.thread(), FOLLOW_UP)
    script_council(fake_llm)
    fake_llm.requests.clear()
    await scene.alice.send(scene.thread(), "Third question")

    assert [b.title for b in boards(scene)][-1] == "⚔️ Council — round 3"
    [messages] = fighter_messages_sent(fake_llm, "goku")
    # Round 2 had no synthesis: only round 1 is history.
    assert [m["content"] for m in messages[1:]] == [QUESTION, "Use ZFS, with ECC RAM.", "Third question"]


@pytest.mark.simcord(approved_intents=discord.Intents.default())  # MESSAGE_CONTENT not enabled in the portal
class TestWithoutMessageContent:
    @pytest.fixture
    def simcord_bot(self, make_bot: Callable[..., ShenronBot]) -> ShenronBot:
        return make_bot(message_content=False)

    async def test_follow_ups_need_a_mention(self, scene: Scene, fake_llm: FakeLLM) -> None:
        await first_round(scene, fake_llm)
        thread = scene.thread()

        await scene.bob.send(thread, FOLLOW_UP)  # arrives without its text: nothing to answer
        assert len(boards(scene)) == 1 and fake_llm.requests == []

        me = scene.bot.user
        assert me is not None
        await scene.bob.send(thread, f"<@{me.id}> {FOLLOW_UP}")
        assert [(b.title, b.description) for b in boards(scene)][-1] == ("⚔️ Council — round 2", FOLLOW_UP)
        [messages] = fighter_messages_sent(fake_llm, "goku")
        assert [m["content"] for m in messages[1:]] == [QUESTION, "Use ZFS, with ECC RAM.", FOLLOW_UP]


async def test_shenron_inside_a_council_thread_continues_it(scene: Scene, fake_llm: FakeLLM) -> None:
    await first_round(scene, fake_llm)
    thread = scene.thread()
    result = await scene.bob.slash(thread, "shenron", question=FOLLOW_UP)

    assert not result.ephemeral and len(scene.channel.threads) == 1  # no thread inside the thread
    assert [(b.title, b.description) for b in boards(scene)][-1] == ("⚔️ Council — round 2", FOLLOW_UP)
    [messages] = fighter_messages_sent(fake_llm, "goku")
    assert [m["content"] for m in messages[1:]] == [QUESTION, "Use ZFS, with ECC RAM.", FOLLOW_UP]


class TestWhileARoundRuns:
    @pytest.fixture
    def knowledge(self) -> GatedKnowledge:
        return GatedKnowledge()

    async def test_a_second_follow_up_waits_its_turn(
        self, scene: Scene, fake_llm: FakeLLM, knowledge: GatedKnowledge
    ) -> None:
        knowledge.env = scene.env
        script_council(fake_llm)
        await scene.alice.slash(scene.channel, "shenron", question=QUESTION)
        thread = scene.thread()

        reply_to = await scene.bob.send(thread, FOLLOW_UP)

        answer = scene.bot_messages(thread)[-1]
        assert answer.content.startswith("A round is still running in this thread")
        assert answer.reference is not None and answer.reference.message_id == reply_to.id
        knowledge.gate.set()
        await scene.env.settle()
        assert len(boards(scene)) == 1 and boards(scene)[0].footer.text.startswith("✅ Done")
