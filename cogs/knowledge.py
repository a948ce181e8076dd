"""``/kb search`` (anyone) and ``/kb add`` (administrators): the knowledge base from Discord.

Discord keeps permissions per top-level command, so one subcommand of ``/kb`` cannot be hidden
from non-admins on its own (discord.py drops ``default_permissions`` below the top level).
``/kb add`` is therefore visible to everyone and refused server-side to anyone who is not an
administrator; ``/kb search`` shows the passages a council would be given, privately.
"""

from __future__ import annotations

import logging

import discord
from discord import app_commands
from discord.ext import commands

from bot.discord_bot import ShenronBot
from bot.events import Passage
from bot.knowledge import FileOutcome, KnowledgeBase, KnowledgeError
from bot.knowledge.documents import MAX_FILE_BYTES
from cogs import render

log = logging.getLogger(__name__)

EXCERPT_CHARS = 600
COLOUR = 0x3498DB


def render_passages(query: str, passages: list[Passage], min_score: float) -> discord.Embed:
    """The passages a question retrieves, best first (one field each), or why there are none."""
    title = render.clip(f"📚 {query}", render.TITLE_LIMIT)
    if not passages:
        return discord.Embed(
            title=title,
            colour=COLOUR,
            description=(f"No passage scores {min_score:g} or more, so a council would get no documents for this."),
        )
    embed = discord.Embed(title=title, colour=COLOUR)
    for p in passages:
        excerpt = render.neutralize_mentions(" ".join(p.text.split()))
        embed.add_field(
            name=render.clip(f"{p.score:.2f} · {render.neutralize_mentions(p.label)}", render.FIELD_NAME_LIMIT),
            value=render.clip(excerpt, min(EXCERPT_CHARS, render.FIELD_VALUE_LIMIT)),
            inline=False,
        )
    return embed


def describe_outcome(name: str, outcome: FileOutcome) -> str:
    if outcome.status == "skipped":
        return f"❌ `{name}` was not added: {outcome.reason}."
    if outcome.status == "unchanged":
        return f"✅ `{name}` is already in the knowledge base, unchanged."
    if outcome.status == "replaced":
        return (
            f"✅ `{name}` replaced its previous version: {outcome.chunks} passages "
            f"({outcome.removed} old ones removed)."
        )
    return f"✅ `{name}` added: {outcome.chunks} passages."


@app_commands.guild_only()
class KnowledgeCog(commands.GroupCog, group_name="kb", group_description="The council's knowledge base"):
    def __init__(self, bot: ShenronBot) -> None:
        self.bot = bot
        super().__init__()

    def _unavailable(self) -> str:
        why = self.bot.kb_problem or "it is not configured"
        return f"The knowledge base is not available: {why}."

    @app_commands.command(name="search")
    @app_commands.describe(query="A question or keywords")
    async def search(self, interaction: discord.Interaction, query: app_commands.Range[str, 1, 500]) -> None:
        """Show which documents the council would be given for a question."""
        kb = self.bot.kb
        if kb is None:
            await interaction.response.send_message(self._unavailable(), ephemeral=True)
            return
        await interaction.response.defer(ephemeral=True, thinking=True)
        try:
            passages = await kb.search(query)
        except KnowledgeError as exc:
            await interaction.followup.send(f"❌ The search failed: {exc}", ephemeral=True)
            return
        await interaction.followup.send(
            embed=render_passages(query, passages, self.bot.settings.kb_min_score), ephemeral=True
        )

    @app_commands.command(name="add")
    @app_commands.checks.has_permissions(administrator=True)
    @app_commands.describe(file="A Markdown, text, HTML or PDF file (at most 20 MiB)")
    async def add(self, interaction: discord.Interaction, file: discord.Attachment) -> None:
        """Add a document to the knowledge base (administrators only)."""
        kb = self.bot.kb
        if not isinstance(kb, KnowledgeBase):
            await interaction.response.send_message(self._unavailable(), ephemeral=True)
            return
        name = file.filename.replace("/", "_")
        if file.size > MAX_FILE_BYTES:
            await interaction.response.send_message(
                f"❌ `{name}` is {file.size / 2**20:.1f} MiB; the limit is {MAX_FILE_BYTES // 2**20} MiB.",
                ephemeral=True,
            )
            return
        await interaction.response.defer(ephemeral=True, thinking=True)
        try:
            data = await file.read()
            outcome = await kb.add_bytes(data, f"discord/{name}")
        except discord.HTTPException as exc:
            await interaction.followup.send(
                f"❌ Could not download `{name}` from Discord ({exc.status}).", ephemeral=True
            )
            return
        except KnowledgeError as exc:
            await interaction.followup.send(f"❌ `{name}` was not added: {exc}", ephemeral=True)
            return
        log.info("%s added discord/%s: %s", interaction.user, name, outcome.status)
        await interaction.followup.send(describe_outcome(name, outcome), ephemeral=True)

    async def cog_app_command_error(
        self, interaction: discord.Interaction, error: app_commands.AppCommandError
    ) -> None:
        if isinstance(error, app_commands.MissingPermissions):
            await interaction.response.send_message(
                "Only server administrators can add documents to the knowledge base.", ephemeral=True
            )


async def setup(bot: commands.Bot) -> None:
    assert isinstance(bot, ShenronBot)
    await bot.add_cog(KnowledgeCog(bot))
