"""Fixtures for the Discord tests: a real ShenronBot against simcord and the fake LLM server.

Import the fixtures you use into the test module (or list this module in ``pytest_plugins``).
Override ``bot_settings``, ``council_config`` or ``knowledge`` in a test class to change them.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, replace
from typing import Any

import aiohttp
import discord
import pytest
import pytest_asyncio
import simcord

from bot.config import CouncilConfig, Settings
from bot.council import CouncilEngine
from bot.discord_bot import ShenronBot
from bot.events import Passage
from bot.llm import LLMClient, make_session
from bot.stats import CouncilCounters
from tests.factories import NAMES, make_council
from tests.fakeserver import FakeLLM, Script

EDIT_INTERVAL_S = 0.05


@pytest.fixture
def bot_settings() -> Settings:
    # Short edit interval: edits still pass through the throttle, the suite stays fast.
    return Settings(edit_interval_s=EDIT_INTERVAL_S, max_concurrent_councils=4)


@pytest.fixture
def council_config(fake_llm: FakeLLM) -> CouncilConfig:
    # No retries: a scripted failure fails at once instead of backing off.
    return make_council(fake_llm.url, max_retries=0, round_deadline_s=20.0)


@pytest.fixture
def knowledge() -> Any:
    return None


@pytest_asyncio.fixture
async def llm_session() -> AsyncIterator[aiohttp.ClientSession]:
    async with make_session() as session:
        yield session


@pytest.fixture
def make_bot(
    bot_settings: Settings, council_config: CouncilConfig, llm_session: aiohttp.ClientSession, knowledge: Any
) -> Callable[..., ShenronBot]:
    """Build a bot the way ``run_bot`` does, from the test's dependencies."""

    def build(*, message_content: bool = True, **settings: Any) -> ShenronBot:
        engine = CouncilEngine(LLMClient(llm_session, council_config.backends), council_config)
        return ShenronBot(
            settings=replace(bot_settings, **settings),
            engine=engine,
            session=llm_session,
            kb=knowledge,
            stats=CouncilCounters(),
            message_content=message_content,
        )

    return build


@pytest.fixture
def simcord_bot(make_bot: Callable[..., ShenronBot]) -> ShenronBot:
    return make_bot()


@dataclass
class Scene:
    """A server with a #council channel, a member who asks and an admin."""

    env: simcord.Env
    guild: simcord.GuildHandle
    channel: simcord.ChannelHandle
    alice: simcord.MemberActor
    bob: simcord.MemberActor
    admin: simcord.MemberActor

    @property
    def bot(self) -> ShenronBot:
        bot = self.env.bot
        assert isinstance(bot, ShenronBot)
        return bot

    def thread(self) -> simcord.ChannelHandle:
        [thread] = self.channel.threads
        return thread

    def bot_messages(self, channel: simcord.ChannelHandle) -> list[discord.Message]:
        me = self.env.bot.user
        assert me is not None
        return [m for m in channel.history() if m.author.id == me.id]

    def edits(self, channel: simcord.ChannelHandle) -> int:
        """How many message edits the bot made in ``channel`` (from simcord's request log)."""
        prefix = f"/channels/{channel.id}/messages/"
        return sum(1 for r in self.env.http_requests if r.method == "PATCH" and r.path.startswith(prefix))


def make_scene(env: simcord.Env) -> Scene:
    guild = env.create_guild("Capsule Corp")
    channel = guild.create_text_channel("council")
    admins = guild.create_role("Admins", permissions=discord.Permissions(administrator=True))
    return Scene(
        env=env,
        guild=guild,
        channel=channel,
        alice=guild.add_member(env.create_user("alice")),
        bob=guild.add_member(env.create_user("bob")),
        admin=guild.add_member(env.create_user("root"), roles=[admins]),
    )


@pytest.fixture
def scene(simcord_env: simcord.Env) -> Scene:
    return make_scene(simcord_env)


def script_council(
    fake: FakeLLM,
    *,
    stagger_s: float = 0.02,
    synthesis: str = "The council agrees: use ZFS.",
    names: tuple[str, ...] = NAMES,
) -> list[str]:
    """Every fighter answers; the last in the roster is the fastest. Returns the arrival order."""
    for i, name in enumerate(names):
        delay = stagger_s * (len(names) - 1 - i)
        fake.script(
            name.lower(), Script(text=f"{name} thinks ZFS, because of checksums. Point {i}.", first_token_delay=delay)
        )
    fake.script("shenron", Script(text=synthesis, chunk_chars=6, token_interval=0.005))
    return list(reversed(names))


class GatedKnowledge:
    """A knowledge base whose searches wait until the test opens the gate.

    The wait is declared to simcord as external input, so an action returns while a council sits
    in retrieval — the way a test holds a council in flight.
    """

    def __init__(self, passages: list[Passage] | None = None) -> None:
        self.passages = passages or []
        self.gate = asyncio.Event()
        self.env: simcord.Env | None = None
        self.queries: list[str] = []

    async def search(self, query: str) -> list[Passage]:
        self.queries.append(query)
        assert self.env is not None, "attach the env first: knowledge.env = simcord_env"
        await self.env.external_wait(self.gate.wait(), reason="the test holds retrieval")
        return list(self.passages)

    async def stats(self) -> dict[str, Any]:
        return {"collection": "shenron", "chunks": 42, "embedder": "fake-embedder"}
