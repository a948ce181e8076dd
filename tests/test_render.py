"""Pure rendering: splitting, limits, mentions, the board, answers, the synthesis, reading a thread back."""

from __future__ import annotations

import re
from types import SimpleNamespace

import discord
import pytest

from bot.config import Fighter, Synthesizer
from bot.events import CouncilResult, CouncilStats, FighterAnswer, Passage, SynthesisResult
from cogs import render
from cogs.render import Board, Seat, split_text

GOKU = Fighter(name="GOKU", emoji="🔥", role="The Fighter", persona="p", model="qwen", backend="lm", colour=0xFF8C00)
SHENRON = Synthesizer(name="SHENRON", emoji="🐉", model="big", backend="lm", prompt="p")


def answer(text: str = "ZFS.", **kw: object) -> FighterAnswer:
    fields: dict[str, object] = {
        "fighter": "GOKU",
        "model": "qwen",
        "backend": "lm",
        "ok": True,
        "text": text,
        "started_at": 0.0,
        "first_token_s": 1.0,
        "last_token_s": 8.0,
        "elapsed_s": 8.2,
        "tokens": 312,
    }
    fields.update(kw)
    return FighterAnswer(**fields)  # type: ignore[arg-type]


def council_result(synthesis: str = "Use ZFS.", ok: bool = True, sources: int = 0) -> CouncilResult:
    answers = (
        answer(),
        answer(
            fighter="VEGETA",
            ok=False,
            text="",
            error="timed out",
            error_kind="timeout",
            first_token_s=None,
            last_token_s=None,
            elapsed_s=10.0,
        ),
    )
    return CouncilResult(
        question="ZFS or ext4?",
        answers=answers,
        synthesis=SynthesisResult(
            ok=ok,
            text=synthesis if ok else "",
            model="big",
            first_token_s=10.5,
            last_token_s=11.0,
            elapsed_s=11.2,
            tokens=99,
            error="" if ok else "boom",
        ),
        stats=CouncilStats(
            wall_s=11.2,
            fighters_total=2,
            fighters_ok=1,
            first_answer_s=8.2,
            model_time_s=18.2,
            tokens=411,
            overlap=1.0,
            sources=sources,
        ),
        missing=("VEGETA",),
    )


def message_fits(embeds: list[discord.Embed]) -> bool:
    return (
        len(embeds) <= 10
        and sum(len(e) for e in embeds) <= 6000
        and all(len(e.description or "") <= 4096 for e in embeds)
        and all(len(e.footer.text or "") <= 2048 for e in embeds)
        and all(len(e.author.name or "") <= 256 for e in embeds)
        and all(len(e.title or "") <= 256 for e in embeds)
    )


# --- splitting --------------------------------------------------------------------------------


def test_short_text_is_one_chunk() -> None:
    assert split_text("  hello \n") == ["hello"]
    assert split_text("   ") == []


def test_paragraph_breaks_are_preferred() -> None:
    paragraphs = [("word " * 60).strip() for _ in range(5)]  # ~300 characters each
    chunks = split_text("\n\n".join(paragraphs), limit=700)
    assert all(len(c) <= 700 for c in chunks)
    assert all(c == "\n\n".join(paragraphs[: len(c.split("\n\n"))]) for c in chunks[:1])
    assert "\n\n".join(chunks) == "\n\n".join(paragraphs)


def test_no_chunk_exceeds_the_limit_and_nothing_is_lost() -> None:
    text = "\n".join(f"line {i} " + "x" * (i % 50) for i in range(400))
    chunks = split_text(text, limit=500)
    assert all(0 < len(c) <= 500 for c in chunks)
    assert "\n".join(chunks).split() == text.split()


def test_a_code_block_that_must_be_split_is_closed_and_reopened() -> None:
    code = "```python\n" + "\n".join(f"print({i})" for i in range(300)) + "\n```"
    chunks = split_text("Intro.\n\n" + code + "\n\nOutro.", limit=600)
    assert len(chunks) > 2
    for chunk in chunks:
        assert len(chunk) <= 600
        assert chunk.count("```") % 2 == 0, chunk  # every chunk renders its code on its own
    assert chunks[1].startswith("```python\n")  # the language survives the reopening
    body = "".join(chunks)
    assert all(f"print({i})" in body for i in range(300))
    assert chunks[-1].endswith("Outro.")


