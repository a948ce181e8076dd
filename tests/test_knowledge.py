"""The knowledge base end to end: real Chroma (embedded in tmp_path, and a `chroma run` server),
the real offline MiniLM embedder, real files. The only fakes are HTTP servers at the network edge
(an OpenAI-compatible /embeddings endpoint, a model download that stalls)."""

from __future__ import annotations

import asyncio
import dataclasses
import os
import socket
import subprocess
import sys
import textwrap
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest
import pytest_asyncio
from aiohttp import web
from aiohttp.test_utils import TestServer

from bot.config import Settings
from bot.knowledge import (
    EmbedderError,
    EmbedderMismatchError,
    KnowledgeBase,
    StoreError,
    store,
)
from bot.knowledge.embedders import encode_minilm, ensure_chroma_model
from bot.knowledge.store import ChromaProcess
from tests.factories import make_backend
from tests.knowledge_corpus import QUESTIONS, UNRELATED, make_pdf, write_corpus

EMBED_MODEL = "minilm"


def settings_for(tmp_path: Path, **changes: object) -> Settings:
    return dataclasses.replace(Settings(), chroma_path=tmp_path / "chroma", **changes)


@pytest.fixture(scope="session", autouse=True)
def minilm_loaded() -> None:
    """Load the ONNX model once for the whole session, so no test pays for it in its timing."""
    assert encode_minilm(["warm up"]).shape == (1, 384)


@pytest_asyncio.fixture
async def kb(tmp_path: Path) -> AsyncIterator[KnowledgeBase]:
    kb = await KnowledgeBase.open(settings_for(tmp_path))
    yield kb
    await kb.close()


@pytest.fixture
def corpus(tmp_path: Path) -> Path:
    return write_corpus(tmp_path / "docs")


def name_and_heading(passage: object) -> tuple[str, str]:
    return Path(passage.source).name, passage.heading  # type: ignore[attr-defined]


# --- ingestion and retrieval ---------------------------------------------------------------------


async def test_each_question_retrieves_the_passage_that_answers_it(kb: KnowledgeBase, corpus: Path) -> None:
    report = await kb.add_paths([corpus])
    assert sorted(Path(o.source).name for o in report.added) == ["garden.html", "power.txt", "runbook.md"]
    assert report.chunks_added == 5 and not report.skipped
    for question, expected in QUESTIONS.items():
        passages = await kb.search(question)
        assert passages, question
        assert name_and_heading(passages[0]) == expected, question
        assert 0.35 <= passages[0].score <= 1.0
        assert [p.score for p in passages] == sorted((p.score for p in passages), reverse=True)
    top = (await kb.search("How do I swap a dead drive in the storage array?"))[0]
    assert "mdadm --add" in top.text and top.title == "Homelab runbook"
    assert top.label == "runbook.md › RAID"


async def test_an_unrelated_question_gets_no_passages(kb: KnowledgeBase, corpus: Path) -> None:
    assert await kb.search("How do I swap a dead drive in the storage array?") == []  # empty store
    await kb.add_paths([corpus])
    for question in UNRELATED:
        assert await kb.search(question) == [], question
        closest = await kb.search(question, min_score=0.0)  # the threshold, not an empty index
        assert len(closest) == 3 and all(p.score < 0.35 for p in closest)
    assert len(await kb.search("backups restic NAS", k=1)) == 1
    assert await kb.search("   ") == []


async def test_adding_unchanged_files_again_adds_nothing(kb: KnowledgeBase, corpus: Path) -> None:
    await kb.add_paths([corpus])
    before = await kb.stats()
    again = await kb.add_paths([corpus, corpus / "runbook.md"])  # the file twice: counted once
    assert [o.status for o in again.outcomes] == ["unchanged"] * 3
    assert again.chunks_added == 0 and again.chunks_removed == 0
    assert (await kb.stats()).chunks == before.chunks == 5


