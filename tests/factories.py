"""Builders for test configuration: a council whose every fighter has its own model on the fake server.

Fighter GOKU uses model "goku", VEGETA "vegeta", …; the synthesizer "shenron", its fallback
"shenron-fallback". Script the fake per model to script each fighter.
"""

from __future__ import annotations

from bot.config import Backend, CouncilConfig, Fighter, Synthesizer

NAMES = ("GOKU", "VEGETA", "PICCOLO", "GOHAN", "KRILLIN", "FRIEZA")
EMOJI = {"GOKU": "🔥", "VEGETA": "👑", "PICCOLO": "🧘", "GOHAN": "📚", "KRILLIN": "🛡️", "FRIEZA": "❄️"}


def make_backend(url: str, name: str = "fake", **kw: object) -> Backend:
    defaults: dict[str, object] = {
        "max_concurrency": 16,
        "connect_timeout_s": 2.0,
        "first_token_timeout_s": 5.0,
        "total_timeout_s": 10.0,
        "max_retries": 2,
    }
    defaults.update(kw)
    return Backend(name=name, base_url=url.rstrip("/"), **defaults)  # type: ignore[arg-type]


def make_council(
    url: str,
    names: tuple[str, ...] = NAMES,
    *,
    fallback: bool = True,
    round_deadline_s: float = 30.0,
    synth_timeout_s: float | None = None,
    shared_model: str | None = None,
    **backend_kw: object,
) -> CouncilConfig:
    """``shared_model``: every fighter and the synthesizer use that one model instead of their own."""
    backend = make_backend(url, **backend_kw)
    fighters = tuple(
        Fighter(
            name=n,
            emoji=EMOJI.get(n, "🥋"),
            role=f"The {n.title()}",
            persona=f"You are {n}.",
            model=shared_model or n.lower(),
            backend=backend.name,
            temperature=0.5,
            max_tokens=200,
        )
        for n in names
    )
    synth = Synthesizer(
        name="SHENRON",
        emoji="🐉",
        model=shared_model or "shenron",
        backend=backend.name,
        prompt="Synthesise the council's answers.",
        fallback_model=(shared_model or "shenron-fallback") if fallback else None,
        timeout_s=synth_timeout_s,
    )
    return CouncilConfig(
        backends={backend.name: backend},
        fighters=fighters,
        synthesizer=synth,
        round_deadline_s=round_deadline_s,
        source="test-council.toml",
    )
