"""Where the council meets the knowledge base: retrieval for one question, never fatal."""

from __future__ import annotations

import logging
from typing import Any

import aiohttp

from bot.config import CouncilConfig, Settings
from bot.events import Passage

log = logging.getLogger(__name__)


async def retrieve_context(settings: Settings, council: CouncilConfig, session: aiohttp.ClientSession,
                           question: str, console: Any = None) -> list[Passage]:
    """Passages for the question, or [] when the knowledge base is off, empty or unavailable."""
    if not settings.kb_enabled:
        return []
    try:
        from bot.knowledge import KnowledgeBase
    except ImportError:
        return []
    if settings.chroma_url is None and not settings.chroma_path.exists():
        return []  # nothing was ever added: no need to create an empty store
    kb = await KnowledgeBase.open(settings, session=session, backends=council.backends)
    try:
        return await kb.search(question)
    finally:
        await kb.close()
