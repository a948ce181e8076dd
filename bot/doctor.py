"""`shenron doctor`: check everything SHENRON depends on, one line per check, each problem with its fix.

In order: the settings file (and its permissions), the settings, the roster; then for each backend:
reachable and how fast, API key accepted, the roster's models served, and how many requests it
really runs at once (``bot.parallelism``); the knowledge base; the Discord token's shape (and, with
``--online``, whether Discord accepts it). Exit status: 0 all ✓, 1 warnings (⚠), 2 errors (✗).

Secrets (the Discord token, every API key) never appear in the output: nothing prints them, and
every line is scrubbed of them on the way out all the same.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import binascii
import json
import os
import re
import stat
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp

from bot.config import DISCORD_TOKEN_RE, ConfigError, CouncilConfig, Settings, load_council, load_settings
from bot.health import same_model, users_of
from bot.llm import AuthError, HTTPStatusError, LLMClient, LLMError, make_session
from bot.parallelism import plan_probes, probe_parallelism

EXIT_OK, EXIT_WARN, EXIT_ERROR = 0, 1, 2
OK, WARN, ERROR, SKIP = "ok", "warn", "error", "skip"
SYMBOLS = {OK: "✓", WARN: "⚠", ERROR: "✗", SKIP: "–"}
STYLES = {OK: "green", WARN: "yellow", ERROR: "red", SKIP: "dim"}

DISCORD_API = "https://discord.com/api/v10"
DISCORD_TIMEOUT_S = 10.0
MODELS_TIMEOUT_S = 10.0
KB_TIMEOUT_S = 60.0
PROBE_TIMEOUT_S = 60.0
PORTAL = "Discord Developer Portal → your application → Bot → Reset Token"
BASE64URL_RE = re.compile(r"^[A-Za-z0-9_-]+$")
REDACTED = "[secret]"


@dataclass
class Check:
    """One line of the report."""

    name: str
    status: str  # OK, WARN, ERROR or SKIP
    detail: str
    fix: str = ""
    data: dict[str, Any] = field(default_factory=dict)

    def line(self) -> str:
        text = f"{SYMBOLS[self.status]} {self.name}: {self.detail}"
        if not self.fix:
            return text
        return f"{text}{'' if text.endswith(('.', '?', '!')) else '.'} Fix: {self.fix}"

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "status": self.status, "detail": self.detail, "fix": self.fix, "data": self.data}


def exit_code(checks: Sequence[Check]) -> int:
    statuses = {c.status for c in checks}
    return EXIT_ERROR if ERROR in statuses else EXIT_WARN if WARN in statuses else EXIT_OK


class Redactor:
    """Replaces every known secret in text (and in nested data) with a marker."""

    def __init__(self, secrets: Sequence[str | None] = ()) -> None:
        self.secrets: list[str] = []
        self.add(secrets)

    def add(self, secrets: Sequence[str | None]) -> None:
        fresh = {s for s in secrets if s and len(s) >= 4} - set(self.secrets)
        # Longest first, so a secret that contains another is replaced whole.
        self.secrets = sorted({*self.secrets, *fresh}, key=len, reverse=True)

    def text(self, value: str) -> str:
        for secret in self.secrets:
            value = value.replace(secret, REDACTED)
        return value

    def data(self, value: Any) -> Any:
        if isinstance(value, str):
            return self.text(value)
        if isinstance(value, Mapping):
            return {k: self.data(v) for k, v in value.items()}
        if isinstance(value, list | tuple):
            return [self.data(v) for v in value]
        return value


# --- configuration -----------------------------------------------------------------------------


def check_env_file(path: Path, shown: str | None = None) -> Check:
    """The settings file: present? Open to other users? (It holds the token and the API keys.)"""
    shown = shown or str(path)
    if not path.exists():
        return Check(
            shown,
            SKIP,
            f"not found in {Path.cwd()}; settings come from the environment only "
            "(copy .env.example to .env to keep them in a file)",
        )
    if not path.is_file():
        return Check(shown, ERROR, "is not a file", "remove it or point --env-file at your settings file")
    mode = stat.S_IMODE(path.stat().st_mode)
    if os.name == "posix" and mode & 0o077:
        who = " and ".join(w for w, bits in (("group", 0o070), ("others", 0o007)) if mode & bits)
        return Check(
            shown,
            WARN,
            f"is open to {who} (mode {mode:03o}) and it holds secrets",
            f"chmod 600 {shown}",
            {"mode": f"{mode:03o}"},
        )
    return Check(shown, OK, f"found, mode {mode:03o}", data={"mode": f"{mode:03o}"})


def describe_settings(settings: Settings) -> Check:
    kb = "on" if settings.kb_enabled else "off"
    health = (
        f"/health and /metrics on {settings.health_host}:{settings.health_port}"
        if settings.health_port
        else "/health and /metrics off (HEALTH_PORT unset)"
    )
    return Check("settings", OK, f"valid; knowledge base {kb}; {health}")


def check_council(settings: Settings, env: Mapping[str, str] | None) -> tuple[Check, CouncilConfig | None]:
    try:
        council = load_council(settings.council_path, env=env)
    except ConfigError as exc:
        return Check(exc.file, ERROR, f"{exc.key}: {exc.problem}", exc.fix), None
    backends = ", ".join(council.backends)
    detail = (
        f"{len(council.fighters)} fighter{'s' if len(council.fighters) != 1 else ''} and the synthesizer "
        f"{council.synthesizer.name} on {len(council.backends)} backend"
        f"{'s' if len(council.backends) != 1 else ''} ({backends})"
    )
    override = ((os.environ if env is None else env).get("LLM_BASE_URL") or "").strip()
    if override:
        detail += f"; LLM_BASE_URL points every backend at {override.rstrip('/')}"
    return Check(str(settings.council_path), OK, detail), council


# --- backends ----------------------------------------------------------------------------------


def _fix_unreachable(council: CouncilConfig, name: str) -> str:
    return (
        f"start the server, or correct base_url in [backends.{name}] of {council.source} "
        "(LLM_BASE_URL in .env overrides it)"
    )


async def check_backend(
    client: LLMClient,
    council: CouncilConfig,
    name: str,
    *,
    probe: bool,
    probe_timeout_s: float = PROBE_TIMEOUT_S,
    probe_tokens: int = 24,
) -> list[Check]:
    """Reachable, key accepted, models served, parallelism: the lines for one backend."""
    b = council.backends[name]
    label = f"backend {name}"
    checks: list[Check] = []
    started = time.perf_counter()
    try:
        served = await client.list_models(name, timeout_s=MODELS_TIMEOUT_S)
    except AuthError as exc:
        ms = (time.perf_counter() - started) * 1000
        checks.append(
            Check(
                label,
                OK,
                f"reachable at {b.base_url}, answered {exc.status} in {ms:.0f} ms",
                data={"latency_ms": round(ms, 1)},
            )
        )
        if b.api_key_env:
            checks.append(
                Check(
                    f"{label} API key",
                    ERROR,
                    f"rejected ({exc.status}: {exc.server_message or 'unauthorized'})",
                    f"check {b.api_key_env} in .env: it must hold this server's key",
                )
            )
        else:
            checks.append(
                Check(
                    f"{label} API key",
                    ERROR,
                    f"the server wants a key ({exc.status})",
                    f'put the key in .env and name its variable with api_key_env = "…" in '
                    f"[backends.{name}] of {council.source}",
                )
            )
        return checks
    except HTTPStatusError as exc:
        fix = (
            "make base_url end in /v1 (where /models and /chat/completions live)"
            if exc.status == 404
            else "check the server's log"
        )
        return [Check(label, ERROR, str(exc), fix)]
    except LLMError as exc:
        return [Check(label, ERROR, str(exc), _fix_unreachable(council, name))]
    ms = (time.perf_counter() - started) * 1000
    checks.append(
        Check(
            label,
            OK,
            f"reachable at {b.base_url}, /models answered in {ms:.0f} ms",
            data={"latency_ms": round(ms, 1), "models": served},
        )
    )
    if b.api_key_env:
        checks.append(Check(f"{label} API key", OK, f"accepted ({b.api_key_env})"))

    users = users_of(council, name)
    wanted = list(dict.fromkeys(model for _, model in users))
    missing = [(who, model) for who, model in users if not any(same_model(model, m) for m in served)]
    if not served:
        checks.append(
            Check(
                f"{label} models",
                WARN,
                "the server lists no models, so missing ones cannot be checked",
                "load the roster's models on the server",
            )
        )
    elif missing:
        by_model: dict[str, list[str]] = {}
        for who, model in missing:
            by_model.setdefault(model, []).append(who)
        said = "; ".join(
            f"{', '.join(who)} {'uses' if len(who) == 1 else 'use'} {model!r}" for model, who in by_model.items()
        )
        listing = ", ".join(served[:15]) + (f" (+{len(served) - 15} more)" if len(served) > 15 else "")
        checks.append(
            Check(
                f"{label} models",
                ERROR,
                f"not served: {said} (it serves: {listing})",
                f"load or download the model on the server (Ollama: ollama pull MODEL), or change "
                f"model in {council.source} (LLM_MODEL in .env sets one model for everyone)",
                {"missing": [who for who, _ in missing], "served": served},
            )
        )
    else:
        checks.append(Check(f"{label} models", OK, f"serves every roster model ({', '.join(wanted)})"))

    if not probe:
        checks.append(Check(f"{label} parallelism", SKIP, "not measured (--skip-probe)"))
        return checks
    plan = next((p for p in plan_probes(council) if p.backend == name), None)
    models = [m for m in (plan.models if plan else ()) if not served or any(same_model(m, s) for s in served)]
    if plan is None or not models:
        checks.append(Check(f"{label} parallelism", SKIP, "not measured: no fighter's model is served here"))
        return checks
    report = await probe_parallelism(
        client, name, models, plan.requests, probe_tokens, probe_timeout_s, users=plan.users, config_file=council.source
    )
    status = {"ok": OK, "warn": WARN, "error": ERROR}[report.status]
    detail = report.verdict
    if report.findings:
        detail += " (" + "; ".join(report.findings) + ")"
    if report.error:
        detail += f": {report.error}"
    if report.matches_config:
        detail += f"; max_concurrency = {b.max_concurrency} matches"
    fix = "; ".join(report.advice)
    if report.status == "error" and not fix:
        fix = 'make one request work first (shenron ask --fighters NAME "hello" shows the whole error)'
    checks.append(Check(f"{label} parallelism", status, detail, fix, report.to_dict()))
    return checks


# --- knowledge base ----------------------------------------------------------------------------


async def check_knowledge_base(
    settings: Settings, council: CouncilConfig | None, session: aiohttp.ClientSession
) -> Check:
    name = "knowledge base"
    if not settings.kb_enabled:
        return Check(name, SKIP, "off (KB_ENABLED=false)")
    try:
        from bot.knowledge import KnowledgeBase
    except ImportError as exc:
        if exc.name == "bot.knowledge":
            return Check(name, SKIP, "not part of this build")
        return Check(
            name,
            WARN,
            f"cannot be loaded ({exc.__class__.__name__}: {exc})",
            "install the dependencies (uv sync), or set KB_ENABLED=false",
        )
    if settings.chroma_url is None and not settings.chroma_path.exists():
        return Check(
            name,
            SKIP,
            f"empty: nothing has been added yet ({settings.chroma_path} does not exist); "
            "add documents with shenron kb add PATH",
        )
    try:
        async with asyncio.timeout(KB_TIMEOUT_S):
            kb = await KnowledgeBase.open(settings, session=session, backends=council.backends if council else None)
            try:
                stats = await kb.stats()
            finally:
                await kb.close()
    except TimeoutError:
        return Check(
            name,
            WARN,
            f"did not open within {KB_TIMEOUT_S:g} s",
            "check CHROMA_URL / CHROMA_PATH and the embedder (shenron kb stats shows more)",
        )
    except ConfigError as exc:
        return Check(name, WARN, f"{exc.key}: {exc.problem}", exc.fix)
    except Exception as exc:  # the store is someone else's code: whatever it raises becomes a line
        return Check(
            name,
            WARN,
            f"cannot be opened: {exc}",
            "follow the message above (shenron kb stats shows more), or set KB_ENABLED=false",
        )
    return Check(name, OK, _describe_kb(stats), data=_kb_data(stats))


def _kb_data(stats: Any) -> dict[str, Any]:
    if isinstance(stats, Mapping):
        return dict(stats)
    fields = getattr(stats, "__dataclass_fields__", None) or getattr(stats, "__dict__", {})
    return {k: getattr(stats, k) for k in fields if isinstance(getattr(stats, k, None), str | int | float | bool)}


def _describe_kb(stats: Any) -> str:
    d = _kb_data(stats)
    chunks = d.get("chunks", d.get("count"))
    parts = []
    if "collection" in d:
        parts.append(f"collection {d['collection']}")
    if chunks is not None:
        parts.append("empty: add documents with shenron kb add PATH" if chunks == 0 else f"{chunks} chunks")
    if "embedder" in d:
        parts.append(f"embedder {d['embedder']}")
    if "location" in d:
        parts.append(f"at {d['location']}")
    return ", ".join(parts) or str(stats)


# --- Discord -----------------------------------------------------------------------------------


def _bot_id(first_part: str) -> str | None:
    try:
        raw = base64.urlsafe_b64decode(first_part + "=" * (-len(first_part) % 4)).decode("ascii")
    except (binascii.Error, UnicodeDecodeError, ValueError):
        return None
    return raw if raw.isdigit() else None


def check_discord_token(token: str | None, *, online: bool = False) -> Check:
    """The token's shape (three base64url parts), never its value."""
    name = "Discord token"
    get = f"copy the bot token from the {PORTAL} and put DISCORD_TOKEN=<token> in .env"
    if not token:
        return Check(name, WARN, "DISCORD_TOKEN is not set: shenron run needs it (ask and doctor work without it)", get)
    if token.lower().startswith("bot "):
        return Check(name, ERROR, "starts with 'Bot '", "put only the token in .env, without the 'Bot ' prefix")
    if any(c in token for c in "\"' \t"):
        return Check(
            name, ERROR, "contains quotes or spaces", "write it as DISCORD_TOKEN=<token> with nothing around the token"
        )
    parts = token.split(".")
    if token.isdigit():
        return Check(name, ERROR, "is a number: that is the application or user ID, not the token", get)
    if len(parts) == 1 and len(token) == 32:
        return Check(
            name, ERROR, "looks like the OAuth2 client secret (one part, 32 characters), not the bot token", get
        )
    if len(parts) != 3:
        return Check(
            name, ERROR, f"has {len(parts)} dot-separated part{'s' if len(parts) != 1 else ''}; a bot token has 3", get
        )
    if not all(BASE64URL_RE.match(p) for p in parts):
        return Check(name, ERROR, "has characters a bot token never contains (only A–Z, a–z, 0–9, - and _)", get)
    if not DISCORD_TOKEN_RE.match(token):
        return Check(name, ERROR, "its parts are too short for a bot token (was it cut off?)", get)
    bot_id = _bot_id(parts[0])
    if bot_id is None:
        return Check(name, WARN, "has three parts, but the first does not decode to a bot ID", get)
    tail = "" if online else " (not checked with Discord; --online does)"
    return Check(name, OK, f"looks like a bot token for the bot with ID {bot_id}{tail}", data={"bot_id": bot_id})


