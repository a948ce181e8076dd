"""Pure rendering: council state and events in, ``discord.Embed`` objects and text out.

Nothing here touches the network, so every Discord limit is checked by unit tests
(``tests/test_render.py``). The cogs only decide *when* to send or edit; this module decides
*what*, and guarantees it fits: 4096 characters per description, 6000 per message, 10 embeds.
"""

from __future__ import annotations

import re
import unicodedata
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import discord
from discord.utils import escape_markdown

from bot.config import Fighter, Synthesizer
from bot.events import CouncilResult, FighterAnswer, Passage, Turn
from bot.timeline import serialised_hint, summary_line, timeline_text

# --- Discord's limits, with a little headroom -------------------------------------------------
# Discord counts some characters (astral emoji) as two; the headroom keeps such text under the cap.

DESCRIPTION_LIMIT = 4000  # real cap 4096
MESSAGE_EMBEDS_TOTAL = 5800  # real cap 6000, all embeds of one message together
EMBEDS_PER_MESSAGE = 10
TITLE_LIMIT = 256
AUTHOR_LIMIT = 256
FOOTER_LIMIT = 2048
FIELD_NAME_LIMIT = 256
FIELD_VALUE_LIMIT = 1024
CONTENT_LIMIT = 2000
THREAD_NAME_LIMIT = 100
QUESTION_LIMIT = 3500  # how much of a question the board shows (the board needs room for its fields)
PACKED_LIMIT = 2700  # a long text is cut this small so two parts (plus author and footer) share a message
MAX_HEALTH_BACKENDS = 20  # 25 fields per embed, minus the knowledge base, Discord and councils lines
ATTACH_AFTER_PARTS = 8  # a text needing more parts than this (~20k characters) is attached as .md instead

# --- colours ----------------------------------------------------------------------------------

COLOUR_BUSY = 0x5865F2  # Discord blurple: something is still happening
COLOUR_DONE = 0x57F287
COLOUR_FAILED = 0xED4245
COLOUR_INTERRUPTED = 0xE67E22

# --- how rounds are recognised when the thread is read back (history after a restart) ---------

BOARD_TITLE = "⚔️ Council — round {n}"
BOARD_TITLE_RE = re.compile(r"^⚔️ Council — round \d+")
SYNTHESIS_TITLE_SUFFIX = "— synthesis"
SYNTHESIS_TITLE_RE = re.compile(r"— synthesis(?: \(\d+/\d+\))?$")

ZWSP = "\u200b"
_MASS_MENTION = re.compile(r"@(everyone|here)")
_ID_MENTION = re.compile(r"<@([!&]?\d+)>")


def neutralize_mentions(text: str) -> str:
    """Break ``@everyone``, ``@here`` and ``<@id>`` so they never ping or render as mentions.

    ``allowed_mentions=none`` already stops the ping; this also stops the text from *looking*
    like one (a model saying "@everyone" is shown as plain text).
    """
    text = _MASS_MENTION.sub(lambda m: f"@{ZWSP}{m.group(1)}", text)
    return _ID_MENTION.sub(lambda m: f"<@{ZWSP}{m.group(1)}>", text)


def restore_mentions(text: str) -> str:
    """Undo :func:`neutralize_mentions`, for text read back into a prompt."""
    return text.replace(f"@{ZWSP}", "@")


def clip(text: str, limit: int, marker: str = "…") -> str:
    """``text`` cut to ``limit`` characters, ending with ``marker`` when cut."""
    if len(text) <= limit:
        return text
    return text[: max(0, limit - len(marker))].rstrip() + marker


_JOINERS = frozenset("\u200c\u200d")  # ZWNJ and ZWJ shape some scripts and join emoji: kept
# Characters that draw nothing although they are not whitespace: Hangul fillers, the braille blank,
# variation selectors.
_BLANK = frozenset("\u115f\u1160\u2800\u3164\uffa0") | frozenset(map(chr, range(0xFE00, 0xFE10)))


def clean_question(text: str) -> str:
    """A question as the council should see it; "" when nothing visible is left.

    Line breaks become "\n" and tabs spaces; control characters, lone surrogates and invisible
    format characters (zero-width spaces, bidi overrides, Unicode tag characters) are dropped.
    """
    text = text.replace("\r\n", "\n").replace("\r", "\n").replace("\t", " ")
    kept = "".join(
        c for c in text if c == "\n" or c in _JOINERS or unicodedata.category(c) not in ("Cc", "Cf", "Cs")
    ).strip()
    if all(c.isspace() or c in _JOINERS or c in _BLANK for c in kept):
        return ""
    return kept


