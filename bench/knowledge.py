"""Knowledge-base benchmark: ingest throughput, query latency, recall against exact search, loop lag.

    uv run python bench/knowledge.py [--chunks 10000] [--big 100000] [--queries 200]

1. Ingest ``--chunks`` chunks through the real pipeline (Markdown files → sections → chunks → the
   local MiniLM embedder → embedded Chroma) while a ticker task measures how late the event loop
   wakes up. The text is real English: docstring paragraphs (150–400 characters, one section and
   so one chunk each) of the Python packages installed here. A sample of full-size chunks (~900
   characters, the chunker's limit) gives the throughput for ordinary documents too.
2. Query latency at that size: the Chroma query alone (vector in, documents out) and
   ``kb.search`` end to end (the question's embedding included). Sequential, p50/p95.
3. Recall@5 of the HNSW index against exact search (numpy, brute force) on the same stored
   embeddings, for short questions made from held-out paragraphs (their first 12 words).
4. The same at ``--big`` chunks: the real embeddings plus synthetic ones inserted directly (no
   embedding cost). A synthetic vector mixes two real ones (weights 0.5–1 and the rest) plus a
   little noise, normalised: it lives where real chunks live, unlike isotropic noise.
5. Event-loop lag while ingesting ``--served-chunks`` chunks into a folder served by a ``chroma run``
   child process (``KnowledgeBase.open(..., serve=True)``, for the bot): chromadb's in-process
   bindings hold the GIL through every write; over HTTP to another process nothing does.

Targets: query p95 ≤ 20 ms at the big size, recall@5 ≥ 0.95, event-loop lag p99 ≤ 20 ms.
Prints a table and writes bench/results/knowledge.json.
"""

from __future__ import annotations

import argparse
import ast
import asyncio
import json
import platform
import re
import sys
import sysconfig
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
from rich.console import Console
from rich.table import Table

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bot.config import Settings
from bot.knowledge import KnowledgeBase
from bot.knowledge.embedders import _load_minilm, encode_minilm
from bot.knowledge.store import HNSW

RESULTS = Path(__file__).resolve().parent / "results" / "knowledge.json"
SECTIONS_PER_FILE = 50
TICK_S = 0.010
TARGETS = {"query_p95_ms": 20.0, "recall_at_5": 0.95, "loop_lag_p99_ms": 20.0}
console = Console(highlight=False)


# --- data ----------------------------------------------------------------------------------------

_MARKUP = re.compile(r"^[#=>|*+-]|```|~~~")  # would read as a heading, fence or list: one chunk each


def docstring_paragraphs(count: int) -> list[str]:
    """``count`` distinct docstring paragraphs of 150–400 characters: stdlib first, then site-packages."""
    found: list[str] = []
    seen: set[str] = set()
    for root in (sysconfig.get_paths()["stdlib"], sysconfig.get_paths()["purelib"]):
        for path in sorted(Path(root).rglob("*.py")):
            if {"test", "tests"} & set(path.parts):
                continue
            try:
                tree = ast.parse(path.read_text(encoding="utf-8"))
            except (SyntaxError, UnicodeDecodeError, ValueError, OSError):
                continue
            for node in ast.walk(tree):
                if not isinstance(node, ast.Module | ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef):
                    continue
                for paragraph in re.split(r"\n\s*\n", ast.get_docstring(node) or ""):
                    paragraph = " ".join(paragraph.split())
                    if 150 <= len(paragraph) <= 400 and paragraph not in seen and not _MARKUP.search(paragraph):
                        seen.add(paragraph)
                        found.append(paragraph)
                        if len(found) == count:
                            return found
    raise SystemExit(f"only {len(found)} docstring paragraphs here; use --chunks {len(found) - 300}")


def write_markdown(folder: Path, paragraphs: list[str], *, per_file: int = SECTIONS_PER_FILE) -> None:
    folder.mkdir(parents=True)
    for f, start in enumerate(range(0, len(paragraphs), per_file)):
        sections = [f"## Section {start + i}\n\n{p}" for i, p in enumerate(paragraphs[start : start + per_file])]
        (folder / f"doc{f:04d}.md").write_text(f"# Document {f}\n\n" + "\n\n".join(sections), encoding="utf-8")


