"""The Discord side of SHENRON: the Bot subclass, its start-up and its orderly shutdown.

``ShenronBot`` takes every dependency as a keyword argument (settings, council engine, HTTP
session, knowledge base, counters), so tests build one against a fake LLM server and simcord.
It owns what is shared between rounds: the queue of councils, one edit throttle per channel, and
the set of rounds in flight, which :meth:`ShenronBot.close` ends visibly ("interrupted").

``run_bot`` is what ``shenron run`` calls: it checks the token, wires the process together, and
turns SIGINT/SIGTERM into that orderly close.
"""

from __future__ import annotations

import asyncio
import logging
import signal
import time
from collections import OrderedDict
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import Any, Protocol, TypeVar

import aiohttp
import discord
from discord import app_commands
from discord.ext import commands

from bot.config import DISCORD_TOKEN_RE, ConfigError, CouncilConfig, Settings
from bot.council import CouncilEngine
from bot.events import Passage
from bot.health import probe_backends
from bot.llm import LLMClient, make_session
from bot.monitoring import Metrics, start_monitoring, stop_monitoring, summarise_health
from bot.parallelism import ParallelismReport, probe_council
from bot.stats import CouncilCounters

log = logging.getLogger(__name__)

EXTENSIONS = ("cogs.council", "cogs.health", "cogs.knowledge")  # each loads on its own; one failing is logged
SHUTDOWN_GRACE_S = 15.0  # how long close() lets rounds write their "interrupted" state
THROTTLE_IDLE_S = 300.0  # a channel's throttle is forgotten after this long without edits
# A 429 or 5xx that reaches the bot has outlasted discord.py's own retries (or, for 503, had none):
# a message that matters (a post, a final state) gets this many tries in all, backing off in between.
DISCORD_TRIES = 3
T = TypeVar("T")

_PORTAL = "Discord Developer Portal → your application → Bot → Reset Token"


class KnowledgeBase(Protocol):
    """What the bot needs from the knowledge base (built elsewhere; optional)."""

    async def search(self, query: str) -> list[Passage]: ...

    async def stats(self) -> Any: ...


def check_token(token: str | None) -> str:
    """The token, or a ConfigError saying what is wrong with it. Never echoes the token."""
    if not token:
        raise ConfigError(
            ".env",
            "DISCORD_TOKEN",
            "is not set",
            f"copy the bot token from the {_PORTAL} and put DISCORD_TOKEN=<token> in .env",
        )
    if token.lower().startswith("bot "):
        raise ConfigError(
            ".env",
            "DISCORD_TOKEN",
            "starts with 'Bot '",
            "put only the token itself in .env, without the 'Bot ' prefix",
        )
    if any(c in token for c in "\"' \t"):
        raise ConfigError(
            ".env",
            "DISCORD_TOKEN",
            "contains quotes or spaces",
            "write it as DISCORD_TOKEN=<token> with nothing around the token",
        )
    if not DISCORD_TOKEN_RE.match(token):
        raise ConfigError(
            ".env",
            "DISCORD_TOKEN",
            "does not look like a bot token (three parts separated by dots)",
            f"copy it again from the {_PORTAL}; the application ID and client secret are not the token",
        )
    return token


# --- Discord failures that may pass -----------------------------------------------------------


def is_transient(error: BaseException | None) -> bool:
    """Rate limited (429) or a Discord server error (5xx): worth trying again in a moment."""
    return isinstance(error, discord.HTTPException) and (error.status == 429 or error.status >= 500)


async def retry_discord(call: Callable[[], Awaitable[T]], *, base_s: float, what: str) -> T:
    """``call()``, tried again after ``base_s``, ``2*base_s``… while Discord answers 429/5xx."""
    for attempt in range(1, DISCORD_TRIES + 1):
        try:
            return await call()
        except discord.HTTPException as exc:
            if attempt == DISCORD_TRIES or not is_transient(exc):
                raise
            delay = base_s * 2 ** (attempt - 1)
            log.warning("%s failed (%s); trying again in %.2f s", what, exc, delay)
            await asyncio.sleep(delay)
    raise AssertionError("unreachable")


# --- edit budget -------------------------------------------------------------------------------


