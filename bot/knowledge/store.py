"""The one module that talks to ChromaDB. Synchronous: callers run every method in a worker thread.

Embedded (``PersistentClient(CHROMA_PATH)``) by default; ``CHROMA_URL`` selects a ``chroma run``
server through ``HttpClient``. The collection uses cosine space with HNSW settings measured by
``bench/knowledge.py`` (recall@5 against exact search), and records which embedder made its
vectors so that another embedder is refused instead of mixing incomparable vectors.

An embedded folder must not be written by two processes (Chroma does not guard it, and each keeps
its own in-memory index). While a store is open its process holds a shared lock on the folder; a
write takes it exclusively, so ``shenron kb add`` beside a running bot is refused with the way out.
"""

from __future__ import annotations

import ctypes
import logging
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar
from urllib.parse import urlsplit

import numpy as np

from bot.config import Settings
from bot.knowledge.errors import EmbedderMismatchError, StoreError

try:
    import fcntl
except ImportError:  # Windows: no advisory locks, one process at a time is up to the user
    fcntl = None  # type: ignore[assignment]

log = logging.getLogger(__name__)

SCHEMA = 1
# Measured in bench/knowledge.py: recall@5 >= 0.95 against exact search at 100k chunks.
HNSW = {"space": "cosine", "max_neighbors": 32, "ef_construction": 200, "ef_search": 128}
PAGE = 2000  # rows per get() when reading a whole collection
# chromadb's embedded bindings hold the GIL through a whole upsert (about 8 ms a call plus 1 ms a
# chunk, measured), so the event loop pauses meanwhile, thread or not. A few chunks per call keep
# each pause short (10-30 ms instead of 60-100 ms for 50 chunks); bench/knowledge.py measures the
# lag. With CHROMA_URL the writes happen in the server's process and the loop does not pause.
WRITE_BATCH = 4
DELETE_BATCH = 64
LOCK_WAIT_S = 10.0


@dataclass(frozen=True, slots=True)
class Hit:
    text: str
    metadata: dict[str, Any]
    distance: float


@dataclass(frozen=True, slots=True)
class SourceInfo:
    source: str
    title: str
    kind: str
    chunks: int
    content_hash: str
    added_at: float


def rebuild_hint(settings: Settings) -> str:
    where = (
        f"delete the folder {settings.chroma_path}"
        if settings.chroma_url is None
        else f"delete collection {settings.kb_collection!r} on the server"
    )
    return (
        f"run `shenron kb rebuild` to re-embed it with {settings.kb_embedder}, set KB_EMBEDDER back, "
        f"use another KB_COLLECTION, or {where} and add the files again"
    )


class FolderLock:
    """Per process and folder: shared while any store is open, exclusive during a write."""

    _open: ClassVar[dict[Path, FolderLock]] = {}
    _registry = threading.Lock()

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.users = 0
        self._fd = -1
        self._writing = threading.Lock()

    @classmethod
    def acquire(cls, folder: Path) -> FolderLock:
        folder = folder.resolve()
        with cls._registry:
            lock = cls._open.get(folder) or cls(folder)
            if lock.users == 0 and fcntl is not None:
                folder.mkdir(parents=True, exist_ok=True)
                lock._fd = os.open(folder / ".shenron.lock", os.O_RDWR | os.O_CREAT, 0o644)
                if not lock._flock(fcntl.LOCK_SH):
                    os.close(lock._fd)
                    raise lock._busy("is being written by another process")
            lock.users += 1
            cls._open[folder] = lock
            return lock

    def release(self) -> None:
        with self._registry:
            self.users -= 1
            if self.users == 0:
                del self._open[self.folder]
                if self._fd >= 0:
                    os.close(self._fd)  # closing drops the flock
                    self._fd = -1

    @contextmanager
    def writing(self) -> Iterator[None]:
        with self._writing:
            if self._fd >= 0:
                if not self._flock(fcntl.LOCK_EX):
                    # A failed upgrade has dropped the shared lock (flock converts by unlocking).
                    self._flock(fcntl.LOCK_SH)
                    raise self._busy("is open in another process")
                try:
                    yield
                finally:
                    fcntl.flock(self._fd, fcntl.LOCK_SH)
            else:
                yield

    def _flock(self, op: int) -> bool:
        deadline = time.monotonic() + LOCK_WAIT_S
        while True:
            try:
                fcntl.flock(self._fd, op | fcntl.LOCK_NB)
                return True
            except BlockingIOError:
                if time.monotonic() > deadline:
                    return False
                time.sleep(0.05)  # a writer holds it for one file at most, a reader for one command

    def _busy(self, why: str) -> StoreError:
        return StoreError(
            f"the knowledge base in {self.folder} {why} (the bot, or another shenron command); "
            "an embedded Chroma folder serves one writer at a time",
            "use /kb add in Discord while the bot runs, stop the other process, or share the "
            "knowledge base through a Chroma server (chroma run --path FOLDER, then CHROMA_URL)",
        )


