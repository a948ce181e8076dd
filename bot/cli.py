"""The `shenron` command line: `ask`, `run`, `kb`, `doctor`.

Configuration mistakes print one line naming the file, the key and the fix, and exit with status 2.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import sys
from collections.abc import Awaitable, Callable
from pathlib import Path

from dotenv import load_dotenv

from bot.config import ConfigError, CouncilConfig, Settings, load_council, load_settings

log = logging.getLogger(__name__)

EXIT_OK, EXIT_FAILED, EXIT_CONFIG, EXIT_INTERRUPTED = 0, 1, 2, 130


def _split_names(raw: str | None) -> list[str] | None:
    if not raw:
        return None
    return [n.strip() for n in raw.replace(" ", ",").split(",") if n.strip()] or None


async def cmd_ask(args: argparse.Namespace, settings: Settings, council: CouncilConfig) -> int:
    from rich.console import Console

    from bot.council import CouncilEngine
    from bot.knowledge_seam import retrieve_context
    from bot.llm import LLMClient, make_session
    from bot.terminal import render_live, result_json

    question = " ".join(args.question).strip()
    if not question:
        raise ConfigError("command line", "question", "is empty", 'ask something: shenron ask "your question"')
    names = _split_names(args.fighters)
    engine_council = council
    if names:
        from bot.config import with_fighters

        engine_council = with_fighters(council, names)
    console = Console(stderr=args.json)
    async with make_session() as session:
        client = LLMClient(session, council.backends)
        engine = CouncilEngine(client, engine_council)
        context = [] if args.no_context else await retrieve_context(settings, council, session, question, console)
        events = engine.run(question, context=context)
        if args.json:
            from bot.council import collect

            result = await collect(events)
            print(result_json(result))
        else:
            result = await render_live(events, console, engine_council, [f.name for f in engine_council.fighters])
    if result is None:
        return EXIT_FAILED
    return EXIT_OK if result.ok else EXIT_FAILED


async def cmd_run(args: argparse.Namespace, settings: Settings, council: CouncilConfig) -> int:
    from bot.discord_bot import run_bot

    return await run_bot(settings, council)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="shenron", description="Convene a council of language models: in Discord, or right here."
    )
    parser.add_argument("--env-file", default=".env", help="settings file to load (default: .env)")
    parser.add_argument("--council", help="roster file (default: $SHENRON_COUNCIL or council.toml)")
    parser.add_argument("-v", "--verbose", action="store_true", help="log debug details to stderr")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    ask = sub.add_parser("ask", help="ask the council a question in the terminal")
    ask.add_argument("question", nargs="+", help="the question (quote it)")
    ask.add_argument("--json", action="store_true", help="print one JSON document instead of the live view")
    ask.add_argument("--fighters", help="only these fighters, comma-separated (e.g. GOKU,VEGETA)")
    ask.add_argument("--no-context", action="store_true", help="do not search the knowledge base")
    ask.set_defaults(func=cmd_ask, needs_council=True)

    run = sub.add_parser("run", help="start the Discord bot")
    run.set_defaults(func=cmd_run, needs_council=True)

    for hook in ("bot.kb_cli:add_kb_commands", "bot.doctor:add_doctor_command"):
        module, _, name = hook.partition(":")
        try:
            add = getattr(__import__(module, fromlist=[name]), name)
        except ImportError:
            continue
        add(sub)
    return parser


def _setup_logging(settings: Settings | None, verbose: bool) -> None:
    level = logging.DEBUG if verbose else getattr(logging, settings.log_level if settings else "WARNING")
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr)


def _warn_if_readable_by_others(path: Path, shown: str) -> None:
    """One stderr line when the settings file (it holds the tokens) is open to group or others."""
    if os.name == "nt":
        return  # no POSIX permission bits to judge
    mode = path.stat().st_mode & 0o777
    if mode & 0o044:
        warning = f"{shown} is readable by other users (mode {mode:o}); fix: chmod 600 {shown}"
        print(f"shenron: warning: {warning}", file=sys.stderr)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return EXIT_CONFIG
    env_file = Path(args.env_file)
    if env_file.is_file():
        load_dotenv(env_file, override=False)
        _warn_if_readable_by_others(env_file, args.env_file)
    elif args.env_file != ".env":
        print(f"shenron: {env_file}: settings file not found. Fix: check the path given to --env-file", file=sys.stderr)
        return EXIT_CONFIG
    try:
        if args.council:
            os.environ["SHENRON_COUNCIL"] = args.council
        try:
            settings = load_settings()
        except ConfigError:
            if not getattr(args, "settings_optional", False):
                raise
            settings = None  # doctor reports the mistake as one of its lines
        _setup_logging(settings if args.command == "run" else None, args.verbose)
        council = load_council(settings.council_path) if getattr(args, "needs_council", False) else None
        func: Callable[..., Awaitable[int]] = args.func
        return asyncio.run(func(args, settings, council))
    except ConfigError as exc:
        print(f"shenron: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    except KeyboardInterrupt:
        print("shenron: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