def thread_name(question: str) -> str:
    """A thread name (1–100 characters, one line) made from the question."""
    flat = " ".join(clean_question(restore_mentions(question)).replace("@", "").split())
    return clip(flat, THREAD_NAME_LIMIT) or "SHENRON council"


# --- splitting long text ----------------------------------------------------------------------

_FENCE = re.compile(r"^\s*(`{3,}|~{3,})(.*)$")
FENCE_MARKER_LIMIT = 10


def _toggle(open_fence: str | None, line: str) -> str | None:
    """The fence still open after ``line``: a fence line opens one, a bare fence line closes it."""
    m = _FENCE.match(line)
    if m is None:
        return open_fence
    info = m.group(2).strip()
    if open_fence is None:
        # Remember the marker and the language only: that is what the next chunk reopens with.
        # Both capped: a model stuck repeating "`" makes a fence line thousands of characters long.
        return m.group(1)[:FENCE_MARKER_LIMIT] + (info.split()[0][:20] if info else "")
    return None if not info else open_fence


def _fence_at(text: str, fence: str | None) -> str | None:
    for line in text.split("\n"):
        fence = _toggle(fence, line)
    return fence


@dataclass(slots=True)
class _Cut:
    at: int  # where the next chunk starts
    fence: str | None  # the code fence still open at the cut, to close and reopen
    clean: bool = True  # False for a hard cut in the middle of a word


def _best_cut(text: str, room: int, fence: str | None) -> _Cut:
    """Where to end a chunk within ``text[:room]``: paragraph > line > word > anywhere."""
    paragraph: _Cut | None = None
    line: _Cut | None = None
    open_fence = fence
    pos = 0
    while (nl := text.find("\n", pos)) >= 0 and nl + 1 <= room:
        current = text[pos:nl]
        open_fence = _toggle(open_fence, current)
        at = nl + 1
        if open_fence is None and (text.startswith("\n", at) or _FENCE.match(current)):
            paragraph = _Cut(at, None)  # a blank line, or the end of a code block
        line = _Cut(at, open_fence)
        pos = at
    # Cutting very early makes a stub chunk; prefer a lesser break that keeps the chunk full.
    enough = room // 3
    for cut in (paragraph, line):
        if cut is not None and cut.at >= enough:
            return cut
    space = text.rfind(" ", 0, room)
    if space >= enough:
        return _Cut(space + 1, _fence_at(text[:space], fence))
    fallback = max((c for c in (paragraph, line) if c is not None), key=lambda c: c.at, default=None)
    if fallback is not None:
        return fallback
    return _Cut(room, _fence_at(text[:room], fence), clean=False)


def _closer(fence: str) -> str:
    marker = _FENCE.match(fence)
    return marker.group(1) if marker else "```"


def split_text(text: str, limit: int = DESCRIPTION_LIMIT) -> list[str]:
    """Split ``text`` into chunks of at most ``limit`` characters.

    Prefers paragraph breaks and the ends of code blocks, then line breaks, then spaces. A code
    block that must be split is closed at the end of one chunk and reopened (same language) at
    the start of the next, so every chunk renders on its own.
    """
    text = text.strip()
    if not text:
        return []
    if limit < 40:
        raise ValueError("limit too small to split into readable chunks")
    chunks: list[str] = []
    fence: str | None = None
    rest = text
    while rest:
        head = f"{fence}\n" if fence else ""
        if len(head) + len(rest) <= limit:
            chunks.append(head + rest)
            break
        room = limit - len(head) - 4  # room for a closing "\n```"
        cut = _best_cut(rest, room, fence)
        chunk = head + (rest[: cut.at].rstrip() if cut.clean else rest[: cut.at])
        if cut.fence is not None:
            chunk += "\n" + _closer(cut.fence)
        chunks.append(chunk)
        rest = rest[cut.at :].lstrip(" \n") if cut.clean else rest[cut.at :]
        fence = cut.fence
    return chunks


# --- messages ---------------------------------------------------------------------------------


