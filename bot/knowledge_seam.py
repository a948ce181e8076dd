"""Where the council meets the knowledge base: retrieval for one question, never fatal."""

from __future__ import annotations

import logging

import aiohttp
from rich.console import Console

from bot.config import CouncilConfig, Settings
from bot.events import Passage

log = logging.getLogger(__name__)


async def retrieve_context(
    settings: Settings, council: CouncilConfig, session: aiohttp.ClientSession, question: str, console: Console
) -> list[Passage]:
    """Passages for the question, or [] when the knowledge base is off, empty or unavailable (said on ``console``)."""
    if not settings.kb_enabled:
        return []
    from bot.knowledge import KnowledgeBase, KnowledgeError

    if settings.chroma_url is None and not settings.chroma_path.exists():
        return []  # nothing was ever added: no need to create an empty store
    try:
        kb = await KnowledgeBase.open(settings, session=session, backends=council.backends)
        try:
            return await kb.search(question)
        finally:
            await kb.close()
    except KnowledgeError as exc:
        # The council is still worth asking without the documents: say so (once) and go on.
        log.debug("knowledge base unavailable: %r", exc)
        console.print(f"[yellow]knowledge base unavailable, asking without it:[/] {exc}", highlight=False)
        return []