async def check_discord_online(
    session: aiohttp.ClientSession, token: str, *, api_base: str = DISCORD_API, timeout_s: float = DISCORD_TIMEOUT_S
) -> Check:
    """Ask Discord who the token belongs to (GET /users/@me). Network trouble is a warning, not a crash."""
    name = "Discord login"
    url = f"{api_base.rstrip('/')}/users/@me"
    headers = {"Authorization": f"Bot {token}", "User-Agent": "DiscordBot (shenron, 0.1)"}
    try:
        async with session.get(url, headers=headers, timeout=aiohttp.ClientTimeout(total=timeout_s)) as resp:
            if resp.status == 200:
                data = await resp.json(content_type=None)
                user = data.get("username", "?") if isinstance(data, dict) else "?"
                uid = data.get("id", "?") if isinstance(data, dict) else "?"
                return Check(
                    name, OK, f"Discord accepts the token: bot {user} (ID {uid})", data={"username": user, "id": uid}
                )
            if resp.status == 401:
                return Check(
                    name,
                    ERROR,
                    "Discord rejected the token (401 Unauthorized)",
                    f"reset it in the {PORTAL} and paste the new one into .env as DISCORD_TOKEN",
                )
            if resp.status == 429:
                return Check(name, WARN, "Discord rate-limited the check (429)", "try again in a minute")
            return Check(
                name,
                WARN,
                f"Discord answered {resp.status} {resp.reason or ''}".rstrip(),
                "try again later; https://discordstatus.com shows outages",
            )
    except (TimeoutError, aiohttp.ClientError, OSError, ValueError) as exc:
        return Check(
            name,
            WARN,
            f"could not reach {url.split('/api')[0]} ({exc.__class__.__name__}); the token's shape was checked above",
            "check this machine's HTTPS access to discord.com, then run shenron doctor --online again",
        )