@dataclass(slots=True)
class Outgoing:
    """One message to send: embeds (already within the limits) and perhaps a file."""

    embeds: list[discord.Embed] = field(default_factory=list)
    file: tuple[str, bytes] | None = None  # (filename, content)
    content: str = ""

    def to_kwargs(self) -> dict[str, Any]:
        kwargs: dict[str, Any] = {"embeds": self.embeds}
        if self.content:
            kwargs["content"] = self.content
        if self.file is not None:
            import io

            kwargs["file"] = discord.File(io.BytesIO(self.file[1]), filename=self.file[0])
        return kwargs


def embed_size(embed: discord.Embed) -> int:
    """Characters that count toward the 6000-per-message cap."""
    return len(embed)


def pack(embeds: Sequence[discord.Embed]) -> list[list[discord.Embed]]:
    """Group embeds into messages: at most 10 and 6000 characters (with headroom) per message."""
    groups: list[list[discord.Embed]] = []
    size = 0
    for embed in embeds:
        n = embed_size(embed)
        if not groups or len(groups[-1]) >= EMBEDS_PER_MESSAGE or size + n > MESSAGE_EMBEDS_TOTAL:
            groups.append([])
            size = 0
        groups[-1].append(embed)
        size += n
    return groups


def _slug(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_-]+", "-", name).strip("-").lower() or "answer"


def long_text_messages(
    text: str,
    make: Any,
    *,
    filename: str,
    tail: Sequence[discord.Embed] = (),
) -> list[Outgoing]:
    """Messages carrying ``text``: split over embeds, or previewed with the whole as a .md file.

    ``make(chunk, index, count, first, last)`` builds one embed. ``tail`` embeds (e.g. a
    timeline) follow the last text embed.
    """
    safe = neutralize_mentions(text)
    chunks = split_text(safe) or ["*(empty)*"]
    if len(chunks) > 1:
        # It has to be split anyway: smaller parts pair up, so half as many messages.
        chunks = split_text(safe, PACKED_LIMIT)
    attach = len(chunks) > ATTACH_AFTER_PARTS
    if attach:
        note = f"\n\n*…the full text ({len(text):,} characters) is attached as `{filename}`.*"
        chunks = [split_text(safe, DESCRIPTION_LIMIT - len(note))[0] + note]
    count = len(chunks)
    embeds = [make(c, i, count, i == 0, i == count - 1) for i, c in enumerate(chunks)]
    out = [Outgoing(embeds=group) for group in pack([*embeds, *tail])]
    if attach:
        # The file carries the model's own words, unmodified; Discord never pings from a file.
        out[-1].file = (filename, text.encode("utf-8"))
    return out


# --- the status board -------------------------------------------------------------------------

SeatState = Literal["waiting", "thinking", "writing", "done", "failed", "interrupted"]
Phase = Literal["queued", "retrieving", "running", "synthesizing", "done", "failed", "interrupted"]

_ICONS: dict[str, str] = {
    "waiting": "⏳",
    "thinking": "💭",
    "writing": "✍️",
    "done": "✅",
    "failed": "❌",
    "interrupted": "⏹️",
}

_ERROR_LABELS = {
    "timeout": "timeout",
    "connect": "unreachable",
    "deadline": "round deadline",
    "model_not_found": "model missing",
    "empty": "empty answer",
    "stream_error": "server error",
    "incomplete": "cut off",
    "malformed": "bad stream",
    "bad_stream": "bad stream",
    "internal": "bot error",
    "cancelled": "cancelled",
}


def error_label(kind: str) -> str:
    """A short word for a failure kind, e.g. ``timeout`` or ``HTTP 500``."""
    if kind.startswith("http_"):
        return f"HTTP {kind[5:]}"
    return _ERROR_LABELS.get(kind, kind or "failed")


def fmt_s(seconds: float) -> str:
    return f"{seconds:.1f} s"


@dataclass(slots=True)
class Seat:
    """One fighter's line on the board."""

    name: str
    emoji: str
    state: SeatState = "waiting"
    elapsed_s: float | None = None
    tokens: int = 0
    error_kind: str = ""

    def line(self) -> str:
        head = f"{_ICONS[self.state]} {self.emoji} **{self.name}**"
        match self.state:
            case "done":
                return f"{head} · {fmt_s(self.elapsed_s or 0.0)} · {self.tokens} tokens"
            case "failed":
                return f"{head} · {error_label(self.error_kind)}"
            case "writing":
                return f"{head} · writing…"
            case _:
                return f"{head} · {self.state}"