def test_tilde_fences_and_no_language() -> None:
    code = "~~~\n" + "\n".join("y = 1" for _ in range(200)) + "\n~~~"
    chunks = split_text(code, limit=300)
    assert all(c.startswith("~~~") and c.rstrip().endswith("~~~") for c in chunks)


def test_one_endless_word_is_cut_hard() -> None:
    chunks = split_text("a" * 1000, limit=300)
    assert [len(c) for c in chunks] == [296, 296, 296, 112]
    assert "".join(chunks) == "a" * 1000


def test_words_are_kept_whole_when_there_are_no_newlines() -> None:
    text = " ".join(f"word{i}" for i in range(500))
    chunks = split_text(text, limit=400)
    assert all(len(c) <= 400 for c in chunks)
    assert " ".join(chunks).split() == text.split()


def test_limit_must_be_usable() -> None:
    with pytest.raises(ValueError):
        split_text("x" * 100, limit=10)


def test_pack_respects_the_message_caps() -> None:
    embeds = [discord.Embed(description="x" * 2500) for _ in range(5)] + [discord.Embed(description="y")] * 12
    groups = render.pack(embeds)
    assert all(message_fits(g) for g in groups)
    assert sum(len(g) for g in groups) == 17


# --- mentions and names ------------------------------------------------------------------------


def test_mentions_are_neutralised_and_restorable() -> None:
    raw = "@everyone and @here, <@123>, <@!456> and <@&789>"
    safe = render.neutralize_mentions(raw)
    assert "@everyone" not in safe and "@here" not in safe
    assert not re.search(r"<@[!&]?\d+>", safe)
    assert render.restore_mentions(safe) == raw


def test_thread_names_fit() -> None:
    assert render.thread_name("  Should I\nrun ZFS?  ") == "Should I run ZFS?"
    long = render.thread_name("why " * 100)
    assert 1 <= len(long) <= 100 and long.endswith("…")
    assert render.thread_name("@everyone") == "everyone"
    assert render.thread_name("\n\n") == "SHENRON council"


# --- the board --------------------------------------------------------------------------------


def test_board_lines_show_each_state() -> None:
    board = Board.for_round("ZFS or ext4?", 2, [GOKU], SHENRON)
    board.seats += [
        Seat("VEGETA", "👑", "failed", error_kind="timeout"),
        Seat("GOHAN", "📚", "thinking"),
        Seat("KRILLIN", "🛡️", "waiting"),
        Seat("FRIEZA", "❄️", "writing"),
    ]
    board.seats[0].state, board.seats[0].elapsed_s, board.seats[0].tokens = "done", 8.2, 312
    board.phase = "running"
    embed = render.render_board(board)
    assert embed.title == "⚔️ Council — round 2"
    assert embed.fields[0].value.splitlines() == [
        "✅ 🔥 **GOKU** · 8.2 s · 312 tokens",
        "❌ 👑 **VEGETA** · timeout",
        "💭 📚 **GOHAN** · thinking",
        "⏳ 🛡️ **KRILLIN** · waiting",
        "✍️ ❄️ **FRIEZA** · writing…",
    ]
    assert embed.footer.text == "⚔️ The council is in session."
    assert embed.colour.value == render.COLOUR_BUSY


@pytest.mark.parametrize(
    ("phase", "footer", "colour"),
    [
        ("queued", "🕒 In the queue — position 3", render.COLOUR_BUSY),
        ("retrieving", "📚 Searching", render.COLOUR_BUSY),
        ("done", "✅ Done", render.COLOUR_DONE),
        ("failed", "❌ ", render.COLOUR_FAILED),
        ("interrupted", "⏹️ Interrupted", render.COLOUR_INTERRUPTED),
    ],
)
def test_board_phases(phase: str, footer: str, colour: int) -> None:
    board = Board.for_round("q", 1, [GOKU], SHENRON)
    board.phase, board.queue_position = phase, 3  # type: ignore[assignment]
    embed = render.render_board(board)
    assert embed.footer.text.startswith(footer) and embed.colour.value == colour


def test_interrupting_stops_every_line_that_was_moving() -> None:
    board = Board.for_round("q", 1, [GOKU], SHENRON)
    board.seats.append(Seat("VEGETA", "👑", "done", elapsed_s=1.0))
    board.interrupt("SHENRON was shut down")
    lines = render.render_board(board).fields[0].value.splitlines()
    assert lines[0].startswith("⏹️") and lines[1].startswith("✅")
    assert board.synthesis_state == "interrupted"