def _client_settings() -> Any:
    from chromadb.config import Settings as ChromaSettings

    return ChromaSettings(anonymized_telemetry=False)


class ChromaStore:
    """One collection, opened for one embedder identity."""

    def __init__(
        self,
        client: Any,
        collection: Any,
        settings: Settings,
        lock: FolderLock | None,
        child: ChromaProcess | None = None,
    ) -> None:
        self.client, self.collection, self.settings, self.lock = client, collection, settings, lock
        self.child = child
        self.mode = "server" if settings.chroma_url else "embedded"
        self.location = settings.chroma_url or str(settings.chroma_path)

    # -- opening --------------------------------------------------------------------------------

    @classmethod
    def open(
        cls, settings: Settings, embedder: str, *, check_embedder: bool = True, serve: bool = False
    ) -> ChromaStore:
        """``serve``: run the embedded folder in a `chroma run` child process and talk HTTP to it,
        so that Chroma's writes never pause this process's event loop (for the bot)."""
        lock = child = None
        try:
            if settings.chroma_url:
                client = _http_client(settings.chroma_url)
            else:
                lock = FolderLock.acquire(settings.chroma_path)
                if serve:
                    child = ChromaProcess.start(settings.chroma_path)
                    client = _http_client(child.url)
                else:
                    client = _persistent_client(settings.chroma_path)
        except BaseException:
            if child:
                child.stop()
            if lock:
                lock.release()
            raise
        store = cls(client, None, settings, lock, child)
        try:
            store.collection = store._collection(settings.kb_collection, embedder, check_embedder)
        except BaseException:
            store.close()
            raise
        return store

    def _collection(self, name: str, embedder: str, check: bool) -> Any:
        from chromadb.errors import NotFoundError

        try:
            collection = self.client.get_collection(name, embedding_function=None)
        except NotFoundError:
            with self._writing():
                collection = self.client.get_or_create_collection(
                    name,
                    configuration={"hnsw": dict(HNSW)},
                    embedding_function=None,
                    metadata={"embedder": embedder, "shenron_schema": SCHEMA},
                )
            log.info("created collection %s for embedder %s", name, embedder)
        stored = (collection.metadata or {}).get("embedder")
        if stored is None and collection.count() == 0:
            with self._writing():
                collection.modify(metadata={"embedder": embedder, "shenron_schema": SCHEMA})
        elif check and stored != embedder:
            raise EmbedderMismatchError(
                name, stored or "an unknown embedder (not made by SHENRON)", embedder, rebuild_hint(self.settings)
            )
        return collection

    @property
    def embedder(self) -> str:
        return str((self.collection.metadata or {}).get("embedder", ""))

    @contextmanager
    def _writing(self) -> Iterator[None]:
        if self.lock is None:
            yield
        else:
            with self.lock.writing():
                yield

    def close(self) -> None:
        try:
            self.client.close()
        finally:
            if self.child is not None:
                self.child.stop()
                self.child = None
            if self.lock is not None:
                self.lock.release()
                self.lock = None

    # -- reading --------------------------------------------------------------------------------

    def count(self) -> int:
        return self.collection.count()

    def query(self, vector: np.ndarray, k: int) -> list[Hit]:
        result = self.collection.query(
            query_embeddings=vector[None, :], n_results=k, include=["documents", "metadatas", "distances"]
        )
        return [
            Hit(doc or "", dict(meta or {}), float(dist))
            for doc, meta, dist in zip(
                result["documents"][0], result["metadatas"][0], result["distances"][0], strict=True
            )
        ]

    def content_hash(self, source: str) -> str | None:
        """The hash of the file that the stored chunks of ``source`` came from, or None."""
        got = self.collection.get(where={"source": source}, limit=1, include=["metadatas"])
        return str(got["metadatas"][0].get("content_hash")) if got["ids"] else None

    def page(self, offset: int, include: Sequence[str] = ("metadatas",)) -> dict[str, Any]:
        """Up to PAGE rows from ``offset`` on, as Chroma's get() returns them (no ids: the end)."""
        return self.collection.get(limit=PAGE, offset=offset, include=list(include))

    def sources(self) -> list[SourceInfo]:
        found: dict[str, dict[str, Any]] = {}
        offset = 0
        while (page := self.page(offset))["ids"]:
            offset += len(page["ids"])
            for meta in page["metadatas"]:
                entry = found.setdefault(str(meta.get("source", "")), {"meta": meta, "chunks": 0})
                entry["chunks"] += 1
        return sorted(
            (
                SourceInfo(
                    source,
                    str(e["meta"].get("title", "")),
                    str(e["meta"].get("kind", "")),
                    e["chunks"],
                    str(e["meta"].get("content_hash", "")),
                    float(e["meta"].get("added_at", 0.0)),
                )
                for source, e in found.items()
            ),
            key=lambda s: s.source,
        )

    # -- writing --------------------------------------------------------------------------------

    def replace_source(
        self,
        source: str,
        content_hash: str,
        ids: Sequence[str],
        vectors: np.ndarray,
        documents: Sequence[str],
        metadatas: Sequence[dict[str, Any]],
    ) -> int:
        """Store a file's chunks, then drop the chunks of its previous version. Returns how many
        were dropped. New before old: a search meanwhile finds one version or the other."""
        with self._writing():
            _upsert(self.collection, ids, vectors, documents, metadatas)
            stale = {"$and": [{"source": source}, {"content_hash": {"$ne": content_hash}}]}
            return self._delete(self.collection.get(where=stale, include=[])["ids"])

    def remove_source(self, source: str) -> int:
        with self._writing():
            return self._delete(self.collection.get(where={"source": source}, include=[])["ids"])

    def _delete(self, ids: Sequence[str]) -> int:
        for start in range(0, len(ids), DELETE_BATCH):
            self.collection.delete(ids=list(ids[start : start + DELETE_BATCH]))
        return len(ids)

    def start_rebuild(self, embedder: str) -> Any:
        """A fresh, empty collection for ``embedder`` beside the current one (see finish_rebuild)."""
        self.abandon_rebuild()  # one left by a rebuild that was killed
        with self._writing():
            return self.client.create_collection(
                self._rebuild_name,
                configuration={"hnsw": dict(HNSW)},
                embedding_function=None,
                metadata={"embedder": embedder, "shenron_schema": SCHEMA},
            )

    def add_rows(
        self,
        collection: Any,
        ids: Sequence[str],
        vectors: np.ndarray,
        documents: Sequence[str],
        metadatas: Sequence[dict[str, Any]],
    ) -> None:
        with self._writing():
            _upsert(collection, ids, vectors, documents, metadatas)

    def abandon_rebuild(self) -> None:
        from chromadb.errors import NotFoundError

        with self._writing():
            try:
                self.client.delete_collection(self._rebuild_name)
            except NotFoundError:
                pass

    def finish_rebuild(self, new: Any) -> None:
        """The rebuilt collection takes the current one's name; until now the old one was intact."""
        name = self.collection.name
        with self._writing():
            self.client.delete_collection(name)
            new.modify(name=name)
        self.collection = self.client.get_collection(name, embedding_function=None)

    @property
    def _rebuild_name(self) -> str:
        return f"{self.collection.name[:500]}-rebuild"