@dataclass(slots=True)
class Board:
    """Everything the status board shows. Mutated by the round, rendered by :func:`render_board`."""

    question: str
    round_no: int
    seats: list[Seat]
    synthesizer: str
    synthesizer_emoji: str
    phase: Phase = "queued"
    queue_position: int | None = None
    synthesis_state: SeatState = "waiting"
    synthesis_note: str = ""
    sources: tuple[Passage, ...] = ()
    kb_note: str = ""  # e.g. "knowledge base unavailable"
    summary: str = ""
    failure: str = ""

    def seat(self, name: str) -> Seat | None:
        for seat in self.seats:
            if seat.name == name:
                return seat
        return None

    @classmethod
    def for_round(cls, question: str, round_no: int, fighters: Iterable[Fighter], synthesizer: Synthesizer) -> Board:
        return cls(
            question=question,
            round_no=round_no,
            seats=[Seat(f.name, f.emoji) for f in fighters],
            synthesizer=synthesizer.name,
            synthesizer_emoji=synthesizer.emoji,
        )

    def interrupt(self, reason: str) -> None:
        """Everything still moving stops, visibly."""
        for seat in self.seats:
            if seat.state in ("waiting", "thinking", "writing"):
                seat.state = "interrupted"
        if self.synthesis_state in ("waiting", "thinking", "writing"):
            self.synthesis_state = "interrupted"
        self.phase = "interrupted"
        self.failure = reason

    def fail(self, reason: str) -> None:
        for seat in self.seats:
            if seat.state in ("waiting", "thinking", "writing"):
                seat.state, seat.error_kind = "failed", "internal"
        if self.synthesis_state in ("waiting", "thinking", "writing"):
            self.synthesis_state = "failed"
        self.phase = "failed"
        self.failure = reason


def board_status(board: Board) -> str:
    """The board's footer line: where the round is, or how it ended."""
    match board.phase:
        case "queued":
            if board.queue_position:
                return f"🕒 In the queue — position {board.queue_position}. The council starts when a seat frees up."
            return "🕒 Gathering the council…"
        case "retrieving":
            return "📚 Searching the knowledge base…"
        case "running":
            return "⚔️ The council is in session."
        case "synthesizing":
            return f"{board.synthesizer_emoji} {board.synthesizer} is weighing the answers."
        case "done":
            return f"✅ Done · {board.summary}" if board.summary else "✅ Done"
        case "failed":
            return f"❌ {board.failure or 'The council failed.'}"
        case "interrupted":
            return f"⏹️ Interrupted — {board.failure or 'SHENRON stopped.'}"
    return ""


_PHASE_COLOURS: dict[str, int] = {"done": COLOUR_DONE, "failed": COLOUR_FAILED, "interrupted": COLOUR_INTERRUPTED}


def board_colour(board: Board) -> int:
    return _PHASE_COLOURS.get(board.phase, COLOUR_BUSY)


def render_board(board: Board) -> discord.Embed:
    """The status board: the question, one line per fighter, SHENRON's line, and where things are."""
    embed = discord.Embed(
        title=BOARD_TITLE.format(n=board.round_no),
        description=clip(neutralize_mentions(board.question), QUESTION_LIMIT),
        colour=board_colour(board),
    )
    lines = [seat.line() for seat in board.seats]
    fighters = "\n".join(lines)
    if len(fighters) > FIELD_VALUE_LIMIT:
        # Enormous rosters: keep what fits and say how many are hidden.
        kept: list[str] = []
        for line in lines:
            if len("\n".join([*kept, line])) > FIELD_VALUE_LIMIT - 30:
                break
            kept.append(line)
        fighters = "\n".join([*kept, f"… and {len(lines) - len(kept)} more"])
    embed.add_field(name="Fighters", value=fighters or "—", inline=False)
    synth = f"{_ICONS[board.synthesis_state]} {board.synthesizer_emoji} **{board.synthesizer}**"
    synth += f" · {board.synthesis_note or board.synthesis_state}"
    embed.add_field(name="Synthesis", value=clip(synth, FIELD_VALUE_LIMIT), inline=False)
    if board.sources or board.kb_note:
        # A heading is the document's text, not ours: show it literally (no links, no formatting).
        value = "\n".join(f"• {escape_markdown(neutralize_mentions(p.label))}" for p in board.sources) or board.kb_note
        if board.sources and board.kb_note:
            value += f"\n{board.kb_note}"
        embed.add_field(name="📚 Sources", value=clip(value, FIELD_VALUE_LIMIT), inline=False)
    embed.set_footer(text=clip(board_status(board), FOOTER_LIMIT))
    return embed