def synthetic(real: np.ndarray, count: int, rng: np.random.Generator) -> np.ndarray:
    i, j = rng.integers(0, len(real), count), rng.integers(0, len(real), count)
    a = rng.uniform(0.5, 1.0, (count, 1)).astype(np.float32)
    mixed = a * real[i] + (1 - a) * real[j] + rng.standard_normal((count, real.shape[1]), np.float32) * 0.02
    return (mixed / np.linalg.norm(mixed, axis=1, keepdims=True)).astype(np.float32)


# --- measurements --------------------------------------------------------------------------------


def percentiles(values: list[float] | np.ndarray, *ps: float) -> list[float]:
    return [float(np.percentile(values, p)) for p in ps]


async def ingest(kb: KnowledgeBase, folder: Path) -> tuple[float, int, list[float]]:
    """Seconds, chunks stored, and the event loop's lateness (s) at every tick meanwhile."""
    loop = asyncio.get_running_loop()
    lateness: list[float] = []

    async def ticker() -> None:
        while True:
            start = loop.time()
            await asyncio.sleep(TICK_S)
            lateness.append(loop.time() - start - TICK_S)

    ticking = asyncio.create_task(ticker())
    started = time.perf_counter()
    report = await kb.add_paths([folder])
    elapsed = time.perf_counter() - started
    ticking.cancel()
    return elapsed, report.chunks_added, lateness


def recall_at_5(
    collection: object, vectors: np.ndarray, queries: np.ndarray, ids: list[str]
) -> tuple[float, list[float]]:
    """Recall@5 of the collection's index against brute force over ``vectors`` (rows named by
    ``ids``), and the query latencies (s)."""
    exact = np.argsort(-(queries @ vectors.T), axis=1)[:, :5]
    hits, latencies = 0, []
    for q, truth in zip(queries, exact, strict=True):
        started = time.perf_counter()
        got = collection.query(
            query_embeddings=q[None, :],
            n_results=5,  # type: ignore[attr-defined]
            include=["documents", "metadatas", "distances"],
        )
        latencies.append(time.perf_counter() - started)
        hits += len(set(got["ids"][0]) & {ids[t] for t in truth})
    return hits / (5 * len(queries)), latencies


def stored_vectors(collection: object) -> tuple[list[str], np.ndarray]:
    ids, rows = [], []
    offset = 0
    while True:
        page = collection.get(limit=5000, offset=offset, include=["embeddings"])  # type: ignore[attr-defined]
        if not page["ids"]:
            return ids, np.asarray(rows, dtype=np.float32)
        ids += page["ids"]
        rows += list(page["embeddings"])
        offset += len(page["ids"])


# --- the run -------------------------------------------------------------------------------------


