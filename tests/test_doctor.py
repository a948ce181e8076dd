"""`shenron doctor`: each check against real (fake) servers, the verdicts end to end, exit codes, no secrets."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import types
from dataclasses import dataclass
from pathlib import Path

import pytest
from aiohttp import web

from bot.config import Settings
from bot.doctor import (
    Check,
    Redactor,
    _Printer,
    check_discord_online,
    check_discord_token,
    check_env_file,
    exit_code,
    run_doctor,
)
from bot.llm import make_session
from tests.fakeserver import FakeLLM, FakeLLMThread, Script

REPO = Path(__file__).resolve().parent.parent
MODEL = "qwen2.5-7b-instruct"  # every fighter's model in the repository's council.toml
PROBE_SCRIPT = Script(text="one two three four five six seven eight", token_interval=0.025)
# Shaped like a bot token (base64 of a snowflake, a timestamp, an HMAC); not a real one.
TOKEN = "MTIzNDU2Nzg5MDEyMzQ1Njc4.GAbCdE.Zk9vQmFyQmF6X3NlY3JldF9obWFjX3BhcnQ"
API_KEY = "sk-test-4f9c2e7b1d"


def write_council(
    path: Path, url: str, *, models: tuple[str, ...] = ("m",), max_concurrency: int = 4, api_key_env: str | None = None
) -> Path:
    key = f'api_key_env = "{api_key_env}"\n' if api_key_env else ""
    fighters = "".join(
        f'[[fighters]]\nname = "{name}"\nmodel = "{model}"\npersona = "You are {name}."\n\n'
        for name, model in zip(("GOKU", "VEGETA", "PICCOLO", "GOHAN"), models * 4, strict=False)
    )
    path.write_text(
        f'[backends.local]\nbase_url = "{url}"\nmax_concurrency = {max_concurrency}\n{key}\n{fighters}'
        f'[synthesizer]\nmodel = "{models[0]}"\nprompt = "Synthesise."\n',
        encoding="utf-8",
    )
    return path


def settings_for(council: Path, **kw: object) -> Settings:
    base: dict[str, object] = {"council_path": council, "kb_enabled": False, "discord_token": TOKEN}
    base.update(kw)
    return Settings(**base)  # type: ignore[arg-type]


async def doctor(settings: Settings, env: dict[str, str] | None = None, **kw: object) -> tuple[list[Check], str]:
    lines: list[str] = []
    checks = await run_doctor(
        env_file=None, settings=settings, env=env or {}, emit=lambda c: lines.append(c.line()), **kw
    )  # type: ignore[arg-type]
    return checks, "\n".join(lines)


def named(checks: list[Check], name: str) -> Check:
    return next(c for c in checks if c.name == name)


# --- in process, against the fake server ---------------------------------------------------------


async def test_all_good_against_a_server_that_runs_four_at_once(tmp_path: Path) -> None:
    async with FakeLLM(max_parallel=4, models=["m"], default=PROBE_SCRIPT) as fake:
        checks, out = await doctor(settings_for(write_council(tmp_path / "c.toml", fake.url)))
    assert [c.status for c in checks] == ["ok", "ok", "ok", "ok", "ok", "skip", "ok"], out
    assert exit_code(checks) == 0
    assert named(checks, "backend local parallelism").detail.startswith("serves 4 at once")
    assert "max_concurrency = 4 matches" in out
    assert "✓ backend local models: serves every roster model (m)" in out


async def test_refused_connection_is_an_error_with_the_fix(tmp_path: Path) -> None:
    async with FakeLLM() as fake:
        url = fake.url  # closed again: nothing listens there now
    checks, out = await doctor(settings_for(write_council(tmp_path / "c.toml", url)))
    check = named(checks, "backend local")
    assert check.status == "error" and "refused the connection" in check.detail
    assert "base_url in [backends.local]" in check.fix and "LLM_BASE_URL" in check.fix
    assert not any(c.name.startswith("backend local ") for c in checks)  # nothing more to check there
    assert exit_code(checks) == 2 and out.count("✗") == 1


async def test_missing_model_names_the_fighters_and_what_is_served(tmp_path: Path) -> None:
    async with FakeLLM(models=["m", "other"], default=PROBE_SCRIPT) as fake:
        council = write_council(tmp_path / "c.toml", fake.url, models=("m", "ghost"))
        checks, _ = await doctor(settings_for(council))
        chats = [r.model for r in fake.requests if r.path.endswith("/chat/completions")]
    check = named(checks, "backend local models")
    assert check.status == "error"
    assert "VEGETA, GOHAN use 'ghost'" in check.detail and "it serves: m, other" in check.detail
    assert "ollama pull" in check.fix and check.data["missing"] == ["VEGETA", "GOHAN"]
    assert "ghost" not in chats  # the probe only asks for models the server has
    assert exit_code(checks) == 2


async def test_wrong_api_key_names_the_variable_and_never_prints_the_key(tmp_path: Path) -> None:
    async with FakeLLM(api_key="the-right-key-123", default=PROBE_SCRIPT) as fake:
        council = write_council(tmp_path / "c.toml", fake.url, api_key_env="SHENRON_TEST_KEY")
        checks, out = await doctor(settings_for(council), env={"SHENRON_TEST_KEY": API_KEY})
    check = named(checks, "backend local API key")
    assert check.status == "error" and "401" in check.detail and "SHENRON_TEST_KEY" in check.fix
    assert exit_code(checks) == 2
    assert API_KEY not in out and TOKEN not in out


async def test_accepted_key_and_a_server_that_echoes_secrets_are_scrubbed(tmp_path: Path) -> None:
    # /models works; chat answers 401 quoting the key back, as some hosted APIs do.
    echo = Script(status=401, error_message=f"Incorrect API key provided: {API_KEY}; token {TOKEN}")
    async with FakeLLM(models=["m"], default=echo) as fake:
        council = write_council(tmp_path / "c.toml", fake.url, api_key_env="SHENRON_TEST_KEY")
        checks, out = await doctor(settings_for(council), env={"SHENRON_TEST_KEY": API_KEY})
    assert named(checks, "backend local API key").status == "ok"
    probe = named(checks, "backend local parallelism")
    assert probe.status == "error" and "[secret]" in probe.detail
    dumped = json.dumps([c.to_dict() for c in checks])
    assert API_KEY not in out and TOKEN not in out and API_KEY not in dumped and TOKEN not in dumped


async def test_missing_key_variable_is_a_configuration_error(tmp_path: Path) -> None:
    council = write_council(tmp_path / "c.toml", "http://127.0.0.1:9/v1", api_key_env="SHENRON_TEST_KEY")
    checks, _ = await doctor(settings_for(council))
    check = named(checks, str(council))
    assert check.status == "error" and "SHENRON_TEST_KEY is not set" in check.detail
    assert "SHENRON_TEST_KEY=<your key>" in check.fix
    assert named(checks, "backends").status == "skip"
    assert named(checks, "Discord token").status == "ok"  # the rest still runs
    assert exit_code(checks) == 2


async def test_skip_probe_and_a_serial_server(tmp_path: Path) -> None:
    async with FakeLLM(max_parallel=1, models=["m"], default=PROBE_SCRIPT) as fake:
        council = write_council(tmp_path / "c.toml", fake.url)
        skipped, _ = await doctor(settings_for(council), probe=False)
        assert not any(r.path.endswith("/chat/completions") for r in fake.requests)
        probed, _ = await doctor(settings_for(council))
    assert named(skipped, "backend local parallelism").status == "skip" and exit_code(skipped) == 0
    serial = named(probed, "backend local parallelism")
    assert serial.status == "warn" and serial.detail.startswith("serves one at a time")
    assert "OLLAMA_NUM_PARALLEL" in serial.fix and "max_concurrency = 1" in serial.fix
    assert serial.data["at_once"] == 1 and exit_code(probed) == 1


# --- files, tokens, Discord, knowledge base ------------------------------------------------------


def test_env_file_permissions(tmp_path: Path) -> None:
    env = tmp_path / ".env"
    env.write_text("DISCORD_TOKEN=x\n")
    env.chmod(0o644)
    loose = check_env_file(env, ".env")
    assert loose.status == "warn" and loose.fix == "chmod 600 .env" and "group and others" in loose.detail
    env.chmod(0o600)
    assert check_env_file(env, ".env").status == "ok"
    assert check_env_file(tmp_path / "nope.env").status == "skip"


@pytest.mark.parametrize(
    ("token", "status", "words"),
    [
        (None, "warn", "not set"),
        (f"Bot {TOKEN}", "error", "starts with 'Bot '"),
        (f'"{TOKEN}"', "error", "quotes"),
        ("123456789012345678", "error", "application or user ID"),
        ("a" * 32, "error", "client secret"),
        ("abc.def", "error", "2 dot-separated parts"),
        ("MTIz+NDU2.GAbCdE.abcdefghijklmnopqrstuvwxyz", "error", "never contains"),
        ("MTIz.GA.abc", "error", "too short"),
        ("bm90LWEtbnVtYmVyLWF0LWFsbA.GAbCdE.abcdefghijklmnopqrstuvwxyz", "warn", "does not decode"),
        (TOKEN, "ok", "bot with ID 123456789012345678"),
    ],
    ids=["unset", "bot-prefix", "quotes", "id", "client-secret", "two-parts", "bad-chars", "short", "no-id", "ok"],
)
def test_discord_token_shape(token: str | None, status: str, words: str) -> None:
    check = check_discord_token(token)
    assert check.status == status and words in check.detail, check.line()
    if token:
        assert token not in check.line()


@pytest.fixture
async def discord_api():
    """A stand-in for https://discord.com/api/v10 that knows one token."""

    async def me(request: web.Request) -> web.Response:
        if request.headers.get("Authorization") != f"Bot {TOKEN}":
            return web.json_response({"message": "401: Unauthorized", "code": 0}, status=401)
        return web.json_response({"id": "123456789012345678", "username": "shenron-test"})

    app = web.Application()
    app.router.add_get("/api/v10/users/@me", me)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    yield f"http://127.0.0.1:{runner.addresses[0][1]}/api/v10"
    await runner.cleanup()


