"""Configuration: deployment settings from the environment (``.env``) and the roster from ``council.toml``.

Every value is checked at start-up. A mistake becomes one :class:`ConfigError` naming the file, the
key and the fix; the CLI prints it and exits with status 2.
"""

from __future__ import annotations

import os
import re
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

DEFAULT_COUNCIL_FILE = "council.toml"
NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9 _\-]{0,31}$")
ENV_NAME_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
# A Discord bot token: three base64url parts (user ID, timestamp, HMAC); lengths vary over the years.
DISCORD_TOKEN_RE = re.compile(r"^[A-Za-z0-9_-]{20,}\.[A-Za-z0-9_-]{4,}\.[A-Za-z0-9_-]{20,}$")


class ConfigError(Exception):
    """A configuration mistake, said in one line: where, what is wrong, how to fix it."""

    def __init__(self, file: str, key: str, problem: str, fix: str) -> None:
        self.file, self.key, self.problem, self.fix = file, key, problem, fix
        super().__init__(f"{file}: {key}: {problem}. Fix: {fix}")


# --- the roster -------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Backend:
    """A named OpenAI-compatible server."""

    name: str
    base_url: str  # ends in /v1 (or wherever chat/completions lives), no trailing slash
    api_key_env: str | None = None
    api_key: str | None = field(default=None, repr=False)
    max_concurrency: int = 4
    connect_timeout_s: float = 5.0
    first_token_timeout_s: float = 120.0
    total_timeout_s: float = 300.0
    max_retries: int = 2


@dataclass(frozen=True, slots=True)
class Fighter:
    name: str
    emoji: str
    role: str
    persona: str
    model: str
    backend: str
    temperature: float = 0.7
    max_tokens: int = 800
    colour: int = 0x5865F2
    timeout_s: float | None = None  # overrides the backend's total timeout for this fighter


@dataclass(frozen=True, slots=True)
class Synthesizer:
    name: str
    emoji: str
    model: str
    backend: str
    prompt: str
    fallback_model: str | None = None
    fallback_backend: str | None = None
    temperature: float = 0.4
    max_tokens: int = 1200
    colour: int = 0xF1C40F
    timeout_s: float | None = None


@dataclass(frozen=True, slots=True)
class CouncilConfig:
    backends: Mapping[str, Backend]
    fighters: tuple[Fighter, ...]
    synthesizer: Synthesizer
    round_deadline_s: float = 240.0
    source: str = DEFAULT_COUNCIL_FILE

    def fighter(self, name: str) -> Fighter:
        for f in self.fighters:
            if f.name.lower() == name.lower():
                return f
        raise KeyError(name)


def _kind(value: Any) -> str:
    return type(value).__name__


class _Reader:
    """Typed access to one TOML table with errors that name the file and the full key."""

    def __init__(self, file: str, prefix: str, table: Any) -> None:
        if not isinstance(table, dict):
            raise ConfigError(
                file,
                prefix,
                f"expected a table, found {_kind(table)}",
                f"write it as [{prefix}] with key = value lines",
            )
        self.file, self.prefix, self.table = file, prefix, table

    def key(self, name: str) -> str:
        return f"{self.prefix}.{name}" if self.prefix else name

    def str(
        self, name: str, default: str | None = None, *, required: bool = False, allow_empty: bool = False
    ) -> str | None:
        if name not in self.table:
            if required:
                raise ConfigError(self.file, self.key(name), "is missing", f'add {name} = "…" to [{self.prefix}]')
            return default
        value = self.table[name]
        if not isinstance(value, str):
            raise ConfigError(
                self.file, self.key(name), f"expected text, found {_kind(value)}", f'quote it: {name} = "{value}"'
            )
        value = value.strip()
        if not value and not allow_empty:
            raise ConfigError(self.file, self.key(name), "is empty", f"give {name} a value")
        return value

    def num(self, name: str, default: float, lo: float, hi: float, *, integer: bool = False) -> Any:
        if name not in self.table:
            return default
        value = self.table[name]
        ok_type = isinstance(value, int) if integer else isinstance(value, int | float)
        if isinstance(value, bool) or not ok_type:
            what = "a whole number" if integer else "a number"
            raise ConfigError(
                self.file,
                self.key(name),
                f"expected {what}, found {value!r}",
                f"write {name} = {int(default) if integer else default}",
            )
        if not lo <= value <= hi:
            raise ConfigError(
                self.file, self.key(name), f"{value} is out of range", f"use a value between {lo:g} and {hi:g}"
            )
        return int(value) if integer else float(value)