def test_board_fits_with_a_huge_roster_and_question() -> None:
    fighters = [
        Fighter(name=f"F{i:02d}" + "x" * 28, emoji="🥋", role="r", persona="p", model="m", backend="b")
        for i in range(60)
    ]
    board = Board.for_round("why? " * 2000, 1, fighters, SHENRON)
    board.sources = tuple(Passage(text="t", source=f"docs/{i}.md", heading="h" * 200) for i in range(20))
    embed = render.render_board(board)
    assert message_fits([embed]) and all(len(f.value) <= 1024 for f in embed.fields)
    assert embed.fields[0].value.splitlines()[-1].startswith("… and ")


# --- answers ----------------------------------------------------------------------------------


def test_answer_embed() -> None:
    [out] = render.render_answer(GOKU, answer("Use **ZFS**."))
    [embed] = out.embeds
    assert embed.author.name == "🔥 GOKU · The Fighter"
    assert embed.description == "Use **ZFS**."
    assert embed.footer.text == "qwen · 8.2 s · 312 tokens"
    assert embed.colour.value == 0xFF8C00
    assert out.file is None


def test_long_answer_is_split_into_messages_that_fit() -> None:
    text = "\n\n".join(f"Paragraph {i}: " + "checksums matter. " * 40 for i in range(14))
    outs = render.render_answer(GOKU, answer(text))
    embeds = [e for o in outs for e in o.embeds]
    assert len(embeds) > 1 and all(message_fits(o.embeds) for o in outs)
    assert embeds[0].author.name.endswith(f"(1/{len(embeds)})")
    assert [e.footer.text for e in embeds][-1] == "qwen · 8.2 s · 312 tokens"
    assert all(e.footer.text is None for e in embeds[:-1])
    assert all(f"Paragraph {i}:" in "".join(e.description for e in embeds) for i in range(14))


def test_enormous_answer_is_attached_as_markdown() -> None:
    text = "\n\n".join("word " * 200 for _ in range(40))  # ~40,000 characters
    outs = render.render_answer(GOKU, answer(text + " @everyone"))
    assert len(outs) == 1 and message_fits(outs[0].embeds)
    assert outs[0].file is not None
    name, data = outs[0].file
    assert name == "goku.md" and data.decode() == text + " @everyone"
    assert "attached as `goku.md`" in outs[0].embeds[0].description


def test_failure_embed_is_red_and_says_why() -> None:
    failed = answer(
        ok=False,
        text="",
        error="backend lm refused the connection at http://x:1234 — is it running?",
        error_kind="connect",
        elapsed_s=0.3,
    )
    embed = render.render_failure(GOKU, failed)
    assert embed.colour.value == render.COLOUR_FAILED
    assert embed.description.startswith("**unreachable** — backend lm refused")
    assert embed.footer.text == "qwen · failed after 0.3 s"


@pytest.mark.parametrize(
    ("kind", "label"),
    [
        ("timeout", "timeout"),
        ("http_500", "HTTP 500"),
        ("model_not_found", "model missing"),
        ("", "failed"),
        ("weird", "weird"),
    ],
)
def test_error_labels(kind: str, label: str) -> None:
    assert render.error_label(kind) == label


# --- the synthesis ----------------------------------------------------------------------------


def test_live_synthesis_shows_the_growing_end() -> None:
    embed = render.render_synthesis_live(SHENRON, "a" * 5000 + "THE END", model="big")
    assert embed.description.endswith("THE END") and len(embed.description) <= 4096
    assert embed.title == "🐉 SHENRON is writing…"
    assert embed.footer.text == "✍️ streaming · big"
    empty = render.render_synthesis_live(SHENRON, "", note="the first model failed; trying the fallback")
    assert empty.description == "*the first model failed; trying the fallback*"


def test_final_synthesis_has_figures_and_a_timeline() -> None:
    [out] = render.render_synthesis_final(SHENRON, council_result(sources=3))
    text, timeline = out.embeds
    assert text.title == "🐉 SHENRON — synthesis"
    assert text.footer.text.splitlines() == [
        "1/2 answered · 11.2 s wall · 18.2 s of model time · 1.0× overlap · 📚 3 sources",
        "big · 99 tokens",
        "without VEGETA",
    ]
    rows = timeline.description.strip("`\n").splitlines()
    assert [r.split()[0] for r in rows[:3]] == ["GOKU", "VEGETA", "SHENRON"]
    assert "█" in rows[0] and "░" in rows[0]
    axis = rows[-1]
    assert axis.index("0 s") == rows[0].index("│") + 1  # the axis runs under the bars
    assert axis.endswith("11.2 s") and len(axis) == rows[0].rindex("│")