async def run(args: argparse.Namespace) -> dict[str, object]:
    figures: dict[str, object] = {
        "chunks": args.chunks,
        "big": args.big,
        "queries": args.queries,
        "hnsw": HNSW,
        "python": platform.python_version(),
        "machine": platform.machine(),
    }
    t0 = time.perf_counter()
    paragraphs = docstring_paragraphs(args.chunks + args.queries)
    corpus, held_out = paragraphs[: args.chunks], paragraphs[args.chunks :]
    questions = [" ".join(p.split()[:12]) for p in held_out]
    console.print(
        f"corpus: {len(corpus)} paragraphs, {len(questions)} questions ({time.perf_counter() - t0:.1f} s to collect)"
    )

    with tempfile.TemporaryDirectory(prefix="kb-bench-") as tmp:
        root = Path(tmp)
        write_markdown(root / "docs", corpus)
        settings = replace(Settings(), chroma_path=root / "chroma", kb_collection="bench")
        kb = await KnowledgeBase.open(settings)
        try:
            encode_minilm(["load the model before the clock starts"])
            tokens = [len(e.ids) for e in _load_minilm()[0].encode_batch(corpus[:500])]
            console.print(f"1. ingesting {len(corpus)} chunks (about {np.mean(tokens):.0f} tokens each)…")
            seconds, stored, lateness = await ingest(kb, root / "docs")
            lag = [x * 1e3 for x in lateness]
            figures["ingest"] = {
                "seconds": seconds,
                "chunks": stored,
                "chunks_per_s": stored / seconds,
                "tokens_per_chunk": float(np.mean(tokens)),
                "loop_lag_p50_ms": percentiles(lag, 50)[0],
                "loop_lag_p99_ms": percentiles(lag, 99)[0],
                "loop_lag_max_ms": max(lag),
                "ticks": len(lag),
            }

            console.print("2./3. queries and recall at the ingested size…")
            query_vectors = encode_minilm(questions)
            ids, vectors = stored_vectors(kb.store.collection)
            recall, latencies = recall_at_5(kb.store.collection, vectors, query_vectors, ids)
            searches = []
            for question in questions:
                started = time.perf_counter()
                await kb.search(question, k=5)
                searches.append(time.perf_counter() - started)
            p50, p95 = percentiles(np.array(latencies) * 1e3, 50, 95)
            s50, s95 = percentiles(np.array(searches) * 1e3, 50, 95)
            figures["small"] = {
                "chunks": len(ids),
                "recall_at_5": recall,
                "query_p50_ms": p50,
                "query_p95_ms": p95,
                "search_p50_ms": s50,
                "search_p95_ms": s95,
            }

            big_sample = [" ".join(corpus[i : i + 4])[:900] for i in range(0, min(len(corpus), 4 * args.full_size), 4)]
            write_markdown(root / "full", big_sample, per_file=10)
            console.print(f"   {len(big_sample)} full-size chunks…")
            seconds_full, stored_full, _ = await ingest(kb, root / "full")
            figures["ingest_full_size"] = {"chunks": stored_full, "chunks_per_s": stored_full / seconds_full}

            console.print(f"4. {args.big} vectors inserted directly…")
            real = vectors
            extra = synthetic(real, max(0, args.big - len(real)), np.random.default_rng(7))
            all_vectors = np.concatenate([real, extra])
            all_ids = [f"v{i}" for i in range(len(all_vectors))]
            big = kb.store.client.create_collection(
                "bench-big", configuration={"hnsw": dict(HNSW)}, embedding_function=None
            )
            started = time.perf_counter()
            batch = kb.store.client.get_max_batch_size()
            for s in range(0, len(all_vectors), batch):
                await asyncio.to_thread(big.add, ids=all_ids[s : s + batch], embeddings=all_vectors[s : s + batch])
            build = time.perf_counter() - started
            recall_big, latencies_big = recall_at_5(big, all_vectors, query_vectors, all_ids)
            p50, p95 = percentiles(np.array(latencies_big) * 1e3, 50, 95)
            figures["big_index"] = {
                "chunks": len(all_vectors),
                "build_s": build,
                "recall_at_5": recall_big,
                "query_p50_ms": p50,
                "query_p95_ms": p95,
            }
        finally:
            await kb.close()

        subset = corpus[: args.served_chunks]
        write_markdown(root / "served-docs", subset)
        console.print(f"5. ingesting {len(subset)} chunks into a folder served by a chroma run child…")
        served_settings = replace(settings, chroma_path=root / "served")
        async with await KnowledgeBase.open(served_settings, serve=True) as served:
            seconds, stored, lateness = await ingest(served, root / "served-docs")
        lag = [x * 1e3 for x in lateness]
        figures["ingest_served"] = {
            "chunks": stored,
            "chunks_per_s": stored / seconds,
            "loop_lag_p50_ms": percentiles(lag, 50)[0],
            "loop_lag_p99_ms": percentiles(lag, 99)[0],
            "loop_lag_max_ms": max(lag),
        }
    figures["total_s"] = time.perf_counter() - t0
    return figures


def verdict(value: float, target: float, *, higher: bool = False) -> str:
    ok = value >= target if higher else value <= target
    return "[green]PASS[/]" if ok else "[red]FAIL[/]"


