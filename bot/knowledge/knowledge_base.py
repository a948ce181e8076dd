"""The knowledge base as the rest of SHENRON sees it: an async facade over store, embedder and files.

Every Chroma call, file read and local embedding runs in a worker thread, so the event loop (and
Discord's heartbeat) never waits on them. Searches may run while files are being added.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Self

import aiohttp
import numpy as np

from bot.config import Backend, Settings
from bot.events import Passage
from bot.knowledge.chunking import Chunk, chunk_sections
from bot.knowledge.documents import (
    Document,
    SkipFile,
    collect_files,
    read_bytes,
    read_document,
    source_name,
)
from bot.knowledge.embedders import Embedder, make_embedder
from bot.knowledge.store import ChromaStore, SourceInfo

log = logging.getLogger(__name__)

EMBED_BATCH = 32  # chunks per embedding call: keeps a big file from hogging the model

Status = Literal["added", "replaced", "unchanged", "skipped"]


@dataclass(frozen=True, slots=True)
class FileOutcome:
    source: str
    status: Status
    chunks: int = 0  # chunks stored for this file (added or replaced)
    removed: int = 0  # chunks of its previous version that were dropped
    reason: str = ""  # why it was skipped


@dataclass(frozen=True, slots=True)
class IngestProgress:
    done: int  # files finished, this one included
    total: int
    outcome: FileOutcome


@dataclass(frozen=True, slots=True)
class IngestReport:
    outcomes: tuple[FileOutcome, ...]
    elapsed_s: float

    def _with(self, *status: Status) -> list[FileOutcome]:
        return [o for o in self.outcomes if o.status in status]

    @property
    def added(self) -> list[FileOutcome]:
        return self._with("added")

    @property
    def replaced(self) -> list[FileOutcome]:
        return self._with("replaced")

    @property
    def unchanged(self) -> list[FileOutcome]:
        return self._with("unchanged")

    @property
    def skipped(self) -> list[FileOutcome]:
        return self._with("skipped")

    @property
    def chunks_added(self) -> int:
        return sum(o.chunks for o in self.outcomes)

    @property
    def chunks_removed(self) -> int:
        return sum(o.removed for o in self.outcomes)


@dataclass(frozen=True, slots=True)
class KBStats:
    collection: str
    chunks: int
    embedder: str  # identity recorded in the collection
    mode: Literal["embedded", "server"]
    location: str  # folder or URL


class KnowledgeBase:
    """Open with ``await KnowledgeBase.open(settings, session, backends)``; ``await kb.close()``."""

    def __init__(
        self,
        settings: Settings,
        store: ChromaStore,
        embedder: Embedder,
        own_session: aiohttp.ClientSession | None = None,
    ) -> None:
        self.settings, self.store, self.embedder = settings, store, embedder
        self._own_session = own_session
        self._closed = False

    @classmethod
    async def open(
        cls,
        settings: Settings,
        session: aiohttp.ClientSession | None = None,
        backends: Mapping[str, Backend] | None = None,
        *,
        check_embedder: bool = True,
        serve: bool = False,
    ) -> KnowledgeBase:
        """Connect to the collection named by the settings, creating it when it does not exist.

        Raises ConfigError for a malformed KB_EMBEDDER, StoreError when Chroma is unusable and
        EmbedderMismatchError when the collection was built by another embedder (unless
        ``check_embedder`` is False, which only ``rebuild`` needs).

        ``serve=True`` (for a long-running process such as the bot) runs an embedded folder in a
        `chroma run` child process: chromadb's in-process writes hold the GIL and would pause the
        event loop for 10-30 ms each. It starts in about 2 s; without CHROMA_URL only.
        """
        own = None
        if session is None and settings.kb_embedder.startswith("openai:"):
            session = own = aiohttp.ClientSession()
        try:
            embedder = make_embedder(settings.kb_embedder, session=session, backends=backends)
            store = await asyncio.to_thread(
                ChromaStore.open, settings, embedder.identity, check_embedder=check_embedder, serve=serve
            )
        except BaseException:
            if own is not None:
                await own.close()
            raise
        return cls(settings, store, embedder, own)

    async def close(self) -> None:
        """Release the store (and the folder lock); safe to call twice."""
        if self._closed:
            return
        self._closed = True
        try:
            await asyncio.to_thread(self.store.close)
        finally:
            if self._own_session is not None:
                await self._own_session.close()

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    # -- retrieval ------------------------------------------------------------------------------

    async def search(self, query: str, k: int | None = None, min_score: float | None = None) -> list[Passage]:
        """The ``k`` closest chunks (default KB_TOP_K) scoring at least ``min_score`` (default
        KB_MIN_SCORE), best first. Score is cosine similarity clipped to 0..1: an unrelated question
        gets no passages rather than the least bad ones."""
        query = query.strip()
        if not query:
            return []
        k = k or self.settings.kb_top_k
        threshold = self.settings.kb_min_score if min_score is None else min_score
        vector = (await self.embedder.embed([query]))[0]
        hits = await asyncio.to_thread(self.store.query, vector, k)
        passages = [
            Passage(
                text=h.text,
                source=str(h.metadata.get("source", "")),
                title=str(h.metadata.get("title", "")),
                heading=str(h.metadata.get("heading", "")),
                score=min(1.0, max(0.0, 1.0 - h.distance)),
            )
            for h in hits
        ]
        return [p for p in passages if p.score >= threshold]

    # -- ingestion ------------------------------------------------------------------------------

    async def add_paths(
        self, paths: Iterable[str | Path], progress: Callable[[IngestProgress], Any] | None = None
    ) -> IngestReport:
        """Add files and folders (recursively). Unchanged files are left alone, changed ones
        replaced; files that cannot be used are skipped with a reason, never fatal."""
        started = time.perf_counter()
        files, missing = await asyncio.to_thread(collect_files, [Path(p) for p in paths])
        total = len(files) + len(missing)
        outcomes: list[FileOutcome] = []

        def done(outcome: FileOutcome) -> None:
            outcomes.append(outcome)
            if progress:
                progress(IngestProgress(len(outcomes), total, outcome))

        for path, why in missing:
            done(FileOutcome(path, "skipped", reason=why))
        for path in files:
            source = await asyncio.to_thread(source_name, path)
            done(await self._ingest(source, lambda p=path: read_bytes(p)))
        return IngestReport(tuple(outcomes), time.perf_counter() - started)

    async def add_bytes(self, data: bytes, source: str) -> FileOutcome:
        """Add one file given as bytes (a Discord attachment); ``source`` names it, suffix included."""
        return await self._ingest(source, lambda: data)

    async def _ingest(self, source: str, load: Callable[[], bytes]) -> FileOutcome:
        try:
            data, digest = await asyncio.to_thread(_load_and_hash, load)
            if await asyncio.to_thread(self.store.content_hash, source) == digest:
                return FileOutcome(source, "unchanged")
            doc, chunks = await asyncio.to_thread(_parse, data, source)
        except SkipFile as skip:
            return FileOutcome(source, "skipped", reason=skip.reason)
        vectors = await self._embed([c.embedding_text(doc.title) for c in chunks])
        key = hashlib.sha256(source.encode()).hexdigest()[:16]
        now = time.time()
        removed = await asyncio.to_thread(
            self.store.replace_source,
            source,
            doc.content_hash,
            [f"{key}:{doc.content_hash[:16]}:{c.index}" for c in chunks],
            vectors,
            [c.text for c in chunks],
            [_metadata(doc, c, len(chunks), now) for c in chunks],
        )
        log.info("%s: %d chunks (%d old ones dropped)", source, len(chunks), removed)
        return FileOutcome(source, "replaced" if removed else "added", chunks=len(chunks), removed=removed)

    async def _embed(self, texts: Sequence[str]) -> np.ndarray:
        parts = [await self.embedder.embed(texts[i : i + EMBED_BATCH]) for i in range(0, len(texts), EMBED_BATCH)]
        return np.concatenate(parts) if parts else np.empty((0, 0), np.float32)

    # -- management -----------------------------------------------------------------------------

    async def list_sources(self) -> list[SourceInfo]:
        return await asyncio.to_thread(self.store.sources)

    async def remove(self, source: str) -> int:
        """Drop every chunk of ``source`` (as ``kb list`` shows it, or a path to that file).
        Returns how many chunks went; 0 when there was no such source."""
        removed = await asyncio.to_thread(self.store.remove_source, source)
        if not removed:
            named = await asyncio.to_thread(source_name, Path(source))
            if named != source:
                removed = await asyncio.to_thread(self.store.remove_source, named)
        return removed

    async def stats(self) -> KBStats:
        chunks = await asyncio.to_thread(self.store.count)
        return KBStats(self.settings.kb_collection, chunks, self.store.embedder, self.store.mode, self.store.location)

    async def rebuild(self, progress: Callable[[int, int], Any] | None = None) -> int:
        """Re-embed every stored chunk with the configured embedder (after KB_EMBEDDER changed).

        Works from the chunks' stored text, so the original files are not needed. The new vectors
        go into a fresh collection that replaces the old one only when complete.
        """
        total = await asyncio.to_thread(self.store.count)
        new = await asyncio.to_thread(self.store.start_rebuild, self.embedder.identity)
        done = 0
        try:
            while (page := await asyncio.to_thread(self.store.page, done, ("documents", "metadatas")))["ids"]:
                texts = [
                    _stored_chunk(doc, meta).embedding_text(str(meta.get("title", "")))
                    for doc, meta in zip(page["documents"], page["metadatas"], strict=True)
                ]
                vectors = await self._embed(texts)
                await asyncio.to_thread(
                    self.store.add_rows, new, page["ids"], vectors, page["documents"], page["metadatas"]
                )
                done += len(page["ids"])
                if progress:
                    progress(done, total)
        except BaseException:
            await asyncio.shield(asyncio.to_thread(self.store.abandon_rebuild))
            raise
        await asyncio.to_thread(self.store.finish_rebuild, new)
        return done


def _load_and_hash(load: Callable[[], bytes]) -> tuple[bytes, str]:
    data = load()
    return data, hashlib.sha256(data).hexdigest()


def _parse(data: bytes, source: str) -> tuple[Document, list[Chunk]]:
    doc = read_document(data, source)
    return doc, chunk_sections(doc.sections)


def _metadata(doc: Document, chunk: Chunk, total: int, now: float) -> dict[str, Any]:
    return {
        "source": doc.source,
        "title": doc.title,
        "kind": doc.kind,
        "heading": chunk.heading,
        "chunk": chunk.index,
        "chunks": total,
        "content_hash": doc.content_hash,
        "added_at": now,
    }


def _stored_chunk(text: str, meta: Mapping[str, Any]) -> Chunk:
    return Chunk(int(meta.get("chunk", 0)), str(meta.get("heading", "")), text)