async def test_a_changed_file_replaces_its_old_chunks(kb: KnowledgeBase, corpus: Path) -> None:
    await kb.add_paths([corpus])
    runbook = corpus / "runbook.md"
    runbook.write_text(runbook.read_text().replace("at 02:00", "at 03:30").split("## Networking")[0])
    report = await kb.add_paths([corpus])
    [replaced] = report.replaced
    assert (Path(replaced.source).name, replaced.chunks, replaced.removed) == ("runbook.md", 2, 3)
    assert len(report.unchanged) == 2
    assert (await kb.stats()).chunks == 4
    backups = await kb.search("When do the nightly backups run and where are they stored?", min_score=0.0, k=10)
    texts = " ".join(p.text for p in backups)
    assert "03:30" in texts and "02:00" not in texts
    dns = await kb.search("Which IP address does the DNS server answer on?", min_score=0.0, k=10)
    assert all("10.0.0.53" not in p.text for p in dns)


async def test_bad_files_are_skipped_with_reasons_and_the_rest_is_added(kb: KnowledgeBase, tmp_path: Path) -> None:
    folder = tmp_path / "mixed"
    folder.mkdir()
    (folder / "good.md").write_text("# Fans\nThe rack fans spin at 40 percent below 30 degrees.\n")
    (folder / "empty.txt").write_bytes(b"")
    (folder / "blob.dat").write_bytes(b"\x00\x01\x02binary" * 100)
    (folder / "photo.png").write_bytes(b"\x89PNG\r\n\x1a\n")
    (folder / "broken.pdf").write_bytes(b"%PDF-1.7 nothing valid")
    (folder / "manual.pdf").write_bytes(make_pdf([["The UPS battery lasts twelve minutes at full load."]]))
    with (folder / "huge.log").open("wb") as f:
        f.truncate(21 * 2**20)
    report = await kb.add_paths([folder, tmp_path / "missing.md"])
    assert sorted(Path(o.source).name for o in report.added) == ["good.md", "manual.pdf"]
    reasons = {Path(o.source).name: o.reason for o in report.skipped}
    assert reasons.keys() == {"empty.txt", "blob.dat", "photo.png", "broken.pdf", "huge.log", "missing.md"}
    assert reasons["empty.txt"] == "empty file" and reasons["blob.dat"] == "binary file"
    assert reasons["photo.png"] == "unsupported file type (.png)"
    assert reasons["huge.log"].startswith("too big") and reasons["missing.md"] == "does not exist"
    assert reasons["broken.pdf"].startswith("not a readable PDF")
    [ups] = await kb.search("How long does the UPS battery last?", k=1)
    assert name_and_heading(ups) == ("manual.pdf", "page 1")


async def test_progress_is_reported_for_every_file(kb: KnowledgeBase, corpus: Path) -> None:
    seen = []
    await kb.add_paths([corpus, corpus / "nope.md", corpus / "gone.txt"], progress=seen.append)
    assert [(p.done, p.total) for p in seen] == [(1, 5), (2, 5), (3, 5), (4, 5), (5, 5)]
    assert [p.outcome.status for p in seen] == ["skipped", "skipped", "added", "added", "added"]


async def test_attachments_are_added_from_bytes(kb: KnowledgeBase) -> None:
    data = b"# Wi-Fi\nThe guest network password rotates every Monday.\n"
    first = await kb.add_bytes(data, "discord/wifi.md")
    assert (first.status, first.chunks) == ("added", 1)
    assert (await kb.add_bytes(data, "discord/wifi.md")).status == "unchanged"
    assert (await kb.add_bytes(b"\x00\x00", "discord/x.dat")).reason == "binary file"
    [hit] = await kb.search("When does the guest wifi password change?", k=1)
    assert (hit.source, hit.heading) == ("discord/wifi.md", "Wi-Fi")