# --- the run -----------------------------------------------------------------------------------


async def run_doctor(
    *,
    env_file: Path | None,
    env_file_shown: str | None = None,
    settings: Settings | None = None,
    env: Mapping[str, str] | None = None,
    online: bool = False,
    probe: bool = True,
    emit: Callable[[Check], None] = lambda c: None,
    redactor: Redactor | None = None,
    discord_api: str = DISCORD_API,
    probe_timeout_s: float = PROBE_TIMEOUT_S,
) -> list[Check]:
    """Run every check in order; ``emit`` hears each (already scrubbed of secrets) as it is made."""
    redactor = redactor or Redactor()
    checks: list[Check] = []

    def add(check: Check) -> None:
        check = Check(
            redactor.text(check.name),
            check.status,
            redactor.text(check.detail),
            redactor.text(check.fix),
            redactor.data(check.data),
        )
        checks.append(check)
        emit(check)

    if env_file is not None:
        add(check_env_file(env_file, env_file_shown))
    if settings is None:
        try:
            settings = load_settings(env)
        except ConfigError as exc:
            add(Check(exc.file, ERROR, f"{exc.key}: {exc.problem}", exc.fix))
            return checks
    redactor.add(settings.secrets())
    add(describe_settings(settings))
    council_check, council = check_council(settings, env)
    if council is not None:
        redactor.add([b.api_key for b in council.backends.values()])
    add(council_check)

    async with make_session() as session:
        if council is None:
            add(Check("backends", SKIP, f"not checked: fix {council_check.name} first"))
        else:
            client = LLMClient(session, council.backends)
            for name in council.backends:
                try:
                    found = await check_backend(client, council, name, probe=probe, probe_timeout_s=probe_timeout_s)
                except Exception as exc:  # a bug here must not hide the remaining checks
                    failed = f"the check itself failed ({exc.__class__.__name__}: {exc})"
                    found = [Check(f"backend {name}", ERROR, failed, "run shenron -v doctor and report the traceback")]
                for check in found:
                    add(check)
        add(await check_knowledge_base(settings, council, session))
        token_check = check_discord_token(settings.discord_token, online=online)
        add(token_check)
        if online:
            if token_check.status == OK and settings.discord_token:
                add(await check_discord_online(session, settings.discord_token, api_base=discord_api))
            else:
                add(Check("Discord login", SKIP, "not checked: fix the token first"))
    return checks


