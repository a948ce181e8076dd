"""What can go wrong with the knowledge base, said so that the reader can fix it.

    KnowledgeError            base: ``problem`` and ``fix``, printed as one line
    ├── EmbedderError         the embedding model cannot be loaded or its server failed
    ├── EmbedderMismatchError the collection was built with another embedder
    └── StoreError            Chroma cannot be reached, or the folder is in use by another process

Configuration mistakes (a malformed ``KB_EMBEDDER``) are ``bot.config.ConfigError`` like every
other setting. Files that cannot be ingested are not errors: they are skipped with a reason.
"""

from __future__ import annotations


class KnowledgeError(Exception):
    """A knowledge-base failure in one line: what is wrong, then how to fix it."""

    def __init__(self, problem: str, fix: str) -> None:
        self.problem, self.fix = problem, fix
        super().__init__(f"{problem}. Fix: {fix}")


class EmbedderError(KnowledgeError):
    """The embedder could not produce vectors (model missing, download failed, server error)."""


class EmbedderMismatchError(KnowledgeError):
    """The collection's vectors come from another embedder than the configured one."""

    def __init__(self, collection: str, stored: str, configured: str, fix: str) -> None:
        self.collection, self.stored, self.configured = collection, stored, configured
        super().__init__(
            f"collection {collection!r} was built with embedder {stored}, but KB_EMBEDDER is "
            f"{configured}; vectors from different models cannot be compared",
            fix,
        )


class StoreError(KnowledgeError):
    """Chroma is unreachable or unusable (server down, folder locked or unreadable)."""