def _check_url(file: str, key: str, url: str) -> str:
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ConfigError(file, key, f"{url!r} is not an http(s) URL", 'write it like "http://localhost:1234/v1"')
    if parts.username or parts.password:
        # It would be shown in /health, errors and logs; keys belong in .env, sent as a Bearer token.
        raise ConfigError(
            file,
            key,
            "contains a user name or password",
            "remove it from the URL; put the key in .env and name it with api_key_env",
        )
    try:
        parts.port  # noqa: B018 - raises on a malformed port
    except ValueError:
        raise ConfigError(
            file, key, f"{url!r} has a malformed port", 'write it like "http://localhost:1234/v1"'
        ) from None
    return url.rstrip("/")


def _colour(file: str, key: str, value: Any, default: int) -> int:
    if value is None:
        return default
    if isinstance(value, int) and not isinstance(value, bool) and 0 <= value <= 0xFFFFFF:
        return value
    if isinstance(value, str) and re.fullmatch(r"#?[0-9A-Fa-f]{6}", value.strip()):
        return int(value.strip().lstrip("#"), 16)
    raise ConfigError(file, key, f"{value!r} is not a colour", 'write it like colour = "#FF8C00"')


def _check_name(file: str, key: str, name: str) -> str:
    if not NAME_RE.match(name):
        raise ConfigError(
            file,
            key,
            f"{name!r} is not a usable name",
            "use 1–32 letters, digits, spaces, '-' or '_', starting with a letter or digit",
        )
    return name


def parse_council(
    text: str, *, file: str = DEFAULT_COUNCIL_FILE, env: Mapping[str, str] | None = None
) -> CouncilConfig:
    """Parse and validate a roster. ``env`` supplies API keys and the LLM_BASE_URL/LLM_MODEL overrides."""
    env = os.environ if env is None else env
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(
            file,
            "(syntax)",
            f"not valid TOML ({exc})",
            "correct the line it names; strings need quotes, tables need [brackets]",
        ) from None

    council = _Reader(file, "council", data.get("council", {}))
    deadline = council.num("round_deadline_s", 240.0, 1, 3600)

    raw_backends = data.get("backends")
    if not isinstance(raw_backends, dict) or not raw_backends:
        raise ConfigError(
            file,
            "backends",
            "no backend is defined",
            'add a [backends.local] table with base_url = "http://localhost:1234/v1"',
        )
    override_url = (env.get("LLM_BASE_URL") or "").strip()
    if override_url:
        override_url = _check_url("environment", "LLM_BASE_URL", override_url)
    backends: dict[str, Backend] = {}
    for bname, table in raw_backends.items():
        r = _Reader(file, f"backends.{bname}", table)
        _check_name(file, r.prefix, bname)
        url = override_url or _check_url(file, r.key("base_url"), r.str("base_url", required=True))
        key_env = r.str("api_key_env")
        api_key = None
        if key_env:
            if not ENV_NAME_RE.match(key_env):
                raise ConfigError(
                    file,
                    r.key("api_key_env"),
                    f"{key_env!r} is not an environment variable name",
                    'name the variable that holds the key, e.g. api_key_env = "OPENAI_API_KEY"',
                )
            api_key = (env.get(key_env) or "").strip()
            if not api_key:
                raise ConfigError(
                    file,
                    r.key("api_key_env"),
                    f"environment variable {key_env} is not set",
                    f"put {key_env}=<your key> in .env, or remove api_key_env if the server needs no key",
                )
        backends[bname] = Backend(
            name=bname,
            base_url=url,
            api_key_env=key_env,
            api_key=api_key,
            max_concurrency=r.num("max_concurrency", 4, 1, 256, integer=True),
            connect_timeout_s=r.num("connect_timeout_s", 5.0, 0.01, 600),
            first_token_timeout_s=r.num("first_token_timeout_s", 120.0, 0.01, 3600),
            total_timeout_s=r.num("total_timeout_s", 300.0, 0.01, 3600),
            max_retries=r.num("max_retries", 2, 0, 10, integer=True),
        )

    def backend_of(r: _Reader) -> str:
        name = r.str("backend")
        if name is None:
            if len(backends) == 1:
                return next(iter(backends))
            raise ConfigError(
                file,
                r.key("backend"),
                "is missing and there are several backends",
                f"set backend to one of: {', '.join(backends)}",
            )
        if name not in backends:
            raise ConfigError(
                file,
                r.key("backend"),
                f"unknown backend {name!r}",
                f"use one of: {', '.join(backends)}, or add a [backends.{name}] table",
            )
        return name

    override_model = (env.get("LLM_MODEL") or "").strip()

    raw_fighters = data.get("fighters")
    if not isinstance(raw_fighters, list) or not raw_fighters:
        raise ConfigError(
            file, "fighters", "the roster is empty", "add at least one [[fighters]] table with name, model and persona"
        )
    fighters: list[Fighter] = []
    seen: set[str] = set()
    for i, table in enumerate(raw_fighters):
        r = _Reader(file, f"fighters[{i}]", table)
        name = _check_name(file, r.key("name"), r.str("name", required=True))
        if name.upper() in seen:
            raise ConfigError(
                file, r.key("name"), f"duplicate fighter name {name!r}", "give every fighter a different name"
            )
        seen.add(name.upper())
        fighters.append(
            Fighter(
                name=name,
                emoji=r.str("emoji", "🥋"),
                role=r.str("role", "Fighter"),
                persona=r.str("persona", required=True),
                model=override_model or r.str("model", required=True),
                backend=backend_of(r),
                temperature=r.num("temperature", 0.7, 0.0, 2.0),
                max_tokens=r.num("max_tokens", 800, 1, 200_000, integer=True),
                colour=_colour(file, r.key("colour"), r.table.get("colour"), 0x5865F2),
                timeout_s=r.num("timeout_s", None, 0.01, 3600) if "timeout_s" in r.table else None,
            )
        )

    r = _Reader(file, "synthesizer", data.get("synthesizer"))
    sname = _check_name(file, r.key("name"), r.str("name", "SHENRON"))
    if sname.upper() in seen:
        raise ConfigError(
            file, r.key("name"), f"{sname!r} is also a fighter's name", "give the synthesizer a name no fighter uses"
        )
    fallback_backend = r.str("fallback_backend")
    if fallback_backend is not None and fallback_backend not in backends:
        raise ConfigError(
            file,
            r.key("fallback_backend"),
            f"unknown backend {fallback_backend!r}",
            f"use one of: {', '.join(backends)}",
        )
    synth = Synthesizer(
        name=sname,
        emoji=r.str("emoji", "🐉"),
        model=override_model or r.str("model", required=True),
        backend=backend_of(r),
        prompt=r.str("prompt", required=True),
        # LLM_MODEL replaces the fallback too (when there is one): the server has that one model.
        fallback_model=override_model if override_model and "fallback_model" in r.table else r.str("fallback_model"),
        fallback_backend=fallback_backend,
        temperature=r.num("temperature", 0.4, 0.0, 2.0),
        max_tokens=r.num("max_tokens", 1200, 1, 200_000, integer=True),
        colour=_colour(file, r.key("colour"), r.table.get("colour"), 0xF1C40F),
        timeout_s=r.num("timeout_s", None, 0.01, 3600) if "timeout_s" in r.table else None,
    )
    unknown = set(data) - {"council", "backends", "fighters", "synthesizer"}
    if unknown:
        key = sorted(unknown)[0]
        raise ConfigError(
            file, key, "is not a known section", "use [council], [backends.NAME], [[fighters]] and [synthesizer]"
        )
    return CouncilConfig(
        backends=backends, fighters=tuple(fighters), synthesizer=synth, round_deadline_s=deadline, source=file
    )


