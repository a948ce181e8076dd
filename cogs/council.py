"""``/shenron`` and thread follow-ups: convene the council and show it working, in a thread.

The command body only checks, acknowledges and opens the thread; :class:`CouncilRound` consumes
the engine's events and turns them into messages (via ``cogs.render``). Everything after the
deferred reply is posted with the bot's own channel messages, not the interaction webhook, so a
council that outlives the 15-minute interaction token still finishes.
"""

from __future__ import annotations

import asyncio
import logging
import re
import time
from collections.abc import Sequence
from contextlib import aclosing
from dataclasses import dataclass, field

import discord
from discord import app_commands
from discord.ext import commands

from bot.config import Fighter
from bot.discord_bot import LiveMessage, ShenronBot, retry_discord
from bot.events import (
    CouncilFinished,
    CouncilResult,
    Event,
    FighterFailed,
    FighterFinished,
    FighterSent,
    FighterToken,
    Passage,
    SynthesisFailed,
    SynthesisFinished,
    SynthesisStarted,
    SynthesisToken,
    Turn,
)
from bot.timeline import summary_line
from cogs import render
from cogs.render import Board, Outgoing

log = logging.getLogger(__name__)

QUESTION_MAX = 2000
FOLLOW_UP_MAX = 4000  # Nitro users can send longer messages than the slash option allows
HISTORY_MESSAGES = 200  # how far back a thread is read to rebuild its history
THREAD_ARCHIVE_MIN = 1440  # a day of quiet before the thread archives itself
BUSY_THREAD = "A round is still running in this thread — wait for SHENRON's answer, then ask again."
EMPTY_QUESTION = "Your question is empty (or only invisible characters): write it after `question:`."


# --- who may ask --------------------------------------------------------------------------


def access_refusal(bot: ShenronBot, guild_id: int | None, channel: object, role_ids: Sequence[int]) -> str | None:
    """Why this user may not convene a council here, or None. Empty allow-lists allow everyone."""
    s = bot.settings
    if s.allowed_guild_ids and guild_id not in s.allowed_guild_ids:
        return "SHENRON is not enabled in this server."
    if s.allowed_channel_ids:
        ids = {getattr(channel, "id", None), getattr(channel, "parent_id", None)}
        if not ids & s.allowed_channel_ids:
            return "SHENRON does not answer in this channel. Ask in one of the channels it serves."
    if s.allowed_role_ids and not set(role_ids) & s.allowed_role_ids:
        return "You need one of the roles allowed to ask SHENRON."
    return None


@dataclass
class Gate:
    """One council per user at a time, a per-user cooldown, and no new councils while closing."""

    cooldown_s: float
    busy: set[int] = field(default_factory=set)
    last_start: dict[int, float] = field(default_factory=dict)

    def refusal(self, bot: ShenronBot, user_id: int) -> str | None:
        if bot.closing:
            return "SHENRON is shutting down; ask again in a minute."
        if user_id in self.busy:
            return "Your council is still in session — wait for SHENRON's answer before asking again."
        if self.cooldown_s:
            # time.monotonic: simcord's virtual clock in tests, so cooldowns can be advanced past.
            wait = self.last_start.get(user_id, -1e18) + self.cooldown_s - time.monotonic()
            if wait > 0:
                return f"Easy — you can ask again in {wait:.0f} s."
        return None

    def take(self, user_id: int) -> None:
        self.busy.add(user_id)
        self.last_start[user_id] = time.monotonic()

    def release(self, user_id: int) -> None:
        self.busy.discard(user_id)


def parse_fighters(text: str | None, roster: Sequence[Fighter]) -> tuple[str, ...] | None:
    """``"goku, vegeta"`` → ``("GOKU", "VEGETA")`` in roster spelling; None for the whole council."""
    if not text or not text.strip():
        return None
    by_name = {f.name.upper(): f.name for f in roster}
    wanted = [w.strip() for w in re.split(r"[,\s]+", text) if w.strip()]
    unknown = [w for w in wanted if w.upper() not in by_name]
    if unknown:
        raise ValueError(f"No fighter named {', '.join(unknown)}. Choose from: {', '.join(f.name for f in roster)}.")
    return tuple(dict.fromkeys(by_name[w.upper()] for w in wanted))