class LiveMessage:
    """A message that shows changing state: edits coalesce, and only the latest state is written.

    ``render()`` is called when the edit actually happens, so ten state changes between two
    edits cost one edit. ``finish()`` writes the final state and stops further updates.
    """

    def __init__(self, message: discord.Message, throttle: EditThrottle, render: Callable[[], dict[str, Any]]) -> None:
        self.message = message
        self.throttle = throttle
        self.render = render
        self.final = False

    def touch(self) -> None:
        """The state changed: write it at the channel's next free edit slot."""
        if not self.final:
            self.throttle.request(self)

    async def finish(self, **payload: Any) -> bool:
        """Write ``payload`` (or the current render) as the final state, waiting for a slot.

        Returns whether Discord took it; the caller says so some other way when it did not.
        """
        self.final = True
        return await self.throttle.write_final(self, payload or self.render())


class EditThrottle:
    """At most one edit per ``interval_s`` in one channel, shared by every live message there.

    Discord's edit limits are per channel, and discord.py turns a 429 into waiting, so
    over-editing shows up as lag. A state change edits at once when the channel's slot is free;
    otherwise it waits (coalesced) for the slot, served round-robin. Final writes take priority,
    and one that Discord refuses with a 429/5xx is tried again. No task waits around while nothing
    is pending.
    """

    def __init__(self, interval_s: float, *, clock: Callable[[], float] = time.perf_counter) -> None:
        self.interval_s = interval_s
        self._clock = clock
        self._pending: OrderedDict[int, LiveMessage] = OrderedDict()
        self._next_at = 0.0
        self._inflight: asyncio.Task[BaseException | None] | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._finals_waiting = 0
        self.edits = 0
        self.last_used = clock()

    def request(self, live: LiveMessage) -> None:
        self._pending.setdefault(id(live), live)
        self._pump()

    async def write_final(self, live: LiveMessage, payload: dict[str, Any]) -> bool:
        """Write the final state; True once Discord took it, False when it kept refusing."""
        self._pending.pop(id(live), None)
        for attempt in range(1, DISCORD_TRIES + 1):
            await self._wait_for_slot()
            error = await self._start_edit(live.message, payload)
            if error is None:
                return True
            if attempt == DISCORD_TRIES or not is_transient(error):
                return False
            await asyncio.sleep(self.interval_s * 2 ** (attempt - 1))
        return False

    async def _wait_for_slot(self) -> None:
        self._finals_waiting += 1
        try:
            while True:
                if self._busy():
                    assert self._inflight is not None
                    await asyncio.wait([self._inflight])
                    continue
                wait = self._next_at - self._clock()
                if wait <= 0:
                    break
                # Sleep rather than wait on another task: the sleeper owns its own wake-up.
                await asyncio.sleep(wait)
        finally:
            self._finals_waiting -= 1

    def close(self) -> None:
        """Drop pending (non-final) updates; used at shutdown after the final states are written."""
        self._pending.clear()
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    @property
    def idle(self) -> bool:
        return not self._pending and not self._busy() and not self._finals_waiting

    def _busy(self) -> bool:
        return self._inflight is not None and not self._inflight.done()

    def _pump(self) -> None:
        if not self._pending or self._busy() or self._finals_waiting:
            return
        wait = self._next_at - self._clock()
        if wait > 0:
            if self._timer is None:
                self._timer = asyncio.get_running_loop().call_later(wait, self._on_timer)
            return
        _, live = self._pending.popitem(last=False)
        if not live.final:
            self._start_edit(live.message, live.render())
        else:
            self._pump()

    def _on_timer(self) -> None:
        self._timer = None
        self._pump()

    def _start_edit(self, message: discord.Message, payload: dict[str, Any]) -> asyncio.Task[BaseException | None]:
        self._next_at = self._clock() + self.interval_s
        task = asyncio.create_task(self._edit(message, payload), name="shenron-edit")
        self._inflight = task
        task.add_done_callback(lambda _: self._pump())
        return task

    async def _edit(self, message: discord.Message, payload: dict[str, Any]) -> BaseException | None:
        """The edit; returns why it failed (None when it worked) instead of raising."""
        try:
            await message.edit(**payload)
            self.edits += 1
            return None
        except discord.HTTPException as exc:
            # A vanished thread or a rejected edit must not stop the round; the next state retries.
            log.warning("could not edit message %s in channel %s: %s", message.id, message.channel.id, exc)
            return exc
        except Exception as exc:
            log.exception("editing message %s failed", message.id)
            return exc
        finally:
            self.last_used = self._clock()