async def test_list_and_remove_sources(kb: KnowledgeBase, corpus: Path) -> None:
    await kb.add_paths([corpus])
    sources = await kb.list_sources()
    assert [(Path(s.source).name, s.kind, s.chunks) for s in sources] == [
        ("garden.html", "html", 1),
        ("power.txt", "text", 1),
        ("runbook.md", "markdown", 3),
    ]
    assert sources[2].title == "Homelab runbook" and sources[2].added_at > 0
    assert await kb.remove(sources[2].source) == 3
    assert await kb.remove(str(corpus / "power.txt")) == 1  # a path to the file works too
    assert await kb.remove("never-added.md") == 0
    assert [Path(s.source).name for s in await kb.list_sources()] == ["garden.html"]
    assert await kb.search("How do I swap a dead drive in the storage array?") == []


async def test_the_knowledge_base_survives_a_restart(tmp_path: Path, corpus: Path) -> None:
    settings = settings_for(tmp_path)
    async with await KnowledgeBase.open(settings) as first:
        await first.add_paths([corpus])
        listed = await first.list_sources()
    async with await KnowledgeBase.open(settings) as second:
        stats = await second.stats()
        assert (stats.chunks, stats.embedder, stats.mode) == (5, "local:all-MiniLM-L6-v2-onnx-int8", "embedded")
        assert await second.list_sources() == listed
        [top, *_] = await second.search("What happens to the servers during a power outage?")
        assert name_and_heading(top) == ("power.txt", "")
        assert [o.status for o in (await second.add_paths([corpus])).outcomes] == ["unchanged"] * 3


async def test_searches_keep_answering_while_files_are_added(kb: KnowledgeBase, corpus: Path, tmp_path: Path) -> None:
    await kb.add_paths([corpus])
    bulk = tmp_path / "bulk"
    bulk.mkdir()
    for f in range(8):
        (bulk / f"host{f}.md").write_text(
            "\n\n".join(
                f"## Service {s}\nHost node{f} runs service {s} on port {8000 + 10 * f + s}; its logs rotate "
                f"after {s + 1} days and its config lives in /etc/svc{s}/node{f}.conf."
                for s in range(6)
            )
        )
    loop = asyncio.get_running_loop()
    lateness: list[float] = []

    async def ticker() -> None:
        while True:
            start = loop.time()
            await asyncio.sleep(0.005)
            lateness.append(loop.time() - start - 0.005)

    ticking = asyncio.create_task(ticker())
    ingest = asyncio.create_task(kb.add_paths([bulk]))
    answers = []
    while not ingest.done():
        passages = await kb.search("How do I swap a dead drive in the storage array?")
        answers.append(name_and_heading(passages[0]))
    report = await ingest
    ticking.cancel()
    assert len(report.added) == 8 and report.chunks_added == 48
    assert len(answers) > 8 * 2, "searches waited for whole files instead of interleaving"
    assert set(answers) == {("runbook.md", "RAID")}
    assert max(lateness) < 0.25, f"the event loop was blocked for {max(lateness):.3f} s"
    assert (await kb.stats()).chunks == 53


# --- embedders -----------------------------------------------------------------------------------


@asynccontextmanager
async def serving(method: str, path: str, handler: Any) -> AsyncIterator[str]:
    """One route on a real aiohttp server at 127.0.0.1:<free port>; yields the route's URL."""
    app = web.Application()
    app.router.add_route(method, path, handler)
    server = TestServer(app, host="127.0.0.1", port=0)
    await server.start_server()
    try:
        yield f"http://127.0.0.1:{server.port}{path}"
    finally:
        await server.close()


@pytest_asyncio.fixture
async def embeddings_url() -> AsyncIterator[str]:
    """An OpenAI-compatible /v1/embeddings that serves MiniLM vectors for model "minilm"."""

    async def embeddings(request: web.Request) -> web.Response:
        body = await request.json()
        if body.get("model") != EMBED_MODEL:
            return web.json_response(
                {"error": {"message": f"model '{body.get('model')}' not found", "type": "invalid_request_error"}},
                status=404,
            )
        vectors = await asyncio.to_thread(encode_minilm, body["input"])
        data = [{"object": "embedding", "index": i, "embedding": v.tolist()} for i, v in enumerate(vectors)]
        return web.json_response({"object": "list", "data": data[::-1], "model": EMBED_MODEL})  # any order

    async with serving("POST", "/v1/embeddings", embeddings) as url:
        yield url.removesuffix("/embeddings")