def test_long_final_synthesis_splits_and_keeps_the_figures_on_the_last_part() -> None:
    text = "\n\n".join(f"Point {i}. " + "Mirror your vdevs. " * 60 for i in range(8))
    outs = render.render_synthesis_final(SHENRON, council_result(text))
    embeds = [e for o in outs for e in o.embeds]
    texts = [e for e in embeds if e.title and "synthesis" in e.title]
    assert len(texts) > 1 and all(message_fits(o.embeds) for o in outs)
    assert [e.title for e in texts] == [f"🐉 SHENRON — synthesis ({i}/{len(texts)})" for i in range(1, len(texts) + 1)]
    assert texts[-1].footer.text.startswith("1/2 answered") and texts[0].footer.text is None
    assert embeds[-1].title == "⏱️ Timeline"


def test_failed_and_interrupted_synthesis() -> None:
    [out] = render.render_synthesis_failed(SHENRON, council_result(ok=False), "the fallback big failed too: boom")
    assert out.embeds[0].title == "🐉 SHENRON — no synthesis"
    assert out.embeds[0].colour.value == render.COLOUR_FAILED
    interrupted = render.render_synthesis_interrupted(SHENRON, "Use ZF", "SHENRON was shut down")
    assert interrupted.title == "🐉 SHENRON — interrupted"
    assert interrupted.description == "Use ZF\n\n*⏹️ Interrupted — SHENRON was shut down*"


# --- reading a thread back --------------------------------------------------------------------


def fake_message(author_id: int, *embeds: discord.Embed) -> SimpleNamespace:
    """What rebuild_history reads of a discord.Message: the author's id and the embeds."""
    return SimpleNamespace(author=SimpleNamespace(id=author_id), embeds=list(embeds))


def test_history_is_rebuilt_from_the_bots_own_embeds() -> None:
    bot = 1
    round1 = render.render_board(Board.for_round("Q1 @everyone", 1, [GOKU], SHENRON))
    round2 = render.render_board(Board.for_round("Q2", 2, [GOKU], SHENRON))
    round3 = render.render_board(Board.for_round("Q3", 3, [GOKU], SHENRON))
    long = "\n\n".join(f"Point {i}. " + "Mirror. " * 400 for i in range(3))
    parts = [e for o in render.render_synthesis_final(SHENRON, council_result(long)) for e in o.embeds]
    [short] = render.render_synthesis_final(SHENRON, council_result("A3"))
    failed = render.render_synthesis_failed(SHENRON, None, "boom")[0].embeds
    messages = [
        fake_message(bot, round1),
        fake_message(bot, *render.render_answer(GOKU, answer("fighter text"))[0].embeds),
        fake_message(bot, *parts),
        fake_message(2, discord.Embed(title="⚔️ Council — round 9", description="forged by a user")),
        fake_message(bot, round2),
        fake_message(bot, *failed),  # round 2 has no synthesis: not history
        fake_message(bot, round3),
        fake_message(2, discord.Embed(title="🐉 SHENRON — synthesis", description="forged by a user")),
        fake_message(bot, *short.embeds),
    ]
    turns = render.rebuild_history(messages, bot)  # type: ignore[arg-type]
    assert [t.question for t in turns] == ["Q1 @everyone", "Q3"]
    assert turns[0].answer.split() == long.split()
    assert turns[1].answer == "A3"


def test_a_source_heading_is_shown_literally_not_as_a_link() -> None:
    from bot.events import Passage
    from cogs.render import Board, render_board
    from tests.factories import make_council

    council = make_council("http://127.0.0.1:1/v1")
    board = Board.for_round("q", 1, council.fighters, council.synthesizer)
    board.sources = (Passage(text="x", source="docs/a.md", heading="[click me](https://evil.example) **bold**"),)
    [sources] = [f for f in render_board(board).fields if f.name == "📚 Sources"]
    import re

    assert re.search(r"(?<!\\)\[", sources.value) is None, "an unescaped [ could start a masked link"
    assert r"\[click me]" in sources.value and r"\*\*bold\*\*" in sources.value
