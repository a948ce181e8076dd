"""`shenron ask` in a terminal: a live table of fighters, answers as they land, the synthesis streamed."""

from __future__ import annotations

import json
import time
from collections.abc import AsyncIterator
from contextlib import aclosing
from dataclasses import dataclass
from typing import Any

from rich.console import Console, Group
from rich.live import Live
from rich.markdown import Markdown
from rich.panel import Panel
from rich.table import Table
from rich.text import Text

from bot.config import CouncilConfig
from bot.events import (
    CouncilFinished,
    CouncilResult,
    Event,
    FighterFailed,
    FighterFinished,
    FighterSent,
    FighterStarted,
    FighterToken,
    SynthesisFailed,
    SynthesisFinished,
    SynthesisStarted,
    SynthesisToken,
)
from bot.timeline import GEN, LEGEND, QUEUE, WAIT, serialised_hint, summary_line, timeline


@dataclass
class _Row:
    state: str = "waiting"
    started: float = 0.0
    seconds: float | None = None
    chars: int = 0
    tokens: int | None = None
    note: str = ""


STATE_STYLE = {
    "queued": ("🕒", "dim"),  # in SHENRON's own queue (the backend's max_concurrency)
    "waiting": ("⏳", "dim"),  # sent; waiting for the server's first token
    "thinking": ("💭", "yellow"),
    "done": ("✅", "green"),
    "failed": ("❌", "red"),
}


class TerminalView:
    """Consumes council events and draws them. One instance per round."""

    def __init__(self, console: Console, council: CouncilConfig, fighters: list[str]) -> None:
        self.console = console
        self.council = council
        self.rows = {name: _Row() for name in fighters}
        self.synthesis = ""
        self.synth_model = ""
        self.synth_state = "waiting"
        self.t0 = time.perf_counter()

    def _table(self) -> Table:
        table = Table(box=None, pad_edge=False, show_edge=False)
        table.add_column("fighter")
        table.add_column("state")
        table.add_column("time", justify="right")
        table.add_column("tokens", justify="right")
        now = time.perf_counter() - self.t0
        for name, row in self.rows.items():
            f = self.council.fighter(name)
            icon, style = STATE_STYLE[row.state]
            secs = row.seconds if row.seconds is not None else now
            toks = row.tokens if row.tokens is not None else (f"~{row.chars // 4}" if row.chars else "")
            table.add_row(
                f"{f.emoji} {f.name}",
                Text(f"{icon} {row.state} {row.note}".rstrip(), style=style),
                f"{secs:.1f} s",
                str(toks),
            )
        s = self.council.synthesizer
        icon, style = STATE_STYLE.get(self.synth_state, ("🐉", "cyan"))
        table.add_row(f"{s.emoji} {s.name}", Text(f"{icon} {self.synth_state}", style=style), "", "")
        return table

    def __rich__(self) -> Group:
        parts: list[Any] = [self._table()]
        if self.synthesis:
            parts.append(
                Panel(Markdown(self.synthesis), title=f"🐉 SHENRON · {self.synth_model}", border_style="yellow")
            )
        return Group(*parts)

    def handle(self, event: Event) -> None:
        c = self.console
        match event:
            case FighterStarted(fighter=name):
                self.rows[name].state = "queued"  # until the request leaves SHENRON's own queue
            case FighterSent(fighter=name):
                self.rows[name].state = "waiting"
            case FighterToken(fighter=name, text=text, reset=reset):
                row = self.rows[name]
                row.state = "thinking"
                row.chars = (0 if reset else row.chars) + len(text)
            case FighterFinished(answer=a):
                row = self.rows[a.fighter]
                row.state, row.seconds, row.tokens = "done", a.elapsed_s, a.tokens
                f = self.council.fighter(a.fighter)
                c.print(
                    Panel(
                        Markdown(a.text),
                        title=f"{f.emoji} {f.name} · {f.role}",
                        subtitle=f"{a.model} · {a.elapsed_s:.1f} s · {a.tokens} tokens",
                        border_style=f"#{f.colour:06x}",
                    )
                )
            case FighterFailed(answer=a):
                row = self.rows[a.fighter]
                row.state, row.seconds, row.note = "failed", a.elapsed_s, a.error_kind
                c.print(Text(f"❌ {a.fighter}: {a.error}", style="red"))
            case SynthesisStarted(model=model, fallback=fallback):
                self.synthesis, self.synth_model = "", model
                self.synth_state = "fallback" if fallback else "thinking"
            case SynthesisToken(text=text, reset=reset):
                self.synthesis = ("" if reset else self.synthesis) + text
            case SynthesisFinished():
                self.synth_state = "done"
            case SynthesisFailed(result=r, will_retry=retry):
                self.synth_state = "thinking" if retry else "failed"
                c.print(
                    Text(
                        f"❌ SHENRON ({r.model or 'synthesis'}): {r.error}"
                        + (" — trying the fallback" if retry else ""),
                        style="red",
                    )
                )
            case CouncilFinished():
                pass

    def final(self, result: CouncilResult) -> None:
        c = self.console
        s = result.synthesis
        if s.ok:
            c.print(
                Panel(
                    Markdown(s.text),
                    title=f"🐉 SHENRON · {s.model}" + (" (fallback)" if s.used_fallback else ""),
                    border_style="yellow",
                )
            )
        if result.context:
            c.print(Text("📚 " + " · ".join(dict.fromkeys(p.label for p in result.context)), style="cyan"))
        c.print(Text(summary_line(result), style="bold"))
        width = max(20, min(60, c.width - 30))
        rows = timeline(result, width)
        pad = max((len(r.name) for r in rows), default=0)
        for r in rows:
            bar = Text()
            for ch in r.bar.ljust(width):
                bar.append(
                    ch, style="grey50" if ch in (WAIT, QUEUE) else ("green" if r.ok else "red") if ch == GEN else ""
                )
            c.print(Text(r.name.ljust(pad) + " │"), bar, Text(f"│ {r.note}"), sep="")
        c.print(Text(LEGEND, style="dim"))
        hint = serialised_hint(result)
        if hint:
            c.print(Text(f"⚠ {hint}", style="yellow"))