class ChromaProcess:
    """`chroma run --path FOLDER` on a free loopback port, stopped with its parent."""

    START_TIMEOUT_S = 60.0

    def __init__(self, proc: subprocess.Popen[bytes], url: str, log_path: Path) -> None:
        self.proc, self.url, self.log_path = proc, url, log_path

    @classmethod
    def start(cls, folder: Path) -> ChromaProcess:
        exe = Path(sys.executable).parent / ("chroma.exe" if os.name == "nt" else "chroma")
        if not exe.exists():
            raise StoreError(
                f"the chroma command is not installed beside {sys.executable}",
                "reinstall chromadb (uv sync), or set CHROMA_URL to a running Chroma server",
            )
        folder.mkdir(parents=True, exist_ok=True)
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            port = probe.getsockname()[1]
        log_path = folder / ".chroma-server.log"
        with log_path.open("wb") as log_file:
            proc = subprocess.Popen(
                [str(exe), "run", "--path", str(folder), "--host", "127.0.0.1", "--port", str(port)],
                stdin=subprocess.DEVNULL,
                stdout=log_file,
                stderr=subprocess.STDOUT,
                preexec_fn=_die_with_parent,
            )
        child = cls(proc, f"http://127.0.0.1:{port}", log_path)
        deadline = time.monotonic() + cls.START_TIMEOUT_S
        while True:
            try:
                with urllib.request.urlopen(f"{child.url}/api/v2/heartbeat", timeout=1):
                    return child
            except OSError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    child.stop()
                    tail = log_path.read_text(errors="replace")[-500:].strip()
                    raise StoreError(
                        f"chroma run on {folder} did not start ({tail or 'no output'})",
                        "see that log, or set CHROMA_URL to a running Chroma server",
                    ) from None
                time.sleep(0.05)  # polling its heartbeat until it answers

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


