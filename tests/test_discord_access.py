"""Who may convene a council, how often, and how many at once."""

from __future__ import annotations

from dataclasses import replace

import discord
import pytest

from bot.config import Settings
from bot.events import Passage
from tests.discord_fixtures import GatedKnowledge, Scene, script_council
from tests.fakeserver import FakeLLM

QUESTION = "Should I run ZFS or ext4 on my R730?"
RUNBOOK = Passage(text="Use ZFS mirrors on the R730.", source="docs/runbook.md", heading="Storage", score=0.9)


def board_of(scene: Scene, thread_index: int = 0) -> discord.Embed:
    thread = scene.channel.threads[thread_index]
    return scene.bot_messages(thread)[0].embeds[0]


class TestWhileACouncilIsInFlight:
    """The first council is held in retrieval (the gated knowledge base) while others ask."""

    @pytest.fixture
    def knowledge(self) -> GatedKnowledge:
        return GatedKnowledge([RUNBOOK])

    @pytest.fixture
    def bot_settings(self) -> Settings:
        return Settings(edit_interval_s=0.05, max_concurrent_councils=1)

    async def test_a_second_request_from_the_same_user_is_refused_kindly(
        self, scene: Scene, fake_llm: FakeLLM, knowledge: GatedKnowledge
    ) -> None:
        knowledge.env = scene.env
        script_council(fake_llm)
        await scene.alice.slash(scene.channel, "shenron", question=QUESTION)
        assert board_of(scene).footer.text == "📚 Searching the knowledge base…"

        second = await scene.alice.slash(scene.channel, "shenron", question="And btrfs?")

        assert second.ephemeral and second.response is not None
        assert "still in session" in second.response.content
        assert len(scene.channel.threads) == 1
        knowledge.gate.set()
        await scene.env.settle()
        board = board_of(scene)
        assert board.footer.text.startswith("✅ Done · 6/6 answered")
        assert "runbook.md › Storage" in board.fields[2].value
        synthesis = scene.bot_messages(scene.thread())[-1].embeds[0]
        assert "📚 1 source" in synthesis.footer.text
        assert knowledge.queries == [QUESTION]
        # Retrieved text reached the fighters, delimited as untrusted documents.
        goku = next(r.body for r in fake_llm.requests if r.model == "goku")
        assert "<documents>" in goku["messages"][-1]["content"]
        assert "Use ZFS mirrors on the R730." in goku["messages"][-1]["content"]

    async def test_the_queue_shows_its_position_and_then_runs(
        self, scene: Scene, fake_llm: FakeLLM, knowledge: GatedKnowledge
    ) -> None:
        knowledge.env = scene.env
        script_council(fake_llm)
        await scene.alice.slash(scene.channel, "shenron", question=QUESTION)
        await scene.bob.slash(scene.channel, "shenron", question="And for a laptop?")

        assert board_of(scene, 1).footer.text.startswith("🕒 In the queue — position 1")
        assert scene.bot.queue.running == 1 and scene.bot.queue.queued == 1
        knowledge.gate.set()
        await scene.env.settle()
        assert board_of(scene, 0).footer.text.startswith("✅ Done")
        assert board_of(scene, 1).footer.text.startswith("✅ Done")
        assert scene.bot.queue.running == 0 and scene.bot.queue.queued == 0

    async def test_context_false_skips_the_knowledge_base(
        self, scene: Scene, fake_llm: FakeLLM, knowledge: GatedKnowledge
    ) -> None:
        script_council(fake_llm)
        await scene.alice.slash(scene.channel, "shenron", question=QUESTION, context=False)
        assert knowledge.queries == []
        assert board_of(scene).footer.text.startswith("✅ Done")
        assert len(board_of(scene).fields) == 2  # no sources field


async def test_cooldown_per_user(scene: Scene, fake_llm: FakeLLM) -> None:
    scene.bot.settings = replace(scene.bot.settings, user_cooldown_s=60.0)
    scene.bot.get_cog("CouncilCog").gate.cooldown_s = 60.0  # type: ignore[union-attr]
    script_council(fake_llm)
    await scene.alice.slash(scene.channel, "shenron", question=QUESTION)

    again = await scene.alice.slash(scene.channel, "shenron", question="Once more?")
    assert again.ephemeral and "ask again in 60 s" in again.response.content
    other = await scene.bob.slash(scene.channel, "shenron", question="My turn?")
    assert not other.ephemeral  # the cooldown is per user

    await scene.env.advance_time(61)
    later = await scene.alice.slash(scene.channel, "shenron", question="Once more?")
    assert not later.ephemeral
    assert len(scene.channel.threads) == 3