class _Printer:
    """Prints each check as it is made: coloured on a terminal, plain text otherwise."""

    def __init__(self, stream: Any = None) -> None:
        self.stream = stream or sys.stdout
        self.console = None
        if self.stream.isatty():
            from rich.console import Console

            self.console = Console(file=self.stream, highlight=False, soft_wrap=True)

    def __call__(self, check: Check) -> None:
        if self.console is None:
            print(check.line(), file=self.stream, flush=True)
            return
        from rich.markup import escape

        style = STYLES[check.status]
        text = f"[{style}]{SYMBOLS[check.status]}[/] [bold]{escape(check.name)}[/]: {escape(check.detail)}"
        if check.fix:
            text += f". [{style}]Fix:[/] {escape(check.fix)}"
        self.console.print(text)

    def summary(self, checks: Sequence[Check]) -> None:
        counts = {s: sum(1 for c in checks if c.status == s) for s in (OK, WARN, ERROR)}
        line = (
            f"{counts[OK]} ok, {counts[WARN]} warning{'s' if counts[WARN] != 1 else ''}, "
            f"{counts[ERROR]} error{'s' if counts[ERROR] != 1 else ''}"
        )
        if self.console is None:
            print(line, file=self.stream, flush=True)
        else:
            style = STYLES[ERROR if counts[ERROR] else WARN if counts[WARN] else OK]
            self.console.print(f"[{style}]{line}[/]")