# --- the council queue ----------------------------------------------------------------------


class _Ticket:
    __slots__ = ("granted", "on_position")

    def __init__(self, on_position: Callable[[int], None]) -> None:
        self.granted = False
        self.on_position = on_position


class CouncilQueue:
    """At most ``limit`` councils at once; the rest wait in arrival order and know their place.

    A freed seat is handed to the next in line as the ``council_seat`` bot event, awaited with
    ``Client.wait_for``: the standard way for a bot to wait on something, and one that test
    harnesses (simcord) recognise as a parked wait rather than a hang.
    """

    EVENT = "council_seat"

    def __init__(self, limit: int, client: discord.Client) -> None:
        self.limit = limit
        self.running = 0
        self._client = client
        self._waiting: list[_Ticket] = []

    @property
    def queued(self) -> int:
        return len(self._waiting)

    @asynccontextmanager
    async def seat(self, on_position: Callable[[int], None] = lambda _: None) -> AsyncIterator[None]:
        """Hold one of the ``limit`` seats; ``on_position(n)`` hears the queue position while waiting."""
        if self.running < self.limit and not self._waiting:
            self.running += 1
        else:
            ticket = _Ticket(on_position)
            self._waiting.append(ticket)
            on_position(len(self._waiting))
            try:
                await self._client.wait_for(self.EVENT, check=lambda granted: granted is ticket)
            except asyncio.CancelledError:
                if ticket.granted:
                    self._release()  # handed a seat just as we were cancelled: pass it on
                else:
                    self._waiting.remove(ticket)
                    self._announce()
                raise
        try:
            yield
        finally:
            self._release()

    def _release(self) -> None:
        if self._waiting:
            ticket = self._waiting.pop(0)
            ticket.granted = True  # the seat passes straight to the next in line
            self._client.dispatch(self.EVENT, ticket)
            self._announce()
        else:
            self.running -= 1

    def _announce(self) -> None:
        for position, ticket in enumerate(self._waiting, start=1):
            ticket.on_position(position)


# --- the bot ------------------------------------------------------------------------------


class ShenronTree(app_commands.CommandTree):
    """Logs unexpected command errors and tells the user something went wrong."""

    async def on_error(self, interaction: discord.Interaction, error: app_commands.AppCommandError) -> None:
        if isinstance(error, app_commands.CheckFailure):
            log.debug("check failed for /%s: %s", interaction.command and interaction.command.name, error)
            return  # the cog already answered the user
        log.exception("error in /%s", interaction.command and interaction.command.name, exc_info=error)
        text = "Something went wrong on SHENRON's side; the details are in the bot's log."
        try:
            if interaction.response.is_done():
                await interaction.followup.send(text, ephemeral=True)
            else:
                await interaction.response.send_message(text, ephemeral=True)
        except discord.HTTPException:
            log.warning("could not tell the user about the error")


