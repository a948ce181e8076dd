"""`shenron kb …`: add, search, list, remove, stats and rebuild the knowledge base from a terminal.

``bot.cli`` calls :func:`add_kb_commands` with its subparsers. Each command is
``async def (args, settings, extra) -> int`` where ``extra`` is whatever the CLI hands over: the
loaded council (its backends serve ``KB_EMBEDDER=openai:…``), an aiohttp session, or None.
Knowledge-base failures print one line (problem, then fix) instead of a traceback.
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import asdict
from typing import Any

import aiohttp
from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from bot.config import CouncilConfig, Settings, load_council
from bot.knowledge import (
    EmbedderMismatchError,
    IngestProgress,
    IngestReport,
    KnowledgeBase,
    KnowledgeError,
)

log = logging.getLogger(__name__)

EXIT_OK, EXIT_FAILED, EXIT_CONFIG = 0, 1, 2
EXCERPT_CHARS = 160

Command = Callable[[argparse.Namespace, Settings, Any], Awaitable[int]]


def add_kb_commands(subparsers: Any) -> None:
    kb = subparsers.add_parser(
        "kb",
        help="manage the knowledge base (documents the council can cite)",
        description="Manage the knowledge base the council searches for context.",
    )
    sub = kb.add_subparsers(dest="kb_command", metavar="KB_COMMAND", required=True)

    add = sub.add_parser("add", help="add files and folders (Markdown, text, HTML, PDF)")
    add.add_argument("paths", nargs="+", metavar="PATH", help="files or folders (searched recursively)")
    add.set_defaults(func=_guarded(cmd_add))

    search = sub.add_parser("search", help="show the passages a question would retrieve")
    search.add_argument("query", nargs="+", help="the question (quote it)")
    search.add_argument("-k", type=int, metavar="N", help="how many passages at most (default: KB_TOP_K)")
    search.add_argument(
        "--min-score",
        type=float,
        metavar="S",
        help="lowest similarity 0..1 to show (default: KB_MIN_SCORE; 0 shows all)",
    )
    search.add_argument("--json", action="store_true", help="print JSON instead of a table")
    search.set_defaults(func=_guarded(cmd_search))

    listing = sub.add_parser("list", help="list the documents in the knowledge base")
    listing.add_argument("--json", action="store_true", help="print JSON instead of a table")
    listing.set_defaults(func=_guarded(cmd_list))

    remove = sub.add_parser("remove", help="remove a document (as `kb list` names it)")
    remove.add_argument("source", metavar="SOURCE", help="the source to remove, e.g. docs/runbook.md")
    remove.set_defaults(func=_guarded(cmd_remove))

    stats = sub.add_parser("stats", help="collection, chunks, embedder and where it is stored")
    stats.add_argument("--json", action="store_true", help="print JSON instead of a table")
    stats.set_defaults(func=_guarded(cmd_stats))

    rebuild = sub.add_parser("rebuild", help="re-embed every chunk with the current KB_EMBEDDER")
    rebuild.set_defaults(func=_guarded(cmd_rebuild))


def _guarded(command: Command) -> Command:
    """Knowledge-base failures become one line on stderr and an exit status, not a traceback."""

    async def run(args: argparse.Namespace, settings: Settings, extra: Any = None) -> int:
        try:
            return await command(args, settings, extra)
        except EmbedderMismatchError as exc:
            _error(str(exc))
            return EXIT_CONFIG
        except KnowledgeError as exc:
            _error(str(exc))
            return EXIT_FAILED

    run.__name__ = command.__name__
    return run


async def _open(settings: Settings, extra: Any, *, check_embedder: bool = True) -> KnowledgeBase:
    session = extra if isinstance(extra, aiohttp.ClientSession) else None
    council = extra if isinstance(extra, CouncilConfig) else None
    backends = None
    if settings.kb_embedder.startswith("openai:"):
        backends = (council or load_council(settings.council_path)).backends
    return await KnowledgeBase.open(settings, session=session, backends=backends, check_embedder=check_embedder)


def _error(text: str) -> None:
    Console(stderr=True, soft_wrap=True, highlight=False).print(f"[red]shenron:[/] {escape(text)}")


def _console(args: argparse.Namespace) -> Console:
    return Console(stderr=getattr(args, "json", False), highlight=False)


# --- add ---------------------------------------------------------------------------------------

_STATUS_STYLE = {"added": "green", "replaced": "cyan", "unchanged": "dim", "skipped": "yellow"}


async def cmd_add(args: argparse.Namespace, settings: Settings, extra: Any = None) -> int:
    console = _console(args)
    kb = await _open(settings, extra)
    try:
        with Progress(
            TextColumn("[bold]Adding"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
            TextColumn("{task.description}"),
            console=console,
            transient=True,
        ) as bar:
            task = bar.add_task("finding files…", total=None)

            def show(p: IngestProgress) -> None:
                bar.update(task, completed=p.done, total=p.total, description=escape(p.outcome.source))
                if p.outcome.status != "unchanged":
                    style = _STATUS_STYLE[p.outcome.status]
                    detail = p.outcome.reason or f"{p.outcome.chunks} chunks"
                    bar.console.print(
                        f"[{style}]{p.outcome.status:>9}[/] {escape(p.outcome.source)} [dim]({escape(detail)})[/]"
                    )

            report = await kb.add_paths(args.paths, progress=show)
    finally:
        await kb.close()
    console.print(_summary(report))
    stored = report.added or report.replaced or report.unchanged
    return EXIT_FAILED if report.skipped and not stored else EXIT_OK


def _summary(report: IngestReport) -> Table:
    table = Table(title="Knowledge base: add", show_header=False, title_justify="left")
    table.add_column(style="bold")
    table.add_column()
    table.add_row("files added", str(len(report.added)))
    table.add_row("files replaced", str(len(report.replaced)))
    table.add_row("files unchanged", str(len(report.unchanged)))
    table.add_row("files skipped", str(len(report.skipped)))
    table.add_row("chunks stored", str(report.chunks_added))
    table.add_row("old chunks dropped", str(report.chunks_removed))
    table.add_row("time", f"{report.elapsed_s:.1f} s")
    reasons: dict[str, int] = {}
    for outcome in report.skipped:
        reasons[outcome.reason] = reasons.get(outcome.reason, 0) + 1
    for reason, count in sorted(reasons.items(), key=lambda item: -item[1]):
        table.add_row("skipped because", f"{escape(reason)} ({count})")
    return table


# --- search ------------------------------------------------------------------------------------


async def cmd_search(args: argparse.Namespace, settings: Settings, extra: Any = None) -> int:
    query = " ".join(args.query).strip()
    console = _console(args)
    if not query:
        _error('the query is empty. Fix: shenron kb search "your question"')
        return EXIT_CONFIG
    kb = await _open(settings, extra)
    try:
        passages = await kb.search(query, k=args.k, min_score=args.min_score)
    finally:
        await kb.close()
    if args.json:
        print(json.dumps([asdict(p) | {"label": p.label} for p in passages], ensure_ascii=False, indent=2))
        return EXIT_OK
    if not passages:
        threshold = settings.kb_min_score if args.min_score is None else args.min_score
        console.print(
            f"No passage scores {threshold:g} or more for this question "
            "(try --min-score 0 to see the closest ones anyway)."
        )
        return EXIT_OK
    table = Table(title=f"Passages for: {escape(query)}", title_justify="left")
    table.add_column("score", justify="right")
    table.add_column("source")
    table.add_column("text")
    for p in passages:
        excerpt = " ".join(p.text.split())
        excerpt = excerpt if len(excerpt) <= EXCERPT_CHARS else excerpt[: EXCERPT_CHARS - 1] + "…"
        table.add_row(f"{p.score:.2f}", escape(p.label), escape(excerpt))
    console.print(table)
    return EXIT_OK


# --- list, remove, stats -----------------------------------------------------------------------


async def cmd_list(args: argparse.Namespace, settings: Settings, extra: Any = None) -> int:
    kb = await _open(settings, extra)
    try:
        sources = await kb.list_sources()
    finally:
        await kb.close()
    if args.json:
        print(json.dumps([asdict(s) for s in sources], ensure_ascii=False, indent=2))
        return EXIT_OK
    console = _console(args)
    if not sources:
        console.print("The knowledge base is empty. Add documents with: shenron kb add PATH…")
        return EXIT_OK
    table = Table(
        title=f"Knowledge base {escape(settings.kb_collection)}: {len(sources)} documents", title_justify="left"
    )
    table.add_column("source", overflow="fold")
    table.add_column("title")
    table.add_column("kind")
    table.add_column("chunks", justify="right")
    table.add_column("added", no_wrap=True)
    for s in sources:
        added = time.strftime("%Y-%m-%d %H:%M", time.localtime(s.added_at)) if s.added_at else ""
        table.add_row(escape(s.source), escape(s.title), s.kind, str(s.chunks), added)
    console.print(table)
    return EXIT_OK


async def cmd_remove(args: argparse.Namespace, settings: Settings, extra: Any = None) -> int:
    console = _console(args)
    kb = await _open(settings, extra)
    try:
        removed = await kb.remove(args.source)
    finally:
        await kb.close()
    if not removed:
        _error(
            f"no document named {args.source!r} in the knowledge base. "
            "Fix: use a source exactly as `shenron kb list` shows it"
        )
        return EXIT_FAILED
    console.print(f"Removed {escape(args.source)} ({removed} chunks).")
    return EXIT_OK


async def cmd_stats(args: argparse.Namespace, settings: Settings, extra: Any = None) -> int:
    kb = await _open(settings, extra)
    try:
        stats = await kb.stats()
        documents = len(await kb.list_sources())
    finally:
        await kb.close()
    figures = asdict(stats) | {
        "documents": documents,
        "enabled": settings.kb_enabled,
        "top_k": settings.kb_top_k,
        "min_score": settings.kb_min_score,
    }
    if args.json:
        print(json.dumps(figures, indent=2))
        return EXIT_OK
    table = Table(title="Knowledge base", show_header=False, title_justify="left")
    table.add_column(style="bold")
    table.add_column()
    for key, value in figures.items():
        table.add_row(key.replace("_", " "), escape(str(value)))
    _console(args).print(table)
    return EXIT_OK


async def cmd_rebuild(args: argparse.Namespace, settings: Settings, extra: Any = None) -> int:
    console = _console(args)
    kb = await _open(settings, extra, check_embedder=False)
    try:
        before = kb.store.embedder
        with Progress(
            TextColumn("[bold]Re-embedding"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
            console=console,
            transient=True,
        ) as bar:
            task = bar.add_task("", total=None)
            done = await kb.rebuild(lambda n, total: bar.update(task, completed=n, total=total))
    finally:
        await kb.close()
    console.print(
        f"Rebuilt collection {escape(settings.kb_collection)}: {done} chunks re-embedded "
        f"({escape(before or 'unknown')} → {escape(kb.embedder.identity)})."
    )
    return EXIT_OK
