"""The round's timeline as text bars, shared by the terminal and Discord.

One bar per fighter on a shared time axis: waiting in SHENRON's own queue (the backend's
max_concurrency) as dots, waiting for the server's first token in a light shade, generating in a
solid one. Side-by-side fighters give stacked solid bars; a server that queues requests gives a
staircase of light shade.
"""

from __future__ import annotations

from dataclasses import dataclass

from bot.events import CouncilResult

QUEUE, WAIT, GEN, IDLE = "·", "░", "█", " "
LEGEND = f"{QUEUE} in SHENRON's queue  {WAIT} waiting for the first token  {GEN} generating"


@dataclass(frozen=True, slots=True)
class TimelineRow:
    name: str
    bar: str
    ok: bool
    note: str  # e.g. "8.2 s" or "failed"


def _bar(start: float, sent: float | None, first: float | None, end: float, scale: float, width: int) -> str:
    cells = []
    for i in range(width):
        t = (i + 0.5) * scale  # the middle of the cell
        if t < start or t > end:
            cells.append(IDLE)
        elif sent is not None and t < sent:
            cells.append(QUEUE)
        elif first is None or t < first:
            cells.append(WAIT)
        else:
            cells.append(GEN)
    bar = "".join(cells).rstrip()
    # Never let a short but real interval vanish: mark at least one cell.
    if not bar.strip() and end > start:
        col = min(width - 1, int(start / scale))
        bar = IDLE * col + (GEN if first is not None else WAIT)
    return bar


def timeline(result: CouncilResult, width: int = 40) -> list[TimelineRow]:
    """Rows for every fighter in roster-independent arrival order, then the synthesis."""
    wall = max(result.stats.wall_s, 1e-6)
    scale = wall / width
    rows = []
    for a in result.answers:
        rows.append(
            TimelineRow(
                name=a.fighter,
                bar=_bar(a.started_at, a.sent_s, a.first_token_s, a.elapsed_s, scale, width),
                ok=a.ok,
                note=f"{a.elapsed_s:.1f} s" if a.ok else (a.error_kind or "failed"),
            )
        )
    s = result.synthesis
    if s.model:
        start = max((a.elapsed_s for a in result.answers), default=0.0)  # it starts when the last fighter ends
        rows.append(
            TimelineRow(
                name="SHENRON",
                bar=_bar(start, None, s.first_token_s, s.elapsed_s, scale, width),
                ok=s.ok,
                note=f"{s.elapsed_s - start:.1f} s" if s.ok else "failed",
            )
        )
    return rows


def timeline_text(result: CouncilResult, width: int = 40) -> str:
    """The timeline as plain text lines, names padded to one column."""
    rows = timeline(result, width)
    pad = max((len(r.name) for r in rows), default=0)
    return "\n".join(f"{r.name.ljust(pad)} │{r.bar.ljust(width)}│ {r.note}" for r in rows)


def summary_line(result: CouncilResult) -> str:
    """`6/6 answered · 11.2 s wall · 58.3 s of model time · 5.2× overlap · 📚 3 sources`"""
    st = result.stats
    parts = [
        f"{st.fighters_ok}/{st.fighters_total} answered",
        f"{st.wall_s:.1f} s wall",
        f"{st.model_time_s:.1f} s of model time",
        f"{st.overlap:.1f}× overlap",
    ]
    if st.sources:
        parts.append(f"📚 {st.sources} source{'s' if st.sources != 1 else ''}")
    return " · ".join(parts)


def serialised_hint(result: CouncilResult) -> str | None:
    """A warning when the fighters plainly did not run side by side (the server queued them)."""
    st = result.stats
    # Only fighters whose generation took time say anything: a reply in one chunk has no interval.
    generating = sum(
        1
        for a in result.answers
        if a.first_token_s is not None and a.last_token_s is not None and a.last_token_s > a.first_token_s
    )
    if generating >= 3 and 0 < st.overlap < max(1.5, generating / 3):
        return (
            f"overlap {st.overlap:.1f}× for {generating} fighters: the backend seems to run requests one at "
            "a time — see /health or `shenron doctor`"
        )
    return None
