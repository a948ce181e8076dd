"""Shared fixtures. Keep this small: feature fixtures live in their own test modules."""

from collections.abc import AsyncIterator

import pytest_asyncio

from tests.fakeserver import FakeLLM

pytest_plugins = ["tests.discord_fixtures"]  # simcord scenes for the Discord tests


@pytest_asyncio.fixture
async def fake_llm() -> AsyncIterator[FakeLLM]:
    """A started fake OpenAI-compatible server (accepts any model); closed after the test."""
    async with FakeLLM() as fake:
        yield fake