async def test_online_token_check(discord_api: str) -> None:
    async with make_session() as session:
        good = await check_discord_online(session, TOKEN, api_base=discord_api)
        bad = await check_discord_online(session, TOKEN[:-4] + "AAAA", api_base=discord_api)
        offline = await check_discord_online(session, TOKEN, api_base="http://127.0.0.1:9/api/v10", timeout_s=2)
    assert good.status == "ok" and "shenron-test" in good.detail
    assert bad.status == "error" and "rejected" in bad.detail and "Reset Token" in bad.fix
    assert offline.status == "warn" and "could not reach" in offline.detail


async def test_online_flag_runs_the_login_check_last(tmp_path: Path, discord_api: str) -> None:
    council = write_council(tmp_path / "c.toml", "http://127.0.0.1:9/v1")
    checks, out = await doctor(settings_for(council), probe=False, online=True, discord_api=discord_api)
    assert checks[-1].name == "Discord login" and checks[-1].status == "ok"
    assert "(not checked with Discord" not in out and TOKEN not in out


@dataclass(frozen=True)
class FakeStats:
    collection: str
    chunks: int
    embedder: str
    mode: str
    location: str


def fake_kb_module(*, fail: Exception | None = None, chunks: int = 42) -> types.ModuleType:
    module = types.ModuleType("bot.knowledge")

    class KnowledgeBase:
        closed = 0

        @classmethod
        async def open(cls, settings, session=None, backends=None):
            if fail is not None:
                raise fail
            return cls()

        async def stats(self) -> FakeStats:
            return FakeStats("shenron", chunks, "local:minilm", "embedded", "data/chroma")

        async def close(self) -> None:
            type(self).closed += 1

    module.KnowledgeBase = KnowledgeBase  # type: ignore[attr-defined]
    return module