class ShenronBot(commands.Bot):
    def __init__(
        self,
        *,
        settings: Settings,
        engine: CouncilEngine,
        session: aiohttp.ClientSession,
        kb: KnowledgeBase | None = None,
        stats: CouncilCounters | None = None,
        message_content: bool = True,
        kb_problem: str = "",
        metrics: Metrics | None = None,
    ) -> None:
        intents = discord.Intents.default()
        # Privileged: lets any message in a council thread continue it. Without it, only
        # messages that mention the bot arrive with their text.
        intents.message_content = message_content
        super().__init__(
            command_prefix=(),  # slash commands only; no text prefix to misfire on mentions
            help_command=None,
            intents=intents,
            allowed_mentions=discord.AllowedMentions.none(),
            tree_cls=ShenronTree,
        )
        self.settings = settings
        self.engine = engine
        self.session = session
        self.kb = kb
        self.kb_problem = kb_problem  # why there is no knowledge base, for /health
        self.stats = stats if stats is not None else CouncilCounters()
        self.queue = CouncilQueue(settings.max_concurrent_councils, self)
        self.metrics = metrics if metrics is not None else Metrics()
        self.metrics.queue_length_from(lambda: self.queue.queued)
        # Measured on demand (/health probe:True): the probe sends requests, so never on its own.
        self.parallelism: dict[str, ParallelismReport] = {}
        self.parallelism_at: float | None = None
        self._probe_lock = asyncio.Lock()
        self.rounds: set[asyncio.Task[None]] = set()
        self.shutdown_reason: str | None = None
        self._throttles: dict[int, EditThrottle] = {}

    @property
    def council(self) -> CouncilConfig:
        return self.engine.council

    @property
    def client(self) -> LLMClient:
        return self.engine.client

    @property
    def closing(self) -> bool:
        return self.shutdown_reason is not None

    async def setup_hook(self) -> None:
        for extension in EXTENSIONS:
            try:
                await self.load_extension(extension)
            except Exception:
                log.exception("could not load extension %s", extension)
        guild = discord.Object(self.settings.dev_guild_id) if self.settings.dev_guild_id else None
        if guild is not None:
            # A development guild gets the commands instantly; copy the global ones there.
            self.tree.copy_global_to(guild=guild)
        synced = await self.tree.sync(guild=guild)
        log.info(
            "synced %d commands %s", len(synced), f"to guild {self.settings.dev_guild_id}" if guild else "globally"
        )

    async def on_ready(self) -> None:
        log.info("logged in as %s (%s) in %d guilds", self.user, self.user and self.user.id, len(self.guilds))

    def throttle(self, channel_id: int) -> EditThrottle:
        """The edit budget of one channel (a thread is a channel)."""
        throttle = self._throttles.get(channel_id)
        if throttle is None:
            now = time.perf_counter()
            for cid, t in list(self._throttles.items()):
                if t.idle and now - t.last_used > THROTTLE_IDLE_S:
                    del self._throttles[cid]
            throttle = self._throttles[channel_id] = EditThrottle(self.settings.edit_interval_s)
        return throttle

    async def measure_parallelism(self) -> dict[str, ParallelismReport]:
        """How many requests each backend really runs at once (sends a few short requests)."""
        async with self._probe_lock:  # two admins asking at once share one measurement
            self.parallelism = await probe_council(self.client, self.council)
            self.parallelism_at = time.time()
            for name, report in self.parallelism.items():
                self.metrics.set_parallelism(name, report.at_once)
        return self.parallelism

    async def health_document(self) -> dict[str, Any]:
        """The JSON served at GET /health when HEALTH_PORT is set."""
        backends = await probe_backends(self.client, self.council, 5.0)
        return summarise_health(
            backends=backends,
            discord_connected=self.is_ready() and not self.is_closed(),
            kb_error=self.kb_problem or None,
            extra={
                "uptime_s": round(self.stats.uptime_s, 1),
                "councils": {
                    "served": self.stats.served,
                    "failed": self.stats.failed,
                    "interrupted": self.stats.interrupted,
                    "running": self.queue.running,
                    "queued": self.queue.queued,
                },
                "parallelism": {n: r.headline for n, r in self.parallelism.items()},
            },
        )

    @property
    def edits_made(self) -> int:
        return sum(t.edits for t in self._throttles.values())

    def start_round(self, coro: Any, *, name: str) -> asyncio.Task[None]:
        """Run a council round as its own task, so shutdown can find and interrupt it."""
        task = asyncio.create_task(coro, name=name)
        self.rounds.add(task)
        task.add_done_callback(self.rounds.discard)
        return task

    async def interrupt_rounds(self, reason: str, grace_s: float = SHUTDOWN_GRACE_S) -> None:
        """Cancel every round in flight; each writes its "interrupted" state before it ends."""
        tasks = [t for t in self.rounds if not t.done()]
        if not tasks:
            return
        log.info("interrupting %d council(s): %s", len(tasks), reason)
        for task in tasks:
            task.cancel()
        _, late = await asyncio.wait(tasks, timeout=grace_s)
        if late:
            log.warning("%d council(s) did not finish their final edits within %.0f s", len(late), grace_s)

    async def close(self) -> None:
        """Interrupt the councils in flight (visibly), then disconnect."""
        if self.shutdown_reason is None:
            self.shutdown_reason = "SHENRON was shut down while this round was running"
            await self.interrupt_rounds(self.shutdown_reason)
            for throttle in self._throttles.values():
                throttle.close()
        await super().close()