def openai_settings(tmp_path: Path, url: str, model: str = EMBED_MODEL) -> tuple[Settings, dict]:
    return settings_for(tmp_path, kb_embedder=f"openai:emb/{model}"), {"emb": make_backend(url, name="emb")}


async def test_another_embedder_is_refused_with_the_way_out(tmp_path: Path, corpus: Path) -> None:
    async with await KnowledgeBase.open(settings_for(tmp_path)) as kb:
        await kb.add_paths([corpus])
    for spec in ("chroma", "openai:emb/minilm"):
        settings = settings_for(tmp_path, kb_embedder=spec)
        with pytest.raises(EmbedderMismatchError) as caught:
            await KnowledgeBase.open(settings, backends={"emb": make_backend("http://127.0.0.1:9/v1", name="emb")})
        message = str(caught.value)
        assert "built with embedder local:all-MiniLM-L6-v2-onnx-int8" in message
        assert "shenron kb rebuild" in message and "KB_COLLECTION" in message
        assert str(tmp_path / "chroma") in message
    async with await KnowledgeBase.open(settings_for(tmp_path)) as kb:  # refusing changed nothing
        assert (await kb.stats()).chunks == 5


async def test_rebuild_re_embeds_every_chunk_with_the_new_embedder(
    tmp_path: Path, corpus: Path, embeddings_url: str
) -> None:
    async with await KnowledgeBase.open(settings_for(tmp_path)) as kb:
        await kb.add_paths([corpus])
        listed = await kb.list_sources()
    settings, backends = openai_settings(tmp_path, embeddings_url)
    async with await KnowledgeBase.open(settings, backends=backends, check_embedder=False) as kb:
        progress: list[tuple[int, int]] = []
        assert await kb.rebuild(lambda done, total: progress.append((done, total))) == 5
        assert progress[-1] == (5, 5)
    async with await KnowledgeBase.open(settings, backends=backends) as kb:
        assert (await kb.stats()).embedder == "openai:minilm"
        assert await kb.list_sources() == listed
        for question, expected in QUESTIONS.items():
            assert name_and_heading((await kb.search(question))[0]) == expected, question
    with pytest.raises(EmbedderMismatchError):  # and now the local embedder is the stranger
        await KnowledgeBase.open(settings_for(tmp_path))


async def test_a_failed_rebuild_leaves_the_collection_as_it_was(
    tmp_path: Path, corpus: Path, embeddings_url: str
) -> None:
    async with await KnowledgeBase.open(settings_for(tmp_path)) as kb:
        await kb.add_paths([corpus])
    settings, backends = openai_settings(tmp_path, embeddings_url, model="no-such-model")
    async with await KnowledgeBase.open(settings, backends=backends, check_embedder=False) as kb:
        with pytest.raises(EmbedderError):
            await kb.rebuild()
        assert [c.name for c in kb.store.client.list_collections()] == ["shenron"]  # no half-built copy
    async with await KnowledgeBase.open(settings_for(tmp_path)) as kb:
        assert (await kb.stats()).chunks == 5
        [top, *_] = await kb.search("How do I swap a dead drive in the storage array?")
        assert name_and_heading(top) == ("runbook.md", "RAID")


async def test_openai_embedder_errors_say_what_to_fix(tmp_path: Path, embeddings_url: str) -> None:
    settings, backends = openai_settings(tmp_path, embeddings_url, model="no-such-model")
    async with await KnowledgeBase.open(settings, backends=backends) as kb:
        with pytest.raises(EmbedderError) as caught:
            await kb.search("anything")
    assert "answered HTTP 404: model 'no-such-model' not found" in str(caught.value)
    assert "/v1/models" in caught.value.fix

    closed = f"http://127.0.0.1:{free_port()}/v1"
    settings, backends = openai_settings(tmp_path / "other", closed)
    async with await KnowledgeBase.open(settings, backends=backends) as kb:
        with pytest.raises(EmbedderError, match="refused the connection"):
            await kb.add_bytes(b"some text", "a.txt")