async def test_allow_lists(scene: Scene, fake_llm: FakeLLM) -> None:
    script_council(fake_llm)
    other = scene.guild.create_text_channel("other")
    vip = scene.guild.create_role("VIP")
    scene.bot.settings = replace(scene.bot.settings, allowed_channel_ids=frozenset({other.id}))
    refused = await scene.alice.slash(scene.channel, "shenron", question=QUESTION)
    assert refused.ephemeral and "does not answer in this channel" in refused.response.content
    assert scene.channel.threads == [] and fake_llm.requests == []

    scene.bot.settings = replace(
        scene.bot.settings, allowed_channel_ids=frozenset(), allowed_role_ids=frozenset({vip.id})
    )
    refused = await scene.alice.slash(scene.channel, "shenron", question=QUESTION)
    assert refused.ephemeral and "roles allowed" in refused.response.content

    scene.bot.settings = replace(scene.bot.settings, allowed_role_ids=frozenset(), allowed_guild_ids=frozenset({12345}))
    refused = await scene.alice.slash(scene.channel, "shenron", question=QUESTION)
    assert refused.ephemeral and "not enabled in this server" in refused.response.content

    scene.bot.settings = replace(
        scene.bot.settings,
        allowed_guild_ids=frozenset({scene.guild.id}),
        allowed_channel_ids=frozenset({scene.channel.id}),
    )
    allowed = await scene.alice.slash(scene.channel, "shenron", question=QUESTION)
    assert not allowed.ephemeral and len(scene.channel.threads) == 1


async def test_pick_fighters(scene: Scene, fake_llm: FakeLLM) -> None:
    script_council(fake_llm)
    await scene.alice.slash(scene.channel, "shenron", question=QUESTION, fighters="goku, Vegeta")

    lines = board_of(scene).fields[0].value.splitlines()
    assert [line.split()[2] for line in lines] == ["**GOKU**", "**VEGETA**"]
    answered = {r.model for r in fake_llm.requests if r.path.endswith("/chat/completions")}
    assert answered == {"goku", "vegeta", "shenron"}
    assert board_of(scene).footer.text.startswith("✅ Done · 2/2 answered")


async def test_unknown_fighter_is_refused_with_the_roster(scene: Scene, fake_llm: FakeLLM) -> None:
    result = await scene.alice.slash(scene.channel, "shenron", question=QUESTION, fighters="goku, bulma")
    assert result.ephemeral
    assert result.response.content.startswith("No fighter named bulma. Choose from: GOKU, VEGETA")
    assert scene.channel.threads == []


async def test_fighters_autocomplete_completes_the_last_name(scene: Scene) -> None:
    choices = await scene.alice.autocomplete(scene.channel, "shenron", "fighters", "goku, ve", question=QUESTION)
    assert [c["value"] for c in choices] == ["goku, VEGETA"]


class TestQueueOfThree:
    @pytest.fixture
    def knowledge(self) -> GatedKnowledge:
        return GatedKnowledge()

    @pytest.fixture
    def bot_settings(self) -> Settings:
        return Settings(edit_interval_s=0.05, max_concurrent_councils=1)

    async def test_positions_move_up_as_seats_free(
        self, scene: Scene, fake_llm: FakeLLM, knowledge: GatedKnowledge
    ) -> None:
        knowledge.env = scene.env
        script_council(fake_llm)
        carol = scene.guild.add_member(scene.env.create_user("carol"))
        await scene.alice.slash(scene.channel, "shenron", question=QUESTION)
        await scene.bob.slash(scene.channel, "shenron", question="Laptop?")
        await carol.slash(scene.channel, "shenron", question="Desktop?")
        assert board_of(scene, 2).footer.text.startswith("🕒 In the queue — position 2")

        knowledge.gate.set()
        await scene.env.settle()

        carol_thread = scene.channel.threads[2]
        shown = [
            e["footer"]["text"]
            for r in scene.env.http_requests
            if r.path.startswith(f"/channels/{carol_thread.id}/messages") and isinstance(r.json, dict)
            for e in r.json.get("embeds", [])
            if e.get("title", "").startswith("⚔️")
        ]
        positions = [t for t in shown if t.startswith("🕒 In the queue")]
        assert [p.split("position ")[1][0] for p in positions] == ["2", "1"]
        assert all(board_of(scene, i).footer.text.startswith("✅ Done") for i in range(3))


class TestBrokenKnowledgeBase:
    class Broken:
        async def search(self, query: str) -> list[Passage]:
            raise OSError("chroma folder is locked by another process")

        async def stats(self) -> None:
            raise OSError("chroma folder is locked by another process")

    @pytest.fixture
    def knowledge(self) -> Broken:
        return self.Broken()

    async def test_the_council_goes_on_without_it(self, scene: Scene, fake_llm: FakeLLM) -> None:
        script_council(fake_llm)
        await scene.alice.slash(scene.channel, "shenron", question=QUESTION)
        board = board_of(scene)
        assert board.footer.text.startswith("✅ Done · 6/6")
        assert board.fields[2].value == "knowledge base unavailable for this round"

        health = await scene.admin.slash(scene.channel, "health")
        fields = {f.name: f.value for f in health.response.embeds[0].fields}
        assert fields["Knowledge base"] == "❌ chroma folder is locked by another process"
