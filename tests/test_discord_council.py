"""/shenron end to end: a real ShenronBot on simcord's Discord, fighters on the fake LLM server."""

from __future__ import annotations

import re
import time

import pytest

from tests.discord_fixtures import EDIT_INTERVAL_S, GatedKnowledge, Scene, script_council
from tests.factories import NAMES
from tests.fakeserver import FakeLLM, Script

QUESTION = "Should I run ZFS or ext4 on my R730?"


async def test_full_council(scene: Scene, fake_llm: FakeLLM) -> None:
    arrival = script_council(fake_llm, stagger_s=0.08)  # far enough apart to arrive in this order
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
    assert re.match(
        r"6/6 answered · \d+\.\d s wall · \d+\.\d s of model time · \d+\.\d× overlap", text_embed.footer.text
    )
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


async def test_one_fighter_fails_with_words_a_user_can_act_on(scene: Scene, fake_llm: FakeLLM) -> None:
    script_council(fake_llm)
    fake_llm.script("vegeta", Script(status=500, error_message="CUDA out of memory"))
    await scene.alice.slash(scene.channel, "shenron", question=QUESTION)

    messages = scene.bot_messages(scene.thread())
    failed = [m.embeds[0] for m in messages if m.embeds[0].author.name and "VEGETA" in m.embeds[0].author.name]
    [embed] = failed
    assert embed.colour.value == 0xED4245
    assert "HTTP 500" in embed.description and "CUDA out of memory" in embed.description
    assert embed.footer.text.startswith("vegeta · failed after")

    board = messages[0].embeds[0]
    vegeta = next(line for line in board.fields[0].value.splitlines() if "VEGETA" in line)
    assert vegeta.startswith("❌") and "HTTP 500" in vegeta
    assert board.footer.text.startswith("✅ Done · 5/6 answered")

    synthesis = messages[-1].embeds[0]
    assert synthesis.title == "🐉 SHENRON — synthesis"
    assert synthesis.footer.text.startswith("5/6 answered")
    assert "without VEGETA" in synthesis.footer.text


async def test_all_fighters_fail_and_nothing_looks_alive(scene: Scene, fake_llm: FakeLLM) -> None:
    for name in NAMES:
        fake_llm.script(name.lower(), Script(status=503, error_message="model is loading"))
    await scene.alice.slash(scene.channel, "shenron", question=QUESTION)

    messages = scene.bot_messages(scene.thread())
    assert len(messages) == 1 + 6 + 1
    assert all(m.embeds[0].colour.value == 0xED4245 for m in messages[1:7])
    [synthesis] = messages[-1].embeds[:1]
    assert synthesis.title == "🐉 SHENRON — no synthesis"
    assert "no fighter answered" in synthesis.description
    assert synthesis.footer.text.startswith("0/6 answered")
    board = messages[0].embeds[0]
    assert board.colour.value == 0xED4245
    assert board.footer.text.startswith("❌ no synthesis")
    assert all(line.startswith("❌") for line in board.fields[0].value.splitlines())
    assert "✅" not in board.fields[1].value and "💭" not in board.fields[1].value
    assert scene.bot.stats.failed == 1