@pytest_asyncio.fixture
async def stalling_download() -> AsyncIterator[str]:
    """A model download that sends a byte now and then, forever."""

    async def trickle(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Length": "90000000"})
        await response.prepare(request)
        while True:
            await response.write(b"x")
            await asyncio.sleep(0.1)

    async with serving("GET", "/onnx.tar.gz", trickle) as url:
        yield url


async def test_chroma_model_download_gives_up_and_names_the_alternatives(
    tmp_path: Path, stalling_download: str
) -> None:
    for url in (f"http://127.0.0.1:{free_port()}/onnx.tar.gz", stalling_download):
        started = time.monotonic()
        with pytest.raises(EmbedderError) as caught:
            await asyncio.to_thread(ensure_chroma_model, tmp_path / "model", url, "0" * 64, timeout_s=1.0)
        assert time.monotonic() - started < 5
        assert "this machine may be offline" in caught.value.problem
        assert "KB_EMBEDDER=local" in caught.value.fix and "openai:BACKEND/MODEL" in caught.value.fix
        assert not list((tmp_path / "model").glob("*"))  # no partial file left behind


# --- one embedded folder, one writer ------------------------------------------------------------


async def test_another_process_cannot_write_while_the_folder_is_open(
    tmp_path: Path, corpus: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(store, "LOCK_WAIT_S", 0.3)
    holder = textwrap.dedent(f"""
        import asyncio, dataclasses, sys
        from pathlib import Path
        from bot.config import Settings
        from bot.knowledge import KnowledgeBase
        async def main():
            settings = dataclasses.replace(Settings(), chroma_path=Path({str(tmp_path / "chroma")!r}))
            kb = await KnowledgeBase.open(settings)
            print("open", flush=True)
            sys.stdin.readline()
            await kb.close()
        asyncio.run(main())
    """)
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-c", holder, stdin=subprocess.PIPE, stdout=subprocess.PIPE, cwd=Path(__file__).parent.parent
    )
    try:
        assert await proc.stdout.readline() == b"open\n"  # type: ignore[union-attr]
        async with await KnowledgeBase.open(settings_for(tmp_path)) as kb:  # reading is fine
            assert (await kb.stats()).chunks == 0
            with pytest.raises(StoreError) as caught:
                await kb.add_paths([corpus])
        assert "is open in another process" in caught.value.problem
        assert "/kb add" in caught.value.fix and "CHROMA_URL" in caught.value.fix
    finally:
        await asyncio.wait_for(proc.communicate(b"\n"), timeout=30)
    async with await KnowledgeBase.open(settings_for(tmp_path)) as kb:  # free again once it closed
        assert len((await kb.add_paths([corpus])).added) == 3


# --- the embedded folder served by a child process (for the bot) ---------------------------------


async def test_a_served_folder_works_like_the_embedded_one_and_its_child_ends(tmp_path: Path, corpus: Path) -> None:
    settings = settings_for(tmp_path)
    async with await KnowledgeBase.open(settings, serve=True) as kb:
        child = kb.store.child
        assert child is not None and child.proc.poll() is None
        assert len((await kb.add_paths([corpus])).added) == 3
        for question, expected in QUESTIONS.items():
            assert name_and_heading((await kb.search(question))[0]) == expected, question
        stats = await kb.stats()
        assert (stats.mode, stats.location, stats.chunks) == ("embedded", str(tmp_path / "chroma"), 5)
    assert child.proc.poll() is not None  # stopped with the knowledge base
    async with await KnowledgeBase.open(settings) as kb:  # the same folder, opened in-process
        assert [o.status for o in (await kb.add_paths([corpus])).outcomes] == ["unchanged"] * 3


async def test_the_served_child_ends_when_its_parent_is_killed(tmp_path: Path) -> None:
    parent = textwrap.dedent(f"""
        import asyncio, dataclasses, sys
        from pathlib import Path
        from bot.config import Settings
        from bot.knowledge import KnowledgeBase
        async def main():
            settings = dataclasses.replace(Settings(), chroma_path=Path({str(tmp_path / "chroma")!r}))
            kb = await KnowledgeBase.open(settings, serve=True)
            print(kb.store.child.proc.pid, flush=True)
            sys.stdin.readline()
        asyncio.run(main())
    """)
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-c", parent, stdin=subprocess.PIPE, stdout=subprocess.PIPE, cwd=Path(__file__).parent.parent
    )
    child_pid = int(await proc.stdout.readline())  # type: ignore[union-attr]
    proc.kill()
    await proc.wait()
    deadline = time.monotonic() + 20
    while _state(child_pid) not in ("gone", "zombie"):
        assert time.monotonic() < deadline, "chroma run outlived its parent"
        await asyncio.sleep(0.05)  # polling the child's state, not guessing a delay