# Resolved here, not in the forked child, where loading a library could deadlock.
_prctl = ctypes.CDLL(None).prctl if sys.platform.startswith("linux") else None


def _die_with_parent() -> None:
    """In the child, before exec: ask Linux to end it when the parent dies, even by SIGKILL."""
    if _prctl is not None:
        _prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


def _upsert(
    collection: Any,
    ids: Sequence[str],
    vectors: np.ndarray,
    documents: Sequence[str],
    metadatas: Sequence[dict[str, Any]],
) -> None:
    for start in range(0, len(ids), WRITE_BATCH):
        end = start + WRITE_BATCH
        collection.upsert(
            ids=list(ids[start:end]),
            embeddings=vectors[start:end],
            documents=list(documents[start:end]),
            metadatas=list(metadatas[start:end]),
        )


def _persistent_client(path: Path) -> Any:
    import chromadb

    try:
        return chromadb.PersistentClient(path=str(path), settings=_client_settings())
    except Exception as exc:
        raise StoreError(
            f"cannot open the Chroma folder {path} ({type(exc).__name__}: {exc})",
            "check that the folder is writable and was made by chromadb 1.x; or set CHROMA_PATH to another folder",
        ) from None


def _http_client(url: str) -> Any:
    import chromadb

    parts = urlsplit(url)
    ssl = parts.scheme == "https"
    port = parts.port or (443 if ssl else 8000)
    try:
        client = chromadb.HttpClient(
            host=parts.hostname or "localhost", port=port, ssl=ssl, settings=_client_settings()
        )
        client.heartbeat()
    except Exception as exc:
        raise StoreError(
            f"cannot reach the Chroma server at CHROMA_URL={url} ({type(exc).__name__}: {exc})",
            "start it with `chroma run --path data/chroma --port 8000`, fix CHROMA_URL, "
            "or remove CHROMA_URL to use the embedded store",
        ) from None
    return client
