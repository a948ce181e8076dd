"""The council's vocabulary: what goes in (question, history, context) and the events that come out.

Discord, the terminal, the benchmarks and the tests only ever consume these. Nothing here imports
``discord``.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True, slots=True)
class Passage:
    """One retrieved chunk of the knowledge base. Untrusted text: always delimited in prompts."""

    text: str
    source: str  # path or URL the chunk came from, e.g. "docs/runbook.md"
    title: str = ""  # document title
    heading: str = ""  # nearest heading above the chunk
    score: float = 0.0  # similarity, higher is closer (0..1)

    @property
    def label(self) -> str:
        """How the passage is named to the user: ``runbook.md › RAID``."""
        name = self.source.rsplit("/", 1)[-1] or self.source
        return f"{name} › {self.heading}" if self.heading else name


@dataclass(frozen=True, slots=True)
class Turn:
    """One earlier round of a conversation: the question and SHENRON's synthesis."""

    question: str
    answer: str


@dataclass(frozen=True, slots=True)
class Usage:
    prompt_tokens: int = 0
    completion_tokens: int = 0


@dataclass(frozen=True, slots=True)
class FighterAnswer:
    """A fighter's final state in a round: answered (ok) or failed with a reason."""

    fighter: str
    model: str
    backend: str
    ok: bool
    text: str = ""
    reasoning: str = ""
    error: str = ""  # words a user can act on; empty when ok
    error_kind: str = ""  # machine-readable cause, e.g. "connect", "timeout", "http_404", "cancelled"
    started_at: float = 0.0  # seconds since the round started
    sent_s: float | None = None  # when the request left SHENRON's own queue for the server
    first_token_s: float | None = None  # wait before the first token, since the round started
    last_token_s: float | None = None  # time of the last token, since the round started
    elapsed_s: float = 0.0  # since the round started until this fighter finished
    tokens: int = 0  # completion tokens (server usage when offered, else counted deltas)
    finish_reason: str | None = None


@dataclass(frozen=True, slots=True)
class SynthesisResult:
    ok: bool
    text: str = ""
    model: str = ""
    backend: str = ""
    error: str = ""
    used_fallback: bool = False
    first_token_s: float | None = None
    last_token_s: float | None = None
    elapsed_s: float = 0.0
    tokens: int = 0


@dataclass(frozen=True, slots=True)
class CouncilStats:
    """Figures for one round. Times are seconds since the round started."""

    wall_s: float
    fighters_total: int
    fighters_ok: int
    first_answer_s: float | None
    model_time_s: float  # sum over fighters of their elapsed time
    tokens: int  # completion tokens over fighters and synthesis
    overlap: float  # sum of generating intervals / length of their union (1 = one at a time)
    sources: int = 0


@dataclass(frozen=True, slots=True)
class CouncilResult:
    question: str
    answers: tuple[FighterAnswer, ...]  # in arrival order
    synthesis: SynthesisResult
    stats: CouncilStats
    context: tuple[Passage, ...] = ()
    missing: tuple[str, ...] = ()  # fighters without an answer

    @property
    def ok(self) -> bool:
        return self.synthesis.ok


# --- events ---------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class FighterStarted:
    fighter: str
    model: str
    at: float


@dataclass(frozen=True, slots=True)
class FighterSent:
    """The request left for the server: SHENRON's own queue (the backend's max_concurrency) is behind it.

    Between FighterStarted and FighterSent a fighter waits on SHENRON; after it, on the server.
    """

    fighter: str
    at: float


@dataclass(frozen=True, slots=True)
class FighterToken:
    """A piece of answer text (never reasoning).

    ``reset`` means: what was streamed so far turned out to be reasoning (a ``</think>`` arrived with
    no opening tag); drop it, then append ``text``. Consumers: ``buf = ("" if ev.reset else buf) + ev.text``.
    """

    fighter: str
    text: str
    at: float
    reset: bool = False


@dataclass(frozen=True, slots=True)
class FighterFinished:
    answer: FighterAnswer


@dataclass(frozen=True, slots=True)
class FighterFailed:
    answer: FighterAnswer  # ok is False; error says why


@dataclass(frozen=True, slots=True)
class SynthesisStarted:
    """The synthesis (or, after a failure, its fallback) begins: consumers start a fresh text buffer."""

    model: str
    backend: str
    at: float
    fallback: bool = False
    missing: tuple[str, ...] = field(default=())


@dataclass(frozen=True, slots=True)
class SynthesisToken:
    """A piece of the synthesis; ``reset`` as for :class:`FighterToken`."""

    text: str
    at: float
    reset: bool = False


@dataclass(frozen=True, slots=True)
class SynthesisFinished:
    result: SynthesisResult


@dataclass(frozen=True, slots=True)
class SynthesisFailed:
    result: SynthesisResult  # ok is False; error says why
    will_retry: bool = False  # True when the fallback model comes next


@dataclass(frozen=True, slots=True)
class CouncilFinished:
    result: CouncilResult


Event = (
    FighterStarted
    | FighterSent
    | FighterToken
    | FighterFinished
    | FighterFailed
    | SynthesisStarted
    | SynthesisToken
    | SynthesisFinished
    | SynthesisFailed
    | CouncilFinished
)