def _state(pid: int) -> str:
    """'gone', 'zombie' or another state of a process, from /proc."""
    try:
        line = Path(f"/proc/{pid}/status").read_text().split("State:")[1].split("\n")[0].lower()
    except (OSError, IndexError):
        return "gone"
    return "zombie" if "zombie" in line else line.strip()


# --- a Chroma server -----------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def chroma_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A real `chroma run` from this environment on a free port, ready once its heartbeat answers."""
    if not (Path(sys.executable).parent / ("chroma.exe" if os.name == "nt" else "chroma")).exists():
        pytest.skip("the chroma CLI is not installed in this environment")
    server = ChromaProcess.start(tmp_path_factory.mktemp("chroma-server"))
    yield server.url
    server.stop()


async def test_server_mode_stores_searches_and_keeps_the_embedder(
    chroma_server: str, tmp_path: Path, corpus: Path
) -> None:
    settings = settings_for(tmp_path, chroma_url=chroma_server, kb_collection="server-test")
    async with await KnowledgeBase.open(settings) as kb:
        assert len((await kb.add_paths([corpus])).added) == 3
        stats = await kb.stats()
        assert (stats.mode, stats.location, stats.chunks) == ("server", chroma_server, 5)
    assert not (tmp_path / "chroma").exists()  # nothing was written locally
    async with await KnowledgeBase.open(settings) as kb:  # a new client sees the same collection
        assert [o.status for o in (await kb.add_paths([corpus])).outcomes] == ["unchanged"] * 3
        for question, expected in QUESTIONS.items():
            assert name_and_heading((await kb.search(question))[0]) == expected, question
        assert await kb.search(UNRELATED[0]) == []
    with pytest.raises(EmbedderMismatchError, match="delete collection 'server-test' on the server"):
        await KnowledgeBase.open(dataclasses.replace(settings, kb_embedder="chroma"))


async def test_an_unreachable_server_is_reported_with_the_fix(tmp_path: Path) -> None:
    url = f"http://127.0.0.1:{free_port()}"
    with pytest.raises(StoreError) as caught:
        await KnowledgeBase.open(settings_for(tmp_path, chroma_url=url))
    assert f"cannot reach the Chroma server at CHROMA_URL={url}" in caught.value.problem
    assert "chroma run" in caught.value.fix


async def test_scores_are_cosine_similarities_from_a_cosine_index(kb: KnowledgeBase, corpus: Path) -> None:
    await kb.add_paths([corpus])
    assert kb.store.collection.configuration["hnsw"] | store.HNSW == kb.store.collection.configuration["hnsw"]
    question = "What happens to the servers during a power outage?"
    [top] = await kb.search(question, k=1)
    chunk = "power\n" + top.text  # what was embedded: the document's place, then its text
    expected = float(encode_minilm([question])[0] @ encode_minilm([chunk])[0])
    assert top.score == pytest.approx(expected, abs=1e-4)
