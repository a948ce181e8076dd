"""The council engine: one question to every fighter at once, then one synthesis.

``CouncilEngine.run`` is the only code path. It yields typed events (``bot.events``) that Discord,
the terminal and the benchmarks render; it never imports ``discord``. Closing the generator early
(``aclose()``) or cancelling its consumer cancels every fighter and releases their connections.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import aclosing
from dataclasses import dataclass, field, replace
from typing import Any

from bot.config import CouncilConfig, Fighter, with_fighters
from bot.events import (
    CouncilFinished,
    CouncilResult,
    CouncilStats,
    Event,
    FighterAnswer,
    FighterFailed,
    FighterFinished,
    FighterSent,
    FighterStarted,
    FighterToken,
    Passage,
    SynthesisFailed,
    SynthesisFinished,
    SynthesisResult,
    SynthesisStarted,
    SynthesisToken,
    Turn,
)
from bot.llm import Delta, LLMClient, LLMError
from bot.prompts import fighter_messages, synthesis_messages

log = logging.getLogger(__name__)

_ROUND_OVER: Any = object()  # put on the event queue when the round's deadline passes


def overlap(intervals: Sequence[tuple[float, float]]) -> float:
    """Sum of the intervals' lengths ÷ the length of their union.

    1.0 means the fighters generated one after another; n means n generated side by side the
    whole time. Intervals of zero length (a single chunk) add nothing. No generation at all: 0.0.
    """
    spans = sorted((a, b) for a, b in intervals if b > a)
    if not spans:
        return 0.0
    total = sum(b - a for a, b in spans)
    union = 0.0
    cur_a, cur_b = spans[0]
    for a, b in spans[1:]:
        if a > cur_b:
            union += cur_b - cur_a
            cur_a, cur_b = a, b
        else:
            cur_b = max(cur_b, b)
    union += cur_b - cur_a
    return total / union


@dataclass
class _Progress:
    """What a fighter (or the synthesizer) has produced so far; becomes a FighterAnswer at the end."""

    started_at: float
    sent_s: float | None = None
    text: list[str] = field(default_factory=list)
    reasoning: list[str] = field(default_factory=list)
    first_token_s: float | None = None
    last_token_s: float | None = None
    pieces: int = 0
    completion_tokens: int | None = None
    finish_reason: str | None = None

    @property
    def tokens(self) -> int:
        return self.completion_tokens if self.completion_tokens is not None else self.pieces


class CouncilEngine:
    """Runs council rounds for one roster over one LLM client."""

    def __init__(
        self, client: LLMClient, council: CouncilConfig, *, clock: Callable[[], float] = time.perf_counter
    ) -> None:
        self.client = client
        self.council = council
        self._clock = clock

    async def run(
        self,
        question: str,
        history: Sequence[Turn] = (),
        context: Sequence[Passage] = (),
        *,
        fighters: Sequence[str] | None = None,
    ) -> AsyncIterator[Event]:
        """Ask the council. Yields events; the last one is always ``CouncilFinished``."""
        roster = self._pick(fighters)
        t0 = self._clock()
        deadline_s = self.council.round_deadline_s
        queue: asyncio.Queue[Event] = asyncio.Queue()
        final: dict[str, FighterAnswer] = {}
        arrival: list[FighterAnswer] = []
        tasks = {
            f.name: asyncio.create_task(
                self._fighter(f, question, history, context, t0, deadline_s, queue), name=f"fighter-{f.name}"
            )
            for f in roster
        }
        loop = asyncio.get_running_loop()
        # A backstop: each fighter's own timeout is capped by the round, plus a grace for the cap to
        # fire. One timer for the round rather than a timeout around every queue read.
        backstop = loop.call_at(loop.time() + deadline_s + 1.0, queue.put_nowait, _ROUND_OVER)
        try:
            while len(final) < len(roster):
                event = await queue.get()
                if event is _ROUND_OVER:
                    for event in await self._abandon(roster, tasks, final, t0):
                        final[event.answer.fighter] = event.answer
                        arrival.append(event.answer)
                        yield event
                    break
                if isinstance(event, FighterFinished | FighterFailed):
                    final[event.answer.fighter] = event.answer
                    arrival.append(event.answer)
                yield event

            ok = [a for a in arrival if a.ok]
            missing = [a for a in arrival if not a.ok]
            synthesis = SynthesisResult(ok=False, error="no fighter answered, so there is nothing to synthesise")
            if ok:
                async with aclosing(self._synthesise(question, history, context, ok, missing, t0)) as stream:
                    async for event in stream:
                        if isinstance(event, SynthesisFinished):
                            synthesis = event.result
                        elif isinstance(event, SynthesisFailed) and not event.will_retry:
                            synthesis = event.result
                        yield event
            else:
                yield SynthesisFailed(result=synthesis)
            wall = self._clock() - t0
            intervals = [
                (a.first_token_s, a.last_token_s)
                for a in arrival
                if a.first_token_s is not None and a.last_token_s is not None
            ]
            stats = CouncilStats(
                wall_s=wall,
                fighters_total=len(roster),
                fighters_ok=len(ok),
                first_answer_s=min((a.elapsed_s for a in ok), default=None),
                # Time the servers held the requests: waiting in SHENRON's own queue is not model time.
                model_time_s=sum(a.elapsed_s - (a.started_at if a.sent_s is None else a.sent_s) for a in arrival),
                tokens=sum(a.tokens for a in arrival) + synthesis.tokens,
                overlap=overlap(intervals),
                sources=len({p.source for p in context}),
            )
            yield CouncilFinished(
                CouncilResult(
                    question=question,
                    answers=tuple(arrival),
                    synthesis=synthesis,
                    stats=stats,
                    context=tuple(context),
                    missing=tuple(a.fighter for a in missing),
                )
            )
        finally:
            backstop.cancel()
            for task in tasks.values():
                task.cancel()
            await asyncio.gather(*tasks.values(), return_exceptions=True)

    def _pick(self, names: Sequence[str] | None) -> tuple[Fighter, ...]:
        """The fighters for this round; unknown names raise ConfigError before anything starts."""
        return with_fighters(self.council, list(names)).fighters if names else self.council.fighters

    async def _abandon(
        self,
        roster: Sequence[Fighter],
        tasks: dict[str, asyncio.Task[None]],
        final: dict[str, FighterAnswer],
        t0: float,
    ) -> list[FighterFailed]:
        """The round's deadline passed: stop the stragglers and say so."""
        events = []
        for f in roster:
            if f.name in final:
                continue
            tasks[f.name].cancel()
            now = self._clock() - t0
            events.append(
                FighterFailed(
                    FighterAnswer(
                        fighter=f.name,
                        model=f.model,
                        backend=f.backend,
                        ok=False,
                        error=(
                            f"the round's deadline ({self.council.round_deadline_s:g} s) passed "
                            f"before {f.name} finished"
                        ),
                        error_kind="deadline",
                        elapsed_s=now,
                    )
                )
            )
        await asyncio.gather(*tasks.values(), return_exceptions=True)
        return events

    async def _fighter(
        self,
        f: Fighter,
        question: str,
        history: Sequence[Turn],
        context: Sequence[Passage],
        t0: float,
        deadline_s: float,
        queue: asyncio.Queue[Event],
    ) -> None:
        backend = self.client.backends[f.backend]
        remaining = deadline_s - (self._clock() - t0)
        timeout = min(f.timeout_s or backend.total_timeout_s, max(remaining, 0.01))
        p = _Progress(started_at=self._clock() - t0)
        queue.put_nowait(FighterStarted(fighter=f.name, model=f.model, at=p.started_at))
        messages = fighter_messages(f, question, history, context)
        error: str = ""
        kind: str = ""

        def sent() -> None:
            p.sent_s = self._clock() - t0
            queue.put_nowait(FighterSent(fighter=f.name, at=p.sent_s))

        try:
            stream = self.client.stream_chat(
                f.backend,
                f.model,
                messages,
                temperature=f.temperature,
                max_tokens=f.max_tokens,
                timeout_s=timeout,
                on_sent=sent,
            )
            async with aclosing(stream):
                async for d in stream:
                    if piece := self._absorb(p, d, t0):
                        queue.put_nowait(FighterToken(f.name, *piece))
        except LLMError as exc:
            error, kind = str(exc), exc.kind
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # a bug must still end the fighter visibly, not wedge the round
            log.exception("fighter %s crashed", f.name)
            error, kind = f"internal error ({exc.__class__.__name__}); see the bot's log", "internal"
        text = "".join(p.text).strip()
        if not error and not text:
            if p.reasoning and p.finish_reason == "length":
                error = (
                    f"{f.model} spent its whole max_tokens ({f.max_tokens}) thinking and gave no answer — "
                    f"raise max_tokens for {f.name} in council.toml"
                )
            else:
                error = f"{f.model} returned an empty answer"
            kind = "empty"
        answer = FighterAnswer(
            fighter=f.name,
            model=f.model,
            backend=f.backend,
            ok=not error,
            text=text if not error else "",
            reasoning="".join(p.reasoning).strip(),
            error=error,
            error_kind=kind,
            started_at=p.started_at,
            sent_s=p.sent_s,
            first_token_s=p.first_token_s,
            last_token_s=p.last_token_s,
            elapsed_s=self._clock() - t0,
            tokens=p.tokens,
            finish_reason=p.finish_reason,
        )
        queue.put_nowait(FighterFinished(answer) if answer.ok else FighterFailed(answer))

    def _absorb(self, p: _Progress, d: Delta, t0: float) -> tuple[str, float, bool] | None:
        """Fold one Delta into the progress. Returns (answer text, at, reset) to stream, never reasoning."""
        if d.done:
            p.finish_reason = d.finish_reason
            p.completion_tokens = d.completion_tokens
            return None
        at = self._clock() - t0
        if p.first_token_s is None:
            p.first_token_s = at
        p.last_token_s = at
        p.pieces += d.pieces
        if d.reasoning:
            p.reasoning.append(d.reasoning)
        if d.reset:
            p.text.clear()
        if not (d.content or d.reset):
            return None
        p.text.append(d.content)
        return d.content, at, d.reset

    async def _synthesise(
        self,
        question: str,
        history: Sequence[Turn],
        context: Sequence[Passage],
        ok: Sequence[FighterAnswer],
        missing: Sequence[FighterAnswer],
        t0: float,
    ) -> AsyncIterator[Event]:
        synth = self.council.synthesizer
        roles = {f.name: f.role for f in self.council.fighters}
        messages = synthesis_messages(synth, question, history, context, ok, roles, missing)
        attempts = [(synth.model, synth.backend, False)]
        if synth.fallback_model or synth.fallback_backend:
            attempts.append((synth.fallback_model or synth.model, synth.fallback_backend or synth.backend, True))
        missing_names = tuple(m.fighter for m in missing)
        for i, (model, backend, is_fallback) in enumerate(attempts):
            last = i == len(attempts) - 1
            p = _Progress(started_at=self._clock() - t0)
            yield SynthesisStarted(
                model=model, backend=backend, at=p.started_at, fallback=is_fallback, missing=missing_names
            )
            error = ""
            try:
                timeout = synth.timeout_s or self.client.backends[backend].total_timeout_s
                stream = self.client.stream_chat(
                    backend,
                    model,
                    messages,
                    temperature=synth.temperature,
                    max_tokens=synth.max_tokens,
                    timeout_s=timeout,
                )
                async with aclosing(stream):
                    async for d in stream:
                        if piece := self._absorb(p, d, t0):
                            yield SynthesisToken(*piece)
            except LLMError as exc:
                error = str(exc)
            except Exception as exc:
                log.exception("synthesis crashed")
                error = f"internal error ({exc.__class__.__name__}); see the bot's log"
            text = "".join(p.text).strip()
            if not error and not text:
                error = f"{model} returned an empty synthesis"
            result = SynthesisResult(
                ok=not error,
                text=text if not error else "",
                model=model,
                backend=backend,
                error=error,
                used_fallback=is_fallback,
                first_token_s=p.first_token_s,
                last_token_s=p.last_token_s,
                elapsed_s=self._clock() - t0,
                tokens=p.tokens,
            )
            if result.ok:
                yield SynthesisFinished(result)
                return
            if not last:
                yield SynthesisFailed(result, will_retry=True)
                continue
            if is_fallback:
                result = replace(result, error=f"the fallback {model} failed too: {error}")
            yield SynthesisFailed(result)


async def collect(events: AsyncIterator[Event]) -> CouncilResult:
    """Drain a round and return its result (for scripts and tests that only want the end)."""
    result: CouncilResult | None = None
    async with aclosing(events):  # type: ignore[type-var]
        async for event in events:
            if isinstance(event, CouncilFinished):
                result = event.result
    assert result is not None, "a council round always ends with CouncilFinished"
    return result
