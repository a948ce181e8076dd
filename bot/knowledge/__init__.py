"""SHENRON's knowledge base: documents in ChromaDB, retrieved as untrusted context for the council.

    kb = await KnowledgeBase.open(settings, session, council.backends)
    try:
        passages = await kb.search(question)      # [] when nothing is relevant enough
    finally:
        await kb.close()
    prompt_part = format_context(passages)

Modules: ``store`` (the only one that talks to Chroma), ``embedders``, ``documents`` (files to
sections), ``chunking`` (sections to chunks), ``knowledge_base`` (the async facade).
"""

from bot.knowledge.embedders import Embedder, make_embedder
from bot.knowledge.errors import EmbedderError, EmbedderMismatchError, KnowledgeError, StoreError
from bot.knowledge.knowledge_base import (
    FileOutcome,
    IngestProgress,
    IngestReport,
    KBStats,
    KnowledgeBase,
)
from bot.knowledge.store import SourceInfo

# The council's prompt builder already delimits passages and defangs fake delimiters; one
# implementation, under the name the knowledge base promised.
from bot.prompts import format_documents as format_context

__all__ = [
    "Embedder",
    "EmbedderError",
    "EmbedderMismatchError",
    "FileOutcome",
    "IngestProgress",
    "IngestReport",
    "KBStats",
    "KnowledgeBase",
    "KnowledgeError",
    "SourceInfo",
    "StoreError",
    "format_context",
    "make_embedder",
]