# --- the process ------------------------------------------------------------------------------


async def _serve(bot: ShenronBot, token: str) -> None:
    """Run until Discord disconnects us for good or a signal asks us to stop."""
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    installed: list[signal.Signals] = []
    for sig in (signal.SIGINT, signal.SIGTERM):
        try:
            loop.add_signal_handler(sig, stop.set)
            installed.append(sig)
        except (NotImplementedError, RuntimeError):  # Windows, or not the main thread
            pass
    try:
        async with bot:
            runner = asyncio.create_task(bot.start(token), name="discord-client")
            stopper = asyncio.create_task(stop.wait(), name="shutdown-signal")
            done, _ = await asyncio.wait({runner, stopper}, return_when=asyncio.FIRST_COMPLETED)
            if stopper in done:
                log.info("shutdown requested: interrupting councils, then closing")
                await bot.close()
            stopper.cancel()
            await runner  # re-raise a login or intents failure
    finally:
        for sig in installed:
            loop.remove_signal_handler(sig)


async def _open_knowledge(
    settings: Settings, session: aiohttp.ClientSession, council: CouncilConfig
) -> tuple[KnowledgeBase | None, str]:
    """The knowledge base, or None and why. A broken store should not keep the council offline."""
    if not settings.kb_enabled:
        return None, "disabled (KB_ENABLED=false)"
    from bot.knowledge.knowledge_base import KnowledgeBase as ChromaKnowledgeBase

    try:
        # Served by a `chroma run` child: Chroma's writes hold the GIL, and in-process they stall
        # the gateway heartbeat while documents are added (bench/knowledge.py: lag p99 36 → 4 ms).
        return await ChromaKnowledgeBase.open(settings, session, council.backends, serve=True), ""
    except ConfigError:
        raise
    except Exception as exc:
        if settings.chroma_url is None:
            log.warning("could not serve the knowledge base from a child process (%s); opening it in-process", exc)
            try:
                return await ChromaKnowledgeBase.open(settings, session, council.backends), ""
            except ConfigError:
                raise
            except Exception as again:
                exc = again
        log.error("the knowledge base is unavailable; councils run without it: %s", exc)
        return None, f"unavailable: {exc}"


async def run_bot(settings: Settings, council: CouncilConfig, *, kb: KnowledgeBase | None = None) -> int:
    """Run SHENRON in Discord until SIGINT/SIGTERM. Returns the exit status.

    ``kb`` replaces the knowledge base the settings describe (for embedding SHENRON elsewhere).
    """
    token = check_token(settings.discord_token)
    discord.utils.setup_logging(level=logging.getLevelName(settings.log_level))
    stats = CouncilCounters()
    metrics = Metrics()
    message_content = True
    async with make_session() as session:
        kb_problem = ""
        opened = None
        if kb is None:
            opened, kb_problem = await _open_knowledge(settings, session, council)
            kb = opened
        engine = CouncilEngine(LLMClient(session, council.backends), council)
        try:
            while True:
                bot = ShenronBot(
                    settings=settings,
                    engine=engine,
                    session=session,
                    kb=kb,
                    stats=stats,
                    message_content=message_content,
                    kb_problem=kb_problem,
                    metrics=metrics,
                )
                monitor = await start_monitoring(settings, metrics, bot.health_document)
                try:
                    await _serve(bot, token)
                    return 0
                except discord.LoginFailure:
                    raise ConfigError(
                        ".env",
                        "DISCORD_TOKEN",
                        "Discord rejected the token",
                        f"reset it in the {_PORTAL} and paste the new one into .env",
                    ) from None
                except discord.PrivilegedIntentsRequired:
                    if not message_content:
                        raise
                    # Still useful without it: follow-ups then need a mention of the bot.
                    log.warning(
                        "the MESSAGE_CONTENT intent is not enabled for this application "
                        "(Developer Portal → Bot → Privileged Gateway Intents); continuing without "
                        "it: in council threads, mention the bot to ask a follow-up"
                    )
                    message_content = False
                finally:
                    await stop_monitoring(monitor)
        finally:
            if opened is not None:
                await opened.close()  # type: ignore[attr-defined]