# --- answers ----------------------------------------------------------------------------------


def _author(fighter: Fighter | None, name: str) -> str:
    if fighter is None:
        return name
    return clip(f"{fighter.emoji} {fighter.name} · {fighter.role}", AUTHOR_LIMIT)


def answer_footer(answer: FighterAnswer) -> str:
    """``model · 8.2 s · 312 tokens``"""
    return clip(f"{answer.model} · {fmt_s(answer.elapsed_s)} · {answer.tokens} tokens", FOOTER_LIMIT)


def render_answer(fighter: Fighter | None, answer: FighterAnswer) -> list[Outgoing]:
    """A fighter's answer as one or more messages, in the fighter's colour."""
    colour = fighter.colour if fighter is not None else COLOUR_BUSY
    author = _author(fighter, answer.fighter)

    def make(chunk: str, i: int, count: int, first: bool, last: bool) -> discord.Embed:
        embed = discord.Embed(description=chunk, colour=colour)
        embed.set_author(name=author if count == 1 else clip(f"{author} ({i + 1}/{count})", AUTHOR_LIMIT))
        if last:
            embed.set_footer(text=answer_footer(answer))
        return embed

    return long_text_messages(answer.text, make, filename=f"{_slug(answer.fighter)}.md")


def render_failure(fighter: Fighter | None, answer: FighterAnswer) -> discord.Embed:
    """A red embed that says, in words a user can act on, why this fighter has no answer."""
    embed = discord.Embed(
        description=clip(
            f"**{error_label(answer.error_kind)}** — {neutralize_mentions(answer.error)}", DESCRIPTION_LIMIT
        ),
        colour=COLOUR_FAILED,
    )
    embed.set_author(name=clip(f"❌ {_author(fighter, answer.fighter)}", AUTHOR_LIMIT))
    embed.set_footer(text=clip(f"{answer.model} · failed after {fmt_s(answer.elapsed_s)}", FOOTER_LIMIT))
    return embed


# --- the synthesis ----------------------------------------------------------------------------


def synthesis_title(synth: Synthesizer, i: int = 0, count: int = 1) -> str:
    title = f"{synth.emoji} {synth.name} {SYNTHESIS_TITLE_SUFFIX}"
    return title if count == 1 else f"{title} ({i + 1}/{count})"


def render_synthesis_live(
    synth: Synthesizer, text: str, *, model: str = "", fallback: bool = False, note: str = ""
) -> discord.Embed:
    """The synthesis while it streams: the newest text, and a footer that says it is still writing."""
    body = neutralize_mentions(text.strip())
    if len(body) > DESCRIPTION_LIMIT:
        # Show the end: that is where the text is growing. The final render splits it properly.
        body = "…" + body[-(DESCRIPTION_LIMIT - 1) :]
    embed = discord.Embed(
        title=f"{synth.emoji} {synth.name} is writing…",
        description=body or f"*{note or 'weighing the answers…'}*",
        colour=COLOUR_BUSY,
    )
    footer = "✍️ streaming"
    if model:
        footer += f" · {model}" + (" (fallback)" if fallback else "")
    if note and body:
        footer += f" · {note}"
    embed.set_footer(text=clip(footer, FOOTER_LIMIT))
    return embed


def synthesis_footer(result: CouncilResult) -> str:
    """The council's figures, then who answered the synthesis and who was missing."""
    lines = [summary_line(result)]
    s = result.synthesis
    if s.model:
        model = f"{s.model} (fallback)" if s.used_fallback else s.model
        lines.append(f"{model} · {s.tokens} tokens")
    if result.missing:
        lines.append("without " + ", ".join(result.missing))
    if (hint := serialised_hint(result)) is not None:
        lines.append(f"⚠️ {hint}")
    return clip("\n".join(lines), FOOTER_LIMIT)


