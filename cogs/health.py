"""``/health``: what an admin needs to know when the council is slow or silent. Admins only."""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import replace
from typing import Any, TypeVar

import discord
from discord import app_commands
from discord.ext import commands

from bot.discord_bot import ShenronBot
from bot.health import probe_backends
from cogs import render

log = logging.getLogger(__name__)

PROBE_TIMEOUT_S = 5.0
T = TypeVar("T", bound=Callable[..., Any])


def admin_only() -> Callable[[T], T]:
    """Hide the command from non-admins (client side) *and* refuse them (server side).

    ``default_permissions`` is only a hint a server can override in Integrations settings;
    the check is what actually enforces it.
    """
    hide = app_commands.default_permissions(administrator=True)
    enforce = app_commands.checks.has_permissions(administrator=True)

    def decorator(func: T) -> T:
        return hide(enforce(func))

    return decorator


def parallelism_note(bot: ShenronBot, backend: str) -> str:
    """The measured figure for one backend, with the fix when it serialises."""
    report = bot.parallelism.get(backend)
    if report is None:
        return "⚡ parallelism not measured — `/health probe:True` measures it"
    note = f"⚡ {report.headline}"
    if report.status != "ok" and report.advice:
        note += " — " + render.clip(" ".join(report.advice), 300)
    return note


class HealthCog(commands.Cog):
    def __init__(self, bot: ShenronBot) -> None:
        self.bot = bot

    @app_commands.command(name="health")
    @app_commands.guild_only()
    @admin_only()
    @app_commands.describe(probe="Also measure how many requests each backend really runs at once (sends a few)")
    async def health(self, interaction: discord.Interaction, probe: bool = False) -> None:
        """Backends, models, knowledge base and council figures (admins only)."""
        await interaction.response.defer(ephemeral=True, thinking=True)
        bot = self.bot
        backends = await probe_backends(bot.client, bot.council, PROBE_TIMEOUT_S)
        if probe:
            try:
                await bot.measure_parallelism()
            except Exception as exc:
                log.exception("parallelism probe failed")
                backends = [replace(b, notes=(*b.notes, f"⚡ parallelism probe failed: {exc}")) for b in backends]
        backends = [replace(b, notes=(*b.notes, parallelism_note(bot, b.name))) for b in backends]
        kb_stats: object = bot.kb_problem or None
        if bot.kb is not None:
            try:
                kb_stats = await bot.kb.stats()
            except Exception as exc:
                log.warning("knowledge base stats failed: %s", exc)
                kb_stats = exc
        latency = bot.latency if bot.latency == bot.latency and bot.latency != float("inf") else None
        stats = bot.stats
        embed = render.render_health(
            backends,
            kb_stats=kb_stats,
            gateway_latency_s=latency,
            uptime_s=stats.uptime_s,
            served=stats.served,
            failed=stats.failed,
            interrupted=stats.interrupted,
            p50_s=stats.p50_s,
            p95_s=stats.p95_s,
            in_flight=bot.queue.running,
            queued=bot.queue.queued,
        )
        await interaction.followup.send(embed=embed, ephemeral=True)

    async def cog_app_command_error(
        self, interaction: discord.Interaction, error: app_commands.AppCommandError
    ) -> None:
        if isinstance(error, app_commands.MissingPermissions):
            await interaction.response.send_message("Only server administrators can use /health.", ephemeral=True)


async def setup(bot: commands.Bot) -> None:
    assert isinstance(bot, ShenronBot)
    await bot.add_cog(HealthCog(bot))