def strip_bot_mention(content: str, bot_id: int) -> str:
    return re.sub(rf"<@!?{bot_id}>", "", content).strip()


def is_council_thread(channel: object, bot_id: int) -> bool:
    return isinstance(channel, discord.Thread) and channel.owner_id == bot_id


# --- one round ------------------------------------------------------------------------------


@dataclass
class RoundRequest:
    question: str
    user_id: int
    thread: discord.Thread
    round_no: int = 1
    history: Sequence[Turn] = ()
    fighters: tuple[str, ...] | None = None
    use_context: bool = True


class CouncilRound:
    """Consumes one round's events and keeps the thread showing them.

    Whatever happens — success, failure, a crash, a shutdown — the board and the synthesis end in
    a final state, so no message is left looking alive.
    """

    def __init__(self, bot: ShenronBot, request: RoundRequest) -> None:
        self.bot = bot
        self.request = request
        self.thread = request.thread
        council = bot.council
        self.synth = council.synthesizer
        names = request.fighters
        self.fighters = {f.name: f for f in council.fighters if names is None or f.name in names}
        self.board = Board.for_round(request.question, request.round_no, self.fighters.values(), self.synth)
        self.board_live: LiveMessage | None = None
        self.synth_live: LiveMessage | None = None
        self.synth_text = ""
        self.synth_model = ""
        self.synth_fallback = False
        self.synth_note = ""
        self.result: CouncilResult | None = None

    # -- lifecycle ---------------------------------------------------------------------------

    async def run(self) -> None:
        wall: float | None = None
        try:
            board_message = await self._send(Outgoing(embeds=[render.render_board(self.board)]))
            self.board_live = LiveMessage(
                board_message, self.bot.throttle(self.thread.id), lambda: {"embed": render.render_board(self.board)}
            )
            async with self.bot.queue.seat(self._queued):
                passages = await self._retrieve()
                self.board.phase = "running"
                self.board.queue_position = None
                self.board_live.touch()
                events = self.bot.engine.run(
                    self.request.question, self.request.history, passages, fighters=self.request.fighters
                )
                with self.bot.metrics.council() as tracked:
                    async with aclosing(events):
                        async for event in events:
                            tracked.observe(event)
                            await self._on_event(event)
            if self.result is None:
                raise RuntimeError("the council ended without its final event")
            wall = self.result.stats.wall_s
            self.bot.stats.record(ok=self.result.ok, wall_s=wall)
        except asyncio.CancelledError:
            self.bot.stats.record_interrupted()
            await self._end_interrupted(self.bot.shutdown_reason or "the round was cancelled")
            raise
        except Exception as exc:
            log.exception("council round in thread %s failed", self.thread.id)
            self.bot.stats.record(ok=False, wall_s=wall)
            await self._end_failed(
                f"SHENRON hit an error ({exc.__class__.__name__}); the details are in "
                "the bot's log. Ask again to retry."
            )

    def _queued(self, position: int) -> None:
        self.board.phase = "queued"
        self.board.queue_position = position
        if self.board_live is not None:
            self.board_live.touch()

    async def _retrieve(self) -> tuple[Passage, ...]:
        kb = self.bot.kb
        if kb is None or not self.request.use_context or not self.bot.settings.kb_enabled:
            return ()
        self.board.phase = "retrieving"
        assert self.board_live is not None
        self.board_live.touch()
        try:
            passages = tuple(await kb.search(self.request.question))
        except Exception as exc:
            # The council is still worth having without the documents: say so and carry on.
            log.warning("knowledge base search failed: %s", exc, exc_info=True)
            self.bot.metrics.kb_query(ok=False)
            self.board.kb_note = "knowledge base unavailable for this round"
            return ()
        self.bot.metrics.kb_query(passages=len(passages))
        self.board.sources = passages
        return passages

    async def _send(self, out: Outgoing) -> discord.Message:
        """Post in the thread; a 429/5xx is tried again (a fresh file each time), others raise."""
        return await retry_discord(
            lambda: self.thread.send(**out.to_kwargs()),
            base_s=self.bot.settings.edit_interval_s,
            what=f"posting in thread {self.thread.id}",
        )

    async def _repost(self, live: LiveMessage, embeds: list[discord.Embed]) -> None:
        """Discord would not edit ``live`` into its final state: post that state anew, drop the old one."""
        await self._send(Outgoing(embeds=embeds))
        try:
            await live.message.delete()
        except discord.HTTPException as exc:
            log.warning("could not remove the stale message %s: %s", live.message.id, exc)

    async def _finish_board(self) -> None:
        """The board's final state; if Discord refuses the edit, a message below says how it ended."""
        assert self.board_live is not None
        if await self.board_live.finish():
            return
        text = f"⚠️ Discord would not update the status board above. This round ended: {render.board_status(self.board)}"
        notice = render.render_notice(text, colour=render.board_colour(self.board))
        await self._send(Outgoing(embeds=[notice]))

    # -- events ------------------------------------------------------------------------------

    async def _on_event(self, event: Event) -> None:
        board = self.board
        assert self.board_live is not None
        match event:
            case FighterSent(fighter=name):
                # Past SHENRON's own queue (max_concurrency): the server has the request now.
                if (seat := board.seat(name)) is not None:
                    seat.state = "thinking"
                    self.board_live.touch()
            case FighterToken(fighter=name):
                seat = board.seat(name)
                if seat is not None and seat.state != "writing":
                    seat.state = "writing"
                    self.board_live.touch()
            case FighterFinished(answer=answer):
                if (seat := board.seat(answer.fighter)) is not None:
                    seat.state, seat.elapsed_s, seat.tokens = "done", answer.elapsed_s, answer.tokens
                    self.board_live.touch()
                for out in render.render_answer(self.fighters.get(answer.fighter), answer):
                    await self._send(out)
            case FighterFailed(answer=answer):
                if (seat := board.seat(answer.fighter)) is not None:
                    seat.state, seat.error_kind = "failed", answer.error_kind
                    self.board_live.touch()
                await self._send(Outgoing(embeds=[render.render_failure(self.fighters.get(answer.fighter), answer)]))
            case SynthesisStarted(model=model, fallback=fallback):
                board.phase = "synthesizing"
                board.synthesis_state = "thinking"
                board.synthesis_note = f"{model} (fallback)" if fallback else f"weighing {self._answered()} answers"
                self.board_live.touch()
                self.synth_text, self.synth_model, self.synth_fallback = "", model, fallback
                self.synth_note = "" if not fallback else "the first model failed; trying the fallback"
                if self.synth_live is None:
                    message = await self._send(Outgoing(embeds=[self._render_synth_live()]))
                    self.synth_live = LiveMessage(
                        message, self.bot.throttle(self.thread.id), lambda: {"embed": self._render_synth_live()}
                    )
                else:
                    self.synth_live.touch()
            case SynthesisToken(text=text, reset=reset):
                self.synth_text = ("" if reset else self.synth_text) + text
                if board.synthesis_state != "writing":
                    board.synthesis_state, board.synthesis_note = "writing", "writing…"
                    self.board_live.touch()
                if self.synth_live is not None:
                    self.synth_live.touch()
            case SynthesisFailed(result=result, will_retry=True):
                self.synth_note = f"{result.model} failed ({render.clip(result.error, 200)}); trying the fallback"
                if self.synth_live is not None:
                    self.synth_live.touch()
            case SynthesisFailed(result=result):
                board.synthesis_state, board.synthesis_note = "failed", "no synthesis"
                self.board_live.touch()
            case SynthesisFinished(result=result):
                board.synthesis_state = "done"
                board.synthesis_note = f"{render.fmt_s(result.elapsed_s)} · {result.tokens} tokens"
                self.board_live.touch()
            case CouncilFinished(result=result):
                self.result = result
                await self._end(result)

    def _answered(self) -> int:
        return sum(1 for s in self.board.seats if s.state == "done")

    def _render_synth_live(self) -> discord.Embed:
        return render.render_synthesis_live(
            self.synth, self.synth_text, model=self.synth_model, fallback=self.synth_fallback, note=self.synth_note
        )

    # -- endings -----------------------------------------------------------------------------

    async def _place_synthesis(self, parts: list[Outgoing]) -> None:
        """The first message replaces the streaming one (or is sent); the rest follow it."""
        first, rest = parts[0], parts[1:]
        file = first.file
        if self.synth_live is not None:
            if not await self.synth_live.finish(embeds=first.embeds):
                await self._repost(self.synth_live, first.embeds)
        else:
            first = Outgoing(embeds=first.embeds)
            await self._send(first)
        if file is not None:
            # Edits cannot add files here; the attachment follows as its own message.
            await self._send(Outgoing(file=file))
        for out in rest:
            await self._send(out)

    async def _end(self, result: CouncilResult) -> None:
        if result.synthesis.ok:
            await self._place_synthesis(render.render_synthesis_final(self.synth, result))
        else:
            await self._place_synthesis(render.render_synthesis_failed(self.synth, result, result.synthesis.error))
        board = self.board
        board.summary = summary_line(result)
        if result.ok:
            board.phase = "done"
        else:
            board.fail(f"no synthesis — {render.clip(result.synthesis.error, 300)}")
        await self._finish_board()

    async def _end_interrupted(self, reason: str) -> None:
        self.board.interrupt(reason)
        await self._final_state(render.render_synthesis_interrupted(self.synth, self.synth_text, reason))

    async def _end_failed(self, reason: str) -> None:
        self.board.fail(reason)
        await self._final_state(render.render_synthesis_failed(self.synth, None, reason)[0].embeds[0])

    async def _final_state(self, synth_embed: discord.Embed) -> None:
        """Best effort, each message on its own: the thread may be gone, or Discord may refuse."""
        try:
            if self.synth_live is not None and not self.synth_live.final:
                if not await self.synth_live.finish(embed=synth_embed):
                    await self._repost(self.synth_live, [synth_embed])
            elif self.synth_live is None:
                await self._send(Outgoing(embeds=[synth_embed]))
        except discord.HTTPException as exc:
            log.warning("could not post the final synthesis state in thread %s: %s", self.thread.id, exc)
        if self.board_live is not None:
            try:
                await self._finish_board()
            except discord.HTTPException as exc:
                log.warning("could not say how the round in thread %s ended: %s", self.thread.id, exc)