def render_timeline(result: CouncilResult, width: int = 24) -> discord.Embed:
    """The round as text bars (· SHENRON's queue, ░ waiting for the first token, █ generating) on one axis."""
    rows = timeline_text(result, width=width)
    first = rows.splitlines()[0] if rows else ""
    offset = first.index("│") + 1 if "│" in first else 0  # the axis starts under the bars
    end = fmt_s(result.stats.wall_s)
    axis = " " * offset + "0 s".ljust(max(4, width - len(end))) + end
    body = f"```\n{rows}\n{axis}\n```"
    if len(body) > DESCRIPTION_LIMIT:
        body = f"```\n{clip(rows, DESCRIPTION_LIMIT - 20)}\n```"
    return discord.Embed(title="⏱️ Timeline", description=body, colour=COLOUR_BUSY)


def render_synthesis_final(synth: Synthesizer, result: CouncilResult) -> list[Outgoing]:
    """The finished synthesis: its text (split if long), the figures, and the timeline.

    The first message replaces the one that streamed; the rest are sent after it.
    """
    footer = synthesis_footer(result)
    colour = synth.colour

    def make(chunk: str, i: int, count: int, first: bool, last: bool) -> discord.Embed:
        embed = discord.Embed(title=synthesis_title(synth, i, count), description=chunk, colour=colour)
        if last:
            embed.set_footer(text=footer)
        return embed

    return long_text_messages(result.synthesis.text, make, filename="synthesis.md", tail=[render_timeline(result)])


def render_synthesis_failed(synth: Synthesizer, result: CouncilResult | None, error: str) -> list[Outgoing]:
    """No synthesis: say why, keep the figures and the timeline when there are any."""
    embed = discord.Embed(
        title=clip(f"{synth.emoji} {synth.name} — no synthesis", TITLE_LIMIT),
        description=clip(neutralize_mentions(error or "the synthesis failed"), DESCRIPTION_LIMIT),
        colour=COLOUR_FAILED,
    )
    embeds = [embed]
    if result is not None:
        embed.set_footer(text=synthesis_footer(result))
        if result.answers:
            embeds.append(render_timeline(result))
    return [Outgoing(embeds=group) for group in pack(embeds)]


def render_synthesis_interrupted(synth: Synthesizer, partial: str, reason: str) -> discord.Embed:
    """What was streamed before the interruption, marked as such so it never looks alive."""
    body = neutralize_mentions(partial.strip())
    if len(body) > DESCRIPTION_LIMIT - 200:
        body = clip(body, DESCRIPTION_LIMIT - 200)
    note = f"*⏹️ Interrupted — {reason}*"
    embed = discord.Embed(
        title=clip(f"{synth.emoji} {synth.name} — interrupted", TITLE_LIMIT),
        description=f"{body}\n\n{note}" if body else note,
        colour=COLOUR_INTERRUPTED,
    )
    embed.set_footer(text="This round did not finish. Ask again to convene a new one.")
    return embed


def render_notice(text: str, *, colour: int = COLOUR_BUSY) -> discord.Embed:
    return discord.Embed(description=clip(neutralize_mentions(text), DESCRIPTION_LIMIT), colour=colour)


def render_question_header(
    question: str, asked_by: str, fighters: Sequence[Fighter], use_context: bool
) -> discord.Embed:
    """The reply to /shenron: the question, who asked it, and who sits on the council."""
    embed = discord.Embed(
        title="🐉 SHENRON convenes the council",
        description=clip(neutralize_mentions(question), DESCRIPTION_LIMIT),
        colour=COLOUR_BUSY,
    )
    roster = " ".join(f"{f.emoji} {f.name}" for f in fighters)
    kb = "" if use_context else " · knowledge base off"
    embed.set_footer(
        text=clip(
            neutralize_mentions(f"asked by {asked_by} · {roster}{kb} · answers in the thread below"), FOOTER_LIMIT
        )
    )
    return embed


# --- reading a thread back --------------------------------------------------------------------


def rebuild_history(messages: Iterable[discord.Message], bot_id: int, limit: int = 8) -> list[Turn]:
    """Earlier rounds of a thread, oldest first, from SHENRON's own messages.

    Each round's board holds its question; the synthesis embeds hold the answer. Rounds that
    ended without a synthesis (failed, interrupted) are left out: there is nothing to continue.
    Works from Discord alone, so a restarted bot picks up where it was.
    """
    turns: list[Turn] = []
    question: str | None = None
    answer: list[str] = []

    def close() -> None:
        if question is not None and answer:
            turns.append(Turn(question=question, answer="\n\n".join(answer)))

    for message in messages:
        if message.author.id != bot_id:
            continue
        for embed in message.embeds:
            title = embed.title or ""
            if BOARD_TITLE_RE.match(title):
                close()
                question, answer = restore_mentions(embed.description or ""), []
            elif SYNTHESIS_TITLE_RE.search(title) and question is not None:
                text = restore_mentions(embed.description or "")
                # A synthesis too long for embeds ends with a pointer to its attachment: drop it.
                text = re.sub(r"\n\n\*…the full text .*\*$", "", text)
                answer.append(text)
    close()
    return turns[-limit:]