async def cmd_doctor(args: argparse.Namespace, settings: Settings | None, council: object = None) -> int:
    """``shenron doctor``: the CLI hands over settings; the roster is loaded (and judged) here."""
    printer = None if args.json else _Printer()
    redactor = Redactor([os.environ.get("DISCORD_TOKEN")])
    checks = await run_doctor(
        env_file=Path(args.env_file),
        env_file_shown=args.env_file,
        settings=settings,
        online=args.online,
        probe=not args.skip_probe,
        emit=printer or (lambda c: None),
        redactor=redactor,
    )
    code = exit_code(checks)
    if printer is not None:
        printer.summary(checks)
    else:
        status = {EXIT_OK: OK, EXIT_WARN: WARN, EXIT_ERROR: ERROR}[code]
        doc = {"status": status, "exit_code": code, "checks": [c.to_dict() for c in checks]}
        print(redactor.text(json.dumps(doc, indent=2, ensure_ascii=False)))
    return code


def add_doctor_command(subparsers: Any) -> None:
    doctor = subparsers.add_parser(
        "doctor",
        help="check settings, backends, parallelism, knowledge base and the Discord token",
        description="Check everything SHENRON depends on and say how to fix what is wrong. "
        "Exit status: 0 all fine, 1 warnings, 2 errors.",
    )
    doctor.add_argument("--json", action="store_true", help="print one JSON document (for scripts)")
    doctor.add_argument(
        "--online", action="store_true", help="also ask Discord whether it accepts the token (needs network)"
    )
    doctor.add_argument(
        "--skip-probe",
        action="store_true",
        help="do not measure how many requests each backend runs at once "
        "(the probe generates a few hundred tokens per model)",
    )
    # needs_council=False: a broken roster is one of the things doctor reports, not a reason to stop.
    # settings_optional: with the CLI change proposed alongside, a bad .env value becomes a ✗ line too.
    doctor.set_defaults(func=cmd_doctor, needs_council=False, settings_optional=True)