def load_council(path: str | os.PathLike[str], env: Mapping[str, str] | None = None) -> CouncilConfig:
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(
            str(p),
            "(file)",
            "does not exist",
            "copy the council.toml from the repository, or set SHENRON_COUNCIL to your roster file",
        ) from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(str(p), "(file)", f"cannot be read ({exc})", "check the path and its permissions") from None
    return parse_council(text, file=str(p), env=env)


def with_fighters(council: CouncilConfig, names: list[str]) -> CouncilConfig:
    """A copy of the council with only the named fighters (case-insensitive), in roster order."""
    wanted = {n.strip().upper() for n in names if n.strip()}
    known = {f.name.upper() for f in council.fighters}
    unknown = sorted(wanted - known)
    if unknown:
        raise ConfigError(
            council.source,
            "fighters",
            f"no fighter named {', '.join(unknown)}",
            f"choose from: {', '.join(f.name for f in council.fighters)}",
        )
    return replace(council, fighters=tuple(f for f in council.fighters if f.name.upper() in wanted))


# --- deployment settings (.env) ---------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Settings:
    """Everything that comes from the environment. Secrets never appear in repr()."""

    council_path: Path = Path(DEFAULT_COUNCIL_FILE)
    log_level: str = "INFO"
    # Discord
    discord_token: str | None = field(default=None, repr=False)
    dev_guild_id: int | None = None
    allowed_guild_ids: frozenset[int] = frozenset()
    allowed_channel_ids: frozenset[int] = frozenset()
    allowed_role_ids: frozenset[int] = frozenset()
    max_concurrent_councils: int = 4
    user_cooldown_s: float = 0.0
    edit_interval_s: float = 1.0
    # knowledge base
    kb_enabled: bool = True
    chroma_path: Path = Path("data/chroma")
    chroma_url: str | None = None
    kb_collection: str = "shenron"
    kb_embedder: str = "local"
    kb_top_k: int = 3
    kb_min_score: float = 0.35
    # monitoring
    health_port: int | None = None
    health_host: str = "127.0.0.1"

    def secrets(self) -> list[str]:
        return [s for s in (self.discord_token,) if s]