async def test_a_9000_character_answer_is_split_within_discord_limits(scene: Scene, fake_llm: FakeLLM) -> None:
    script_council(fake_llm)
    paragraphs = [f"Paragraph {i}. " + "ZFS checksums every block. " * 30 for i in range(11)]
    code = "```python\n" + "\n".join(f"print({i})  # verify the pool" for i in range(60)) + "\n```"
    long_text = "\n\n".join([*paragraphs[:6], code, *paragraphs[6:]])
    assert len(long_text) > 9000
    fake_llm.script("goku", Script(text=long_text, chunk_chars=500))
    await scene.alice.slash(scene.channel, "shenron", question=QUESTION)

    goku = [
        m
        for m in scene.bot_messages(scene.thread())
        if m.embeds and m.embeds[0].author.name and "GOKU" in m.embeds[0].author.name
    ]
    embeds = [e for m in goku for e in m.embeds]
    assert len(embeds) >= 3 and len(goku) < len(embeds)  # split, and parts share messages
    for message in goku:
        assert sum(len(e) for e in message.embeds) <= 6000 and len(message.embeds) <= 10
    for embed in embeds:
        assert len(embed.description) <= 4096
        assert embed.description.count("```") % 2 == 0  # every chunk's code block is closed
    joined = "".join(e.description for e in embeds)
    for i in range(11):
        assert f"Paragraph {i}." in joined
    assert all(f"print({i})" in joined for i in range(60))
    n = len(embeds)
    assert [e.author.name.rsplit(" ", 1)[-1] for e in embeds] == [f"({i}/{n})" for i in range(1, n + 1)]
    assert not goku[-1].attachments
    assert embeds[-1].footer.text.startswith("goku · ")


async def test_model_output_never_pings(scene: Scene, fake_llm: FakeLLM) -> None:
    script_council(fake_llm, synthesis="Tell @here and @everyone, and <@&123> too.")
    fake_llm.script("goku", Script(text="@everyone listen: ZFS! <@42>"))
    await scene.alice.slash(scene.channel, "shenron", question="@everyone what now?")

    thread = scene.thread()
    every = [r for r in scene.env.http_requests if r.method in ("POST", "PATCH") and isinstance(r.json, dict)]
    # Every message the bot posts or edits says: mention nobody.
    assert all(r.json.get("allowed_mentions", {"parse": []}) == {"parse": []} for r in every)
    for message in scene.bot_messages(thread):
        assert not message.mention_everyone and not message.role_mentions and not message.mentions
        for embed in message.embeds:
            text = (embed.description or "") + (embed.footer.text or "")
            assert "@everyone" not in text and "@here" not in text and "<@&123>" not in text
    goku = next(
        m.embeds[0] for m in scene.bot_messages(thread) if m.embeds[0].author.name and "GOKU" in m.embeds[0].author.name
    )
    assert goku.description == "@\u200beveryone listen: ZFS! <@\u200b42>"
    assert thread.name == "everyone what now?"


async def test_a_discord_failure_mid_council_still_ends_in_a_final_state(scene: Scene, fake_llm: FakeLLM) -> None:
    script_council(fake_llm)
    scene.env.inject_error(
        "POST", "/channels/*/messages", status=403, code=50013, message="Missing Permissions", times=None
    )
    await scene.alice.slash(scene.channel, "shenron", question=QUESTION)

    # Even the board could not be posted: nothing is left looking alive, and the bot noticed.
    assert scene.bot_messages(scene.thread()) == []
    assert scene.bot.stats.failed == 1 and not scene.bot.rounds


class TestPermissionLostMidRound:
    @pytest.fixture
    def knowledge(self) -> GatedKnowledge:
        return GatedKnowledge()

    async def test_the_board_still_ends_in_a_final_state(
        self, scene: Scene, fake_llm: FakeLLM, knowledge: GatedKnowledge
    ) -> None:
        knowledge.env = scene.env
        script_council(fake_llm)
        await scene.alice.slash(scene.channel, "shenron", question=QUESTION)  # held in retrieval
        thread = scene.thread()
        # The bot loses Send Messages in the thread; edits of its own messages still work.
        scene.env.inject_error(
            "POST", f"/channels/{thread.id}/messages", status=403, code=50013, message="Missing Permissions", times=None
        )
        knowledge.gate.set()
        await scene.env.settle()

        [board_message] = scene.bot_messages(thread)
        board = board_message.embeds[0]
        assert board.footer.text.startswith("❌ SHENRON hit an error (Forbidden)")
        assert board.colour.value == 0xED4245
        assert not any(line.startswith(("⏳", "💭", "✍️")) for line in board.fields[0].value.splitlines())
        assert scene.bot.stats.failed == 1 and not scene.bot.rounds