# --- /health ----------------------------------------------------------------------------------


def _kb_line(kb_stats: Any) -> str:
    """Render whatever ``kb.stats()`` returned: an object with attributes, a mapping, or text."""
    if kb_stats is None:
        return "not configured"
    if isinstance(kb_stats, BaseException):
        return f"❌ {kb_stats}"
    if isinstance(kb_stats, str):
        return kb_stats

    def get(key: str) -> Any:
        if isinstance(kb_stats, dict):
            return kb_stats.get(key)
        return getattr(kb_stats, key, None)

    parts = []
    for key, label in (
        ("collection", "collection"),
        ("chunks", "chunks"),
        ("documents", "documents"),
        ("embedder", "embedder"),
        ("mode", "mode"),
        ("location", "at"),
    ):
        value = get(key)
        if value not in (None, ""):
            parts.append(f"{label} **{value}**")
    return " · ".join(parts) or clip(str(kb_stats), 200)


def render_health(
    backends: Sequence[Any],
    *,
    kb_stats: Any,
    gateway_latency_s: float | None,
    uptime_s: float,
    served: int,
    failed: int,
    interrupted: int,
    p50_s: float | None,
    p95_s: float | None,
    in_flight: int = 0,
    queued: int = 0,
) -> discord.Embed:
    """The /health report. ``backends`` are :class:`bot.health.BackendHealth` (read by attribute)."""
    all_ok = all(getattr(b, "reachable", False) and not getattr(b, "missing", ()) for b in backends)
    embed = discord.Embed(title="🩺 SHENRON health", colour=COLOUR_DONE if all_ok else COLOUR_FAILED)
    latency = "unknown" if gateway_latency_s is None else f"{gateway_latency_s * 1000:.0f} ms"
    hours, rem = divmod(int(uptime_s), 3600)
    minutes, seconds = divmod(rem, 60)
    pct = "no councils yet" if p50_s is None else f"p50 {fmt_s(p50_s)} · p95 {fmt_s(p95_s or p50_s)}"
    tail = [
        ("Knowledge base", clip(neutralize_mentions(_kb_line(kb_stats)), FIELD_VALUE_LIMIT)),
        ("Discord", f"gateway {latency} · up {hours}h {minutes:02d}m {seconds:02d}s"),
        (
            "Councils",
            f"served {served} · failed {failed} · interrupted {interrupted} · "
            f"running {in_flight} · queued {queued}\nwall time {pct}",
        ),
    ]
    shown = list(backends[:MAX_HEALTH_BACKENDS])
    # Share what the 6000-character cap leaves among the backends, so many of them still fit.
    room = MESSAGE_EMBEDS_TOTAL - len(embed.title or "") - sum(len(n) + len(v) for n, v in tail) - 100
    share = min(FIELD_VALUE_LIMIT, max(80, room // max(1, len(shown)) - 30))
    for b in shown:
        if b.reachable:
            lines = [f"✅ reachable · {b.latency_s * 1000:.0f} ms · `{b.base_url}`"]
            models = ", ".join(b.models[:12]) + (f" (+{len(b.models) - 12})" if len(b.models) > 12 else "")
            lines.append(f"models: {models or 'none listed'}")
            if b.missing:
                lines.append(f"⚠️ missing for: {', '.join(b.missing)}")
            lines.extend(str(n) for n in getattr(b, "notes", ()))
        else:
            lines = [f"❌ unreachable · `{b.base_url}`", str(b.error)]
        embed.add_field(
            name=clip(f"Backend {b.name}", 30), value=clip(neutralize_mentions("\n".join(lines)), share), inline=False
        )
    if len(backends) > len(shown):
        embed.add_field(name="…", value=f"{len(backends) - len(shown)} more backends not shown", inline=False)
    for name, value in tail:
        embed.add_field(name=name, value=value, inline=False)
    return embed