async def render_live(
    events: AsyncIterator[Event], console: Console, council: CouncilConfig, fighters: list[str]
) -> CouncilResult | None:
    view = TerminalView(console, council, fighters)
    result: CouncilResult | None = None
    async with aclosing(events):  # type: ignore[type-var]
        if console.is_terminal:
            with Live(view, console=console, refresh_per_second=8, transient=True):
                async for event in events:
                    view.handle(event)
                    if isinstance(event, CouncilFinished):
                        result = event.result
        else:
            async for event in events:
                view.handle(event)
                if isinstance(event, CouncilFinished):
                    result = event.result
    if result is not None:
        view.final(result)
    return result


def result_json(result: CouncilResult) -> str:
    """The one JSON document `shenron ask --json` prints."""
    s = result.synthesis
    doc = {
        "question": result.question,
        "answers": [
            {
                "fighter": a.fighter,
                "model": a.model,
                "backend": a.backend,
                "ok": a.ok,
                "text": a.text,
                "error": a.error or None,
                "error_kind": a.error_kind or None,
                "elapsed_s": round(a.elapsed_s, 3),
                "sent_s": None if a.sent_s is None else round(a.sent_s, 3),
                "first_token_s": None if a.first_token_s is None else round(a.first_token_s, 3),
                "tokens": a.tokens,
            }
            for a in result.answers
        ],
        "synthesis": {
            "ok": s.ok,
            "text": s.text,
            "model": s.model or None,
            "error": s.error or None,
            "used_fallback": s.used_fallback,
            "tokens": s.tokens,
        },
        "sources": [{"source": p.source, "heading": p.heading, "score": round(p.score, 4)} for p in result.context],
        "stats": {
            "wall_s": round(result.stats.wall_s, 3),
            "overlap": round(result.stats.overlap, 3),
            "first_answer_s": None if result.stats.first_answer_s is None else round(result.stats.first_answer_s, 3),
            "model_time_s": round(result.stats.model_time_s, 3),
            "tokens": result.stats.tokens,
            "fighters_ok": result.stats.fighters_ok,
            "fighters_total": result.stats.fighters_total,
        },
    }
    return json.dumps(doc, ensure_ascii=False, indent=2)