def _env_int(env: Mapping[str, str], key: str, default: int | None, lo: int, hi: int) -> int | None:
    raw = (env.get(key) or "").strip()
    if not raw:
        return default
    try:
        value = int(raw)
    except ValueError:
        raise ConfigError(
            ".env", key, f"{raw!r} is not a whole number", f"set {key} to a number, or remove it"
        ) from None
    if not lo <= value <= hi:
        raise ConfigError(".env", key, f"{value} is out of range", f"use a value between {lo} and {hi}")
    return value


def _env_float(env: Mapping[str, str], key: str, default: float, lo: float, hi: float) -> float:
    raw = (env.get(key) or "").strip()
    if not raw:
        return default
    try:
        value = float(raw)
    except ValueError:
        raise ConfigError(".env", key, f"{raw!r} is not a number", f"set {key} to a number, or remove it") from None
    if not lo <= value <= hi:
        raise ConfigError(".env", key, f"{value:g} is out of range", f"use a value between {lo:g} and {hi:g}")
    return value


def _env_ids(env: Mapping[str, str], key: str) -> frozenset[int]:
    raw = (env.get(key) or "").strip()
    ids: set[int] = set()
    for part in filter(None, (p.strip() for p in raw.replace(";", ",").split(","))):
        if not part.isdigit():
            raise ConfigError(
                ".env",
                key,
                f"{part!r} is not a Discord ID",
                "list numeric IDs separated by commas (Developer Mode → right-click → Copy ID)",
            )
        ids.add(int(part))
    return frozenset(ids)


def _env_bool(env: Mapping[str, str], key: str, default: bool) -> bool:
    raw = (env.get(key) or "").strip().lower()
    if not raw:
        return default
    if raw in ("1", "true", "yes", "on"):
        return True
    if raw in ("0", "false", "no", "off"):
        return False
    raise ConfigError(".env", key, f"{raw!r} is not true or false", f"set {key}=true or {key}=false")


def load_settings(env: Mapping[str, str] | None = None) -> Settings:
    """Read settings from ``env`` (default: os.environ, after the CLI has loaded .env)."""
    env = os.environ if env is None else env
    level = (env.get("LOG_LEVEL") or "INFO").strip().upper()
    if level not in ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"):
        raise ConfigError(".env", "LOG_LEVEL", f"{level!r} is not a log level", "use DEBUG, INFO, WARNING or ERROR")
    chroma_url = (env.get("CHROMA_URL") or "").strip() or None
    if chroma_url:
        chroma_url = _check_url(".env", "CHROMA_URL", chroma_url)
    collection = (env.get("KB_COLLECTION") or "shenron").strip()
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]{1,510}[A-Za-z0-9]", collection):
        raise ConfigError(
            ".env",
            "KB_COLLECTION",
            f"{collection!r} is not a valid collection name",
            "use 3–512 letters, digits, '.', '_' or '-', starting and ending with a letter or digit",
        )
    token = (env.get("DISCORD_TOKEN") or "").strip() or None
    return Settings(
        council_path=Path((env.get("SHENRON_COUNCIL") or DEFAULT_COUNCIL_FILE).strip()),
        log_level=level,
        discord_token=token,
        dev_guild_id=_env_int(env, "DEV_GUILD_ID", None, 1, 2**64 - 1),
        allowed_guild_ids=_env_ids(env, "ALLOWED_GUILD_IDS"),
        allowed_channel_ids=_env_ids(env, "ALLOWED_CHANNEL_IDS"),
        allowed_role_ids=_env_ids(env, "ALLOWED_ROLE_IDS"),
        max_concurrent_councils=_env_int(env, "MAX_CONCURRENT_COUNCILS", 4, 1, 1000),
        user_cooldown_s=_env_float(env, "USER_COOLDOWN_S", 0.0, 0.0, 86400.0),
        edit_interval_s=_env_float(env, "EDIT_INTERVAL_S", 1.0, 0.05, 60.0),
        kb_enabled=_env_bool(env, "KB_ENABLED", True),
        chroma_path=Path((env.get("CHROMA_PATH") or "data/chroma").strip()),
        chroma_url=chroma_url,
        kb_collection=collection,
        kb_embedder=(env.get("KB_EMBEDDER") or "local").strip(),
        kb_top_k=_env_int(env, "KB_TOP_K", 3, 1, 50),
        kb_min_score=_env_float(env, "KB_MIN_SCORE", 0.35, 0.0, 1.0),
        health_port=_env_int(env, "HEALTH_PORT", None, 1, 65535),
        health_host=(env.get("HEALTH_HOST") or "127.0.0.1").strip(),
    )
