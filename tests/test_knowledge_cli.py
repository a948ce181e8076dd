"""`shenron kb …` through the real command line (bot.cli.main), against an embedded store in tmp_path."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from bot.cli import main
from tests.knowledge_corpus import write_corpus


@pytest.fixture
def workdir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A project folder without a .env, whose knowledge base lives in ./kb."""
    monkeypatch.chdir(tmp_path)
    for key in ("CHROMA_URL", "KB_EMBEDDER", "KB_COLLECTION", "KB_MIN_SCORE", "KB_TOP_K"):
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setenv("CHROMA_PATH", str(tmp_path / "kb"))
    monkeypatch.setenv("COLUMNS", "200")  # rich wraps tables at the terminal width
    write_corpus(tmp_path / "docs")
    return tmp_path


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = main(["kb", *argv])
    out, err = capsys.readouterr()
    return code, out, err


def test_add_reports_what_it_did_and_is_idempotent(workdir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (workdir / "docs" / "logo.png").write_bytes(b"\x89PNG")
    code, out, _ = run(capsys, "add", "docs", "missing.md")
    assert code == 0
    assert "added docs/runbook.md (3 chunks)" in " ".join(out.split())
    for line in (
        "files added │ 3",
        "files skipped │ 2",
        "chunks stored │ 5",
        "skipped because │ unsupported file type (.png) (1)",
        "skipped because │ does not exist (1)",
    ):
        assert line in " ".join(out.split()), line
    code, out, _ = run(capsys, "add", "docs/runbook.md")
    assert code == 0 and "files unchanged │ 1" in " ".join(out.split()) and "chunks stored │ 0" in " ".join(out.split())


def test_add_fails_when_nothing_could_be_stored(workdir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run(capsys, "add", "nothing-here")
    assert code == 1 and "does not exist" in out


def test_search_shows_passages_or_says_none_is_relevant(workdir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    run(capsys, "add", "docs")
    code, out, _ = run(capsys, "search", "How do I swap a dead drive in the storage array?", "--json")
    assert code == 0
    passages = json.loads(out)
    assert [(p["source"], p["heading"], p["label"]) for p in passages] == [
        ("docs/runbook.md", "RAID", "runbook.md › RAID")
    ]
    assert 0.35 <= passages[0]["score"] <= 1
    code, out, _ = run(capsys, "search", "How", "do", "I", "swap", "a", "dead", "drive?", "-k", "2")
    assert code == 0 and "runbook.md › RAID" in out and "mdadm" in out
    code, out, _ = run(capsys, "search", "What is the capital of Mongolia?")
    assert code == 0 and "No passage scores 0.35 or more" in out
    code, out, _ = run(capsys, "search", "What is the capital of Mongolia?", "--min-score", "0", "-k", "2", "--json")
    assert len(json.loads(out)) == 2


def test_list_stats_and_remove(workdir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run(capsys, "list")
    assert code == 0 and "The knowledge base is empty" in out
    run(capsys, "add", "docs")
    code, out, _ = run(capsys, "list", "--json")
    assert [(s["source"], s["chunks"]) for s in json.loads(out)] == [
        ("docs/garden.html", 1),
        ("docs/power.txt", 1),
        ("docs/runbook.md", 3),
    ]
    code, out, _ = run(capsys, "stats", "--json")
    stats = json.loads(out)
    assert (stats["chunks"], stats["documents"], stats["mode"], stats["collection"]) == (5, 3, "embedded", "shenron")
    assert stats["embedder"] == "local:all-MiniLM-L6-v2-onnx-int8" and stats["location"] == str(workdir / "kb")
    code, out, _ = run(capsys, "remove", "docs/runbook.md")
    assert code == 0 and "Removed docs/runbook.md (3 chunks)" in out
    code, _, err = run(capsys, "remove", "docs/runbook.md")
    assert code == 1 and "no document named 'docs/runbook.md'" in err and "shenron kb list" in err
    assert "Traceback" not in err


def test_mistakes_are_one_line_with_the_fix(
    workdir: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    run(capsys, "add", "docs/power.txt")
    monkeypatch.setenv("KB_EMBEDDER", "chroma")  # not the embedder the collection was built with
    code, out, err = run(capsys, "search", "power")
    assert code == 2 and out == ""
    [line] = err.strip().splitlines()
    assert "was built with embedder local:all-MiniLM-L6-v2-onnx-int8" in line and "shenron kb rebuild" in line
    monkeypatch.setenv("KB_EMBEDDER", "sentence-bert")
    code, _, err = run(capsys, "stats")
    assert code == 2 and "KB_EMBEDDER: 'sentence-bert' is not an embedder" in err
    monkeypatch.setenv("KB_EMBEDDER", "local")
    code, _, err = run(capsys, "search", "  ")
    assert code == 2 and "the query is empty" in err