def report(f: dict) -> None:
    ing, full, small, big = f["ingest"], f["ingest_full_size"], f["small"], f["big_index"]
    table = Table(title="Knowledge base benchmark", title_justify="left")
    for column in ("figure", "value", "target", ""):
        table.add_column(column)
    n, b = f"{small['chunks']:,}", f"{big['chunks']:,}"
    table.add_row(
        f"ingest, {ing['chunks']:,} chunks of ~{ing['tokens_per_chunk']:.0f} tokens",
        f"{ing['chunks_per_s']:.1f} chunks/s ({ing['seconds']:.0f} s)",
        "",
        "",
    )
    table.add_row(
        f"ingest, {full['chunks']} full-size chunks (~900 chars)", f"{full['chunks_per_s']:.1f} chunks/s", "", ""
    )
    table.add_row(
        "event-loop lag while ingesting in-process (embedded), p50 / p99 / max",
        f"{ing['loop_lag_p50_ms']:.1f} / {ing['loop_lag_p99_ms']:.1f} / {ing['loop_lag_max_ms']:.1f} ms",
        "p99 ≤ 20 ms",
        verdict(ing["loop_lag_p99_ms"], TARGETS["loop_lag_p99_ms"]),
    )
    served = f["ingest_served"]
    table.add_row(
        f"the same, served by a chroma run child (serve=True; {served['chunks']:,} chunks at "
        f"{served['chunks_per_s']:.1f}/s), p50 / p99 / max",
        f"{served['loop_lag_p50_ms']:.1f} / {served['loop_lag_p99_ms']:.1f} / {served['loop_lag_max_ms']:.1f} ms",
        "p99 ≤ 20 ms",
        verdict(served["loop_lag_p99_ms"], TARGETS["loop_lag_p99_ms"]),
    )
    table.add_row(
        f"Chroma query at {n}, p50 / p95", f"{small['query_p50_ms']:.2f} / {small['query_p95_ms']:.2f} ms", "", ""
    )
    table.add_row(
        f"kb.search at {n} (embedding included), p50 / p95",
        f"{small['search_p50_ms']:.1f} / {small['search_p95_ms']:.1f} ms",
        "",
        "",
    )
    table.add_row(
        f"recall@5 vs exact at {n}",
        f"{small['recall_at_5']:.3f}",
        "≥ 0.95",
        verdict(small["recall_at_5"], TARGETS["recall_at_5"], higher=True),
    )
    table.add_row(f"index build at {b} (vectors in)", f"{big['build_s']:.0f} s", "", "")
    table.add_row(
        f"Chroma query at {b}, p50 / p95",
        f"{big['query_p50_ms']:.2f} / {big['query_p95_ms']:.2f} ms",
        "p95 ≤ 20 ms",
        verdict(big["query_p95_ms"], TARGETS["query_p95_ms"]),
    )
    table.add_row(
        f"recall@5 vs exact at {b}",
        f"{big['recall_at_5']:.3f}",
        "≥ 0.95",
        verdict(big["recall_at_5"], TARGETS["recall_at_5"], higher=True),
    )
    console.print(table)
    console.print(f"HNSW {f['hnsw']}; {f['queries']} questions; total {f['total_s']:.0f} s. Results: {RESULTS}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--chunks", type=int, default=10_000, help="chunks to ingest with the real embedder")
    parser.add_argument("--big", type=int, default=100_000, help="vectors in the big index")
    parser.add_argument("--queries", type=int, default=200, help="questions for latency and recall")
    parser.add_argument("--full-size", type=int, default=200, help="full-size chunks for the second throughput")
    parser.add_argument(
        "--served-chunks",
        type=int,
        default=1000,
        help="chunks to ingest into a folder served by a child process, for its event-loop lag",
    )
    args = parser.parse_args()
    figures = asyncio.run(run(args))
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(figures, indent=2) + "\n", encoding="utf-8")
    report(figures)


if __name__ == "__main__":
    main()