# --- the cog ------------------------------------------------------------------------------


async def read_thread(thread: discord.Thread, bot_id: int) -> tuple[list[Turn], int]:
    """(history, rounds so far) from the thread itself, so it survives restarts."""
    messages = [m async for m in thread.history(limit=HISTORY_MESSAGES)]
    messages.reverse()
    rounds = sum(
        1 for m in messages if m.author.id == bot_id for e in m.embeds if render.BOARD_TITLE_RE.match(e.title or "")
    )
    return render.rebuild_history(messages, bot_id), rounds


class CouncilCog(commands.Cog):
    def __init__(self, bot: ShenronBot) -> None:
        self.bot = bot
        self.gate = Gate(cooldown_s=bot.settings.user_cooldown_s)
        self.busy_threads: set[int] = set()  # one round at a time per thread keeps the story in order

    def _start(self, request: RoundRequest) -> None:
        self.busy_threads.add(request.thread.id)

        async def run() -> None:
            try:
                await CouncilRound(self.bot, request).run()
            finally:
                self.gate.release(request.user_id)
                self.busy_threads.discard(request.thread.id)

        self.bot.start_round(run(), name=f"council-{request.thread.id}-{request.round_no}")

    @app_commands.command(name="shenron")
    @app_commands.guild_only()
    @app_commands.describe(
        question="What should the council answer?",
        fighters="Only these fighters, comma-separated (default: the whole council)",
        context="Search the knowledge base for context (default: yes)",
    )
    async def shenron(
        self,
        interaction: discord.Interaction,
        question: app_commands.Range[str, 1, QUESTION_MAX],
        fighters: str | None = None,
        context: bool = True,
    ) -> None:
        """Ask SHENRON's council of models a question; the answers arrive in a thread."""
        user = interaction.user
        roles = [r.id for r in getattr(user, "roles", ())]
        channel = interaction.channel
        refusal = access_refusal(self.bot, interaction.guild_id, channel, roles) or self.gate.refusal(self.bot, user.id)
        question = render.clean_question(question)
        if refusal is None and not question:
            refusal = EMPTY_QUESTION
        picked: tuple[str, ...] | None = None
        if refusal is None:
            try:
                picked = parse_fighters(fighters, self.bot.council.fighters)
            except ValueError as exc:
                refusal = str(exc)
        in_council_thread = is_council_thread(channel, self.bot.user.id if self.bot.user else 0)
        if refusal is None and isinstance(channel, discord.Thread) and not in_council_thread:
            refusal = "Ask /shenron in a text channel: SHENRON opens a thread of its own for the answers."
        if refusal is None and in_council_thread and channel.id in self.busy_threads:
            refusal = BUSY_THREAD
        if refusal is None and not isinstance(channel, discord.TextChannel | discord.Thread):
            refusal = "Ask /shenron in a text channel: SHENRON answers in a thread."
        if refusal is not None:
            await interaction.response.send_message(refusal, ephemeral=True)
            return

        self.gate.take(user.id)
        started = False
        try:
            await interaction.response.defer(thinking=True)
            council = [f for f in self.bot.council.fighters if picked is None or f.name in picked]
            header = await interaction.edit_original_response(
                embed=render.render_question_header(question, user.display_name, council, context)
            )
            history: Sequence[Turn] = ()
            round_no = 1
            if isinstance(channel, discord.Thread):
                # /shenron inside a council thread: a new round of that conversation.
                thread = channel
                history, rounds = await read_thread(thread, self.bot.user.id if self.bot.user else 0)
                round_no = rounds + 1
            else:
                thread = await retry_discord(
                    lambda: header.create_thread(
                        name=render.thread_name(question), auto_archive_duration=THREAD_ARCHIVE_MIN
                    ),
                    base_s=self.bot.settings.edit_interval_s,
                    what=f"opening a thread in channel {interaction.channel_id}",
                )
            self._start(
                RoundRequest(
                    question=question,
                    user_id=user.id,
                    thread=thread,
                    round_no=round_no,
                    history=history,
                    fighters=picked,
                    use_context=context,
                )
            )
            started = True
        except discord.Forbidden:
            log.warning("missing permissions to open a council thread in channel %s", interaction.channel_id)
            await interaction.edit_original_response(
                content="I could not open a thread here: I need **Create Public Threads** and **Send "
                "Messages in Threads** in this channel.",
                embed=None,
            )
        finally:
            if not started:
                self.gate.release(user.id)

    @shenron.autocomplete("fighters")
    async def _fighters_autocomplete(
        self, interaction: discord.Interaction, current: str
    ) -> list[app_commands.Choice[str]]:
        # Complete the last name of a comma-separated list, keeping the ones already typed.
        done, _, last = current.rpartition(",")
        chosen = {w.strip().upper() for w in done.split(",") if w.strip()}
        prefix = f"{done}, " if done.strip() else ""
        names = [
            f.name
            for f in self.bot.council.fighters
            if f.name.upper() not in chosen and f.name.upper().startswith(last.strip().upper())
        ]
        return [
            app_commands.Choice(name=render.clip(prefix + n, 100), value=render.clip(prefix + n, 100))
            for n in names[:25]
        ]

    @commands.Cog.listener()
    async def on_message(self, message: discord.Message) -> None:
        """A message in a council thread starts the next round of that conversation."""
        me = self.bot.user
        if me is None or message.author.bot or message.webhook_id is not None:
            return
        thread = message.channel
        if not is_council_thread(thread, me.id):
            return
        assert isinstance(thread, discord.Thread)
        mentioned = any(u.id == me.id for u in message.mentions)
        if not (self.bot.intents.message_content or mentioned):
            return  # without the intent the text is empty unless the bot is mentioned
        question = render.clean_question(strip_bot_mention(message.content, me.id))
        if not question:
            if mentioned:
                await message.reply("Ask your follow-up after the mention, e.g. `@SHENRON and on SSDs?`")
            return
        roles = [r.id for r in getattr(message.author, "roles", ())]
        refusal = access_refusal(self.bot, message.guild.id if message.guild else None, thread, roles)
        refusal = refusal or self.gate.refusal(self.bot, message.author.id)
        if refusal is None and thread.id in self.busy_threads:
            refusal = BUSY_THREAD
        if refusal is not None:
            await message.reply(refusal)
            return
        self.gate.take(message.author.id)
        try:
            history, rounds = await read_thread(thread, me.id)
        except BaseException:
            self.gate.release(message.author.id)
            raise
        self._start(
            RoundRequest(
                question=render.clip(question, FOLLOW_UP_MAX),
                user_id=message.author.id,
                thread=thread,
                round_no=rounds + 1,
                history=history,
            )
        )


async def setup(bot: commands.Bot) -> None:
    assert isinstance(bot, ShenronBot)
    await bot.add_cog(CouncilCog(bot))
