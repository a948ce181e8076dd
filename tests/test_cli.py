"""`shenron ask` as a user runs it: a real process against the fake server."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.fakeserver import FakeLLMThread, Script

REPO = Path(__file__).resolve().parent.parent


def shenron(*args: str, env: dict[str, str], cwd: Path) -> subprocess.CompletedProcess[str]:
    full_env = {k: v for k, v in os.environ.items() if not k.startswith(("LLM_", "SHENRON_", "KB_", "DISCORD_"))}
    full_env.update(env)
    full_env["PYTHONPATH"] = str(REPO)
    return subprocess.run(
        [sys.executable, "-m", "bot", *args], capture_output=True, text=True, env=full_env, cwd=cwd, timeout=60
    )


@pytest.fixture(scope="module")
def fake():
    with FakeLLMThread(default=Script(text="An answer from the fake.")) as server:
        yield server


@pytest.fixture
def base_env(fake, tmp_path: Path) -> dict[str, str]:
    (tmp_path / ".env").write_text(f"LLM_BASE_URL={fake.url}\nKB_ENABLED=false\n")
    return {"SHENRON_COUNCIL": str(REPO / "council.toml")}


def test_ask_json_shows_six_answers_and_a_synthesis(base_env, tmp_path: Path) -> None:
    proc = shenron("ask", "Should I run ZFS or ext4?", "--json", env=base_env, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    doc = json.loads(proc.stdout)
    assert doc["question"] == "Should I run ZFS or ext4?"
    assert sorted(a["fighter"] for a in doc["answers"]) == sorted(
        ["GOKU", "VEGETA", "PICCOLO", "GOHAN", "KRILLIN", "FRIEZA"]
    )
    assert all(a["ok"] and a["text"] == "An answer from the fake." for a in doc["answers"])
    assert all(a["first_token_s"] is not None and a["tokens"] == 5 for a in doc["answers"])
    assert doc["synthesis"]["ok"] and doc["synthesis"]["text"] == "An answer from the fake."
    assert set(doc["stats"]) >= {"wall_s", "overlap", "first_answer_s"}


def test_ask_live_view_prints_answers_synthesis_figures_and_timeline(base_env, tmp_path: Path) -> None:
    proc = shenron("ask", "What", "now?", "--fighters", "goku,vegeta", env=base_env, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    assert "GOKU" in out and "VEGETA" in out and "PICCOLO" not in out
    assert "SHENRON" in out and "An answer from the fake." in out
    assert "2/2 answered" in out and "overlap" in out
    assert "█" in out and "waiting for the first token" in out


def test_failed_council_exits_1(tmp_path: Path) -> None:
    with FakeLLMThread(default=Script(status=500, error_message="GPU on fire")) as server:
        (tmp_path / ".env").write_text(f"LLM_BASE_URL={server.url}\nKB_ENABLED=false\n")
        proc = shenron("ask", "q", "--json", env={"SHENRON_COUNCIL": str(REPO / "council.toml")}, cwd=tmp_path)
    assert proc.returncode == 1
    doc = json.loads(proc.stdout)
    assert not doc["synthesis"]["ok"]
    assert all("GPU on fire" in a["error"] for a in doc["answers"])


@pytest.mark.parametrize(
    ("args", "files", "expected"),
    [
        (["ask", "q"], {"council.toml": "[[fighters]\n"}, "council.toml: (syntax): not valid TOML"),
        (["ask", "q", "--fighters", "BULMA"], {}, "no fighter named BULMA"),
        (["--env-file", "missing.env", "ask", "q"], {}, "missing.env: settings file not found"),
        (["ask", "   "], {}, "question: is empty"),
        (["ask", "q"], {".env": "LLM_BASE_URL=localhost\n"}, "LLM_BASE_URL: 'localhost' is not an http(s) URL"),
    ],
    ids=["toml", "unknown-fighter", "missing-env-file", "empty-question", "bad-url"],
)
def test_configuration_mistakes_exit_2_with_one_line(args, files, expected, tmp_path: Path) -> None:
    env = {"SHENRON_COUNCIL": "council.toml"}
    (tmp_path / "council.toml").write_text((REPO / "council.toml").read_text())
    for name, text in files.items():
        (tmp_path / name).write_text(text)
        (tmp_path / name).chmod(0o600)  # a .env others can read adds its own warning line
    proc = shenron(*args, env=env, cwd=tmp_path)
    assert proc.returncode == 2
    assert expected in proc.stderr
    assert "Traceback" not in proc.stderr
    assert proc.stderr.count("\n") == 1


def test_an_unreachable_knowledge_base_does_not_stop_the_council(fake, tmp_path: Path) -> None:
    import socket

    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    (tmp_path / ".env").write_text(f"LLM_BASE_URL={fake.url}\nCHROMA_URL=http://127.0.0.1:{port}\n")
    os.chmod(tmp_path / ".env", 0o600)
    proc = shenron(
        "ask", "q", "--json", "--fighters", "GOKU", env={"SHENRON_COUNCIL": str(REPO / "council.toml")}, cwd=tmp_path
    )
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["synthesis"]["ok"]
    assert "knowledge base unavailable, asking without it" in proc.stderr
    assert "Traceback" not in proc.stderr
