"""Backend probes for ``/health`` (and the terminal's doctor): reachable? how fast? which models?

Each probe asks ``GET /models`` and compares the answer with the roster, so an admin sees at once
which fighters name a model their backend does not serve. Nothing here imports ``discord``.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

from bot.config import CouncilConfig
from bot.llm import LLMClient, LLMError

log = logging.getLogger(__name__)

DEFAULT_PROBE_TIMEOUT_S = 5.0


@dataclass(frozen=True, slots=True)
class BackendHealth:
    name: str
    base_url: str
    reachable: bool
    latency_s: float = 0.0  # time for GET /models to answer
    models: tuple[str, ...] = ()
    missing: tuple[str, ...] = ()  # roster members (fighters, synthesizer) whose model is not listed
    error: str = ""  # why it is unreachable, in words a user can act on
    notes: tuple[str, ...] = field(default=())  # further findings, one line each


def same_model(wanted: str, served: str) -> bool:
    # Ollama lists "llama3:latest" for a model the user calls "llama3".
    return wanted == served or f"{wanted}:latest" == served or wanted == f"{served}:latest"


def users_of(council: CouncilConfig, backend: str) -> list[tuple[str, str]]:
    """(who, model) for every roster member that talks to ``backend``."""
    users = [(f.name, f.model) for f in council.fighters if f.backend == backend]
    s = council.synthesizer
    if s.backend == backend:
        users.append((s.name, s.model))
    if s.fallback_model or s.fallback_backend:
        if (s.fallback_backend or s.backend) == backend:
            users.append((f"{s.name} (fallback)", s.fallback_model or s.model))
    return users


def missing_models(council: CouncilConfig, backend: str, served: Sequence[str]) -> tuple[str, ...]:
    """Who on the roster names a model that ``backend`` does not list."""
    return tuple(who for who, model in users_of(council, backend) if not any(same_model(model, m) for m in served))


async def probe_backend(
    client: LLMClient, council: CouncilConfig, name: str, timeout_s: float = DEFAULT_PROBE_TIMEOUT_S
) -> BackendHealth:
    backend = council.backends[name]
    started = time.perf_counter()
    try:
        models = await client.list_models(name, timeout_s=timeout_s)
    except LLMError as exc:
        return BackendHealth(name=name, base_url=backend.base_url, reachable=False, error=str(exc))
    latency = time.perf_counter() - started
    notes: tuple[str, ...] = ()
    if not models:
        # Some servers list nothing even though they serve: say so instead of flagging everyone.
        notes = ("the server listed no models, so missing ones cannot be checked",)
        missing: tuple[str, ...] = ()
    else:
        missing = missing_models(council, name, models)
    return BackendHealth(
        name=name,
        base_url=backend.base_url,
        reachable=True,
        latency_s=latency,
        models=tuple(models),
        missing=missing,
        notes=notes,
    )


async def probe_backends(
    client: LLMClient, council: CouncilConfig, timeout_s: float = DEFAULT_PROBE_TIMEOUT_S
) -> list[BackendHealth]:
    """Every backend, probed at the same time, in the roster file's order."""
    names = list(council.backends)
    return list(await asyncio.gather(*(probe_backend(client, council, n, timeout_s) for n in names)))