async def kb_check(tmp_path: Path, **settings_kw: object) -> Check:
    council = write_council(tmp_path / "c.toml", "http://127.0.0.1:9/v1")
    settings = settings_for(council, **{"kb_enabled": True, "chroma_path": tmp_path, **settings_kw})
    checks, _ = await doctor(settings, probe=False)
    return named(checks, "knowledge base")


async def test_knowledge_base_lines(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    module = fake_kb_module()
    monkeypatch.setitem(sys.modules, "bot.knowledge", module)
    ok = await kb_check(tmp_path)
    assert ok.status == "ok" and ok.detail == "collection shenron, 42 chunks, embedder local:minilm, at data/chroma"
    assert module.KnowledgeBase.closed == 1

    monkeypatch.setitem(sys.modules, "bot.knowledge", fake_kb_module(chunks=0))
    assert "empty: add documents with shenron kb add PATH" in (await kb_check(tmp_path)).detail

    monkeypatch.setitem(sys.modules, "bot.knowledge", fake_kb_module(fail=RuntimeError("Chroma is on strike")))
    broken = await kb_check(tmp_path)
    assert broken.status == "warn" and "Chroma is on strike" in broken.detail and "KB_ENABLED=false" in broken.fix

    assert (await kb_check(tmp_path, chroma_path=tmp_path / "never")).status == "skip"  # nothing added yet

    monkeypatch.setitem(sys.modules, "bot.knowledge", None)  # the package is not there at all
    missing = await kb_check(tmp_path)
    assert missing.status == "skip" and "not part of this build" in missing.detail


def test_exit_codes_redactor_and_plain_printer() -> None:
    assert exit_code([Check("a", "ok", ""), Check("b", "skip", "")]) == 0
    assert exit_code([Check("a", "ok", ""), Check("b", "warn", "")]) == 1
    assert exit_code([Check("a", "warn", ""), Check("b", "error", "")]) == 2
    r = Redactor([API_KEY, None, "abc"])  # too short to scrub safely: ignored
    assert r.text(f"key {API_KEY}!") == "key [secret]!" and r.data({"k": [API_KEY]}) == {"k": ["[secret]"]}
    out = io.StringIO()
    printer = _Printer(out)
    printer(Check(".env", "warn", "is open to others (mode 644)", "chmod 600 .env"))
    printer.summary([Check(".env", "warn", "")])
    assert out.getvalue() == "⚠ .env: is open to others (mode 644). Fix: chmod 600 .env\n0 ok, 1 warning, 0 errors\n"


# --- end to end: `python -m bot doctor` ----------------------------------------------------------


def shenron(*args: str, env: dict[str, str], cwd: Path) -> subprocess.CompletedProcess[str]:
    full_env = {k: v for k, v in os.environ.items() if not k.startswith(("LLM_", "SHENRON_", "KB_", "DISCORD_"))}
    full_env.update(env, PYTHONPATH=str(REPO), KB_ENABLED="false")
    return subprocess.run(
        [sys.executable, "-m", "bot", "doctor", *args],
        capture_output=True,
        text=True,
        env=full_env,
        cwd=cwd,
        timeout=60,
    )


@pytest.mark.parametrize("max_parallel", [1, 4])
def test_doctor_command_both_verdicts(max_parallel: int, tmp_path: Path) -> None:
    with FakeLLMThread(max_parallel=max_parallel, models=[MODEL], default=PROBE_SCRIPT) as fake:
        env = {"LLM_BASE_URL": fake.url, "SHENRON_COUNCIL": str(REPO / "council.toml"), "DISCORD_TOKEN": TOKEN}
        proc = shenron(env=env, cwd=tmp_path)
    out = proc.stdout
    assert "✓ backend local: reachable at " + fake.url in out
    assert f"✓ backend local models: serves every roster model ({MODEL})" in out
    if max_parallel == 4:
        assert proc.returncode == 0, out + proc.stderr
        assert "✓ backend local parallelism: serves 4 at once (6 requests sent together" in out
        assert "⚠" not in out and "✗" not in out
    else:
        assert proc.returncode == 1, out + proc.stderr
        assert "⚠ backend local parallelism: serves one at a time (6 requests sent together" in out
        assert "5 of 6 waited for another to finish" in out and "OLLAMA_NUM_PARALLEL" in out
    assert out.splitlines()[-1].endswith("0 errors")
    assert TOKEN not in out + proc.stderr


def test_doctor_json_with_a_key_and_a_loose_env_file(tmp_path: Path) -> None:
    with FakeLLMThread(max_parallel=4, api_key=API_KEY, models=["m"], default=PROBE_SCRIPT) as fake:
        write_council(tmp_path / "council.toml", fake.url, api_key_env="SHENRON_TEST_KEY")
        env_file = tmp_path / ".env"
        env_file.write_text(f"DISCORD_TOKEN={TOKEN}\nSHENRON_TEST_KEY={API_KEY}\n")
        env_file.chmod(0o644)
        proc = shenron("--json", env={}, cwd=tmp_path)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    doc = json.loads(proc.stdout)
    assert doc["status"] == "warn" and doc["exit_code"] == 1
    checks = {c["name"]: c for c in doc["checks"]}
    assert checks[".env"]["status"] == "warn" and checks[".env"]["fix"] == "chmod 600 .env"
    assert checks["backend local API key"] == {
        "name": "backend local API key",
        "status": "ok",
        "detail": "accepted (SHENRON_TEST_KEY)",
        "fix": "",
        "data": {},
    }
    probe = checks["backend local parallelism"]
    assert probe["status"] == "ok" and probe["data"]["at_once"] == 4 and probe["data"]["requested"] == 4
    assert probe["data"]["matches_config"] is True and len(probe["data"]["rounds"][0]["requests"]) == 4
    assert API_KEY not in proc.stdout + proc.stderr and TOKEN not in proc.stdout + proc.stderr


def test_doctor_reports_a_broken_roster_instead_of_stopping(tmp_path: Path) -> None:
    (tmp_path / "council.toml").write_text("[[fighters]\n")
    proc = shenron(env={"DISCORD_TOKEN": TOKEN}, cwd=tmp_path)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert "✗ council.toml: (syntax): not valid TOML" in proc.stdout and "Fix: correct the line" in proc.stdout
    assert "– backends: not checked: fix council.toml first" in proc.stdout
    assert "✓ Discord token" in proc.stdout and proc.stderr == ""


async def test_settings_are_loaded_and_judged_when_the_cli_could_not(tmp_path: Path) -> None:
    checks = await run_doctor(env_file=None, settings=None, env={"LOG_LEVEL": "LOUD"}, probe=False)
    assert [(c.name, c.status) for c in checks] == [(".env", "error")]
    assert "LOG_LEVEL: 'LOUD' is not a log level" in checks[0].line()


async def test_a_crashing_backend_check_becomes_a_line(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    async def boom(*args: object, **kw: object) -> list[Check]:
        raise ValueError("unexpected")

    monkeypatch.setattr("bot.doctor.check_backend", boom)
    checks, out = await doctor(settings_for(write_council(tmp_path / "c.toml", "http://127.0.0.1:9/v1")))
    assert "✗ backend local: the check itself failed (ValueError: unexpected)" in out
    assert checks[-1].name == "Discord token"


def test_terminal_output_is_the_same_line_in_colour(monkeypatch: pytest.MonkeyPatch) -> None:
    import re

    class Terminal(io.StringIO):
        def isatty(self) -> bool:
            return True

    monkeypatch.setenv("TERM", "xterm-256color")
    monkeypatch.delenv("NO_COLOR", raising=False)
    out = Terminal()
    check = Check("backend [local]", "error", "refused [the] connection", "start it")
    _Printer(out)(check)
    assert re.sub(r"\x1b\[[0-9;]*m", "", out.getvalue()) == check.line() + "\n"
