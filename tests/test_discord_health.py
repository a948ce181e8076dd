"""/health: visible to administrators only, enforced on the server side, and useful."""

from __future__ import annotations

import discord
import pytest
import simcord
from discord import app_commands

from tests.discord_fixtures import GatedKnowledge, Scene, script_council
from tests.factories import make_council
from tests.fakeserver import FakeLLM, Script


async def test_admin_sees_backends_models_and_figures(scene: Scene, fake_llm: FakeLLM) -> None:
    script_council(fake_llm)  # serves goku … frieza and shenron, not shenron-fallback
    await scene.alice.slash(scene.channel, "shenron", question="ZFS or ext4?")

    result = await scene.admin.slash(scene.channel, "health")

    assert result.ephemeral
    # The first follow-up after a deferral replaces the "thinking…" message.
    followup = result.response
    assert followup is not None and followup.ephemeral
    [embed] = followup.embeds
    fields = {f.name: f.value for f in embed.fields}
    backend = fields["Backend fake"]
    assert backend.startswith("✅ reachable · ") and fake_llm.url in backend
    assert "goku" in backend and "shenron" in backend
    assert "⚠️ missing for: SHENRON (fallback)" in backend
    assert fields["Knowledge base"] == "not configured"
    assert fields["Discord"].startswith("gateway ")
    assert "served 1 · failed 0 · interrupted 0" in fields["Councils"]
    assert "wall time p50 " in fields["Councils"]


async def test_an_unreachable_backend_says_what_to_do(scene: Scene, fake_llm: FakeLLM) -> None:
    await fake_llm.kill()
    result = await scene.admin.slash(scene.channel, "health")
    backend = {f.name: f.value for f in result.response.embeds[0].fields}["Backend fake"]
    assert backend.startswith("❌ unreachable")
    assert "fake" in backend.splitlines()[1]  # the client's own sentence names the backend


async def test_hidden_from_members(scene: Scene) -> None:
    assert "health" in scene.admin.available_commands(scene.channel)
    assert "health" not in scene.alice.available_commands(scene.channel)
    assert "shenron" in scene.alice.available_commands(scene.channel)
    with pytest.raises(simcord.SetupError, match="not visible"):
        await scene.alice.slash(scene.channel, "health")


async def test_refused_on_the_server_even_when_a_server_override_shows_it(scene: Scene) -> None:
    # A server admin can show the command to anyone in Integrations; the check still refuses.
    [health] = [c for c in await scene.bot.tree.fetch_commands() if c.name == "health"]
    scene.guild.set_command_permissions(health, {scene.alice: True})
    assert "health" in scene.alice.available_commands(scene.channel)

    result = await scene.alice.slash(scene.channel, "health")

    assert result.ephemeral and result.response is not None
    assert result.response.content == "Only server administrators can use /health."
    assert result.followups == []
    [error] = scene.env.errors  # the refusal went through the app-command error path
    assert isinstance(error, app_commands.MissingPermissions)


class TestWithKnowledgeBase:
    @pytest.fixture
    def knowledge(self) -> GatedKnowledge:
        return GatedKnowledge()

    async def test_knowledge_base_figures(self, scene: Scene) -> None:
        result = await scene.admin.slash(scene.channel, "health")
        fields = {f.name: f.value for f in result.response.embeds[0].fields}
        assert fields["Knowledge base"] == "collection **shenron** · chunks **42** · embedder **fake-embedder**"


def test_health_embed_fits_discord_limits() -> None:
    from bot.health import BackendHealth
    from cogs.render import render_health

    backends = [
        BackendHealth(
            name=f"b{i}",
            base_url=f"http://host{i}:1234/v1",
            reachable=i % 2 == 0,
            latency_s=0.01,
            models=tuple(f"model-{j}" for j in range(40)),
            missing=("GOKU",),
            error="x" * 2000,
        )
        for i in range(30)
    ]
    embed = render_health(
        backends,
        kb_stats=RuntimeError("chroma is down"),
        gateway_latency_s=None,
        uptime_s=3725,
        served=3,
        failed=1,
        interrupted=0,
        p50_s=None,
        p95_s=None,
    )
    assert len(embed) <= 6000 and len(embed.fields) <= 25
    assert all(len(f.value) <= 1024 for f in embed.fields)
    assert {f.name: f.value for f in embed.fields}["Discord"] == "gateway unknown · up 1h 02m 05s"
    assert isinstance(embed, discord.Embed)


class TestParallelismOnDemand:
    """`/health probe:True` measures how many requests the backend really runs at once."""

    @pytest.fixture
    async def fake_llm(self):
        # A server that runs one generation at a time, like Ollama with OLLAMA_NUM_PARALLEL=1.
        async with FakeLLM(
            max_parallel=1, default=Script(text="one two three four five six", token_interval=0.02)
        ) as fake:
            yield fake

    @pytest.fixture
    def council_config(self, fake_llm: FakeLLM):
        return make_council(fake_llm.url, max_retries=0, shared_model="qwen")  # one model: one probe

    async def test_not_measured_until_asked(self, scene: Scene, fake_llm: FakeLLM) -> None:
        result = await scene.admin.slash(scene.channel, "health")
        backend = {f.name: f.value for f in result.response.embeds[0].fields}["Backend fake"]
        assert "parallelism not measured — `/health probe:True` measures it" in backend
        assert not any(r.path.endswith("/chat/completions") for r in fake_llm.requests), "no request unless asked"

    async def test_probe_reports_a_serialising_backend_with_the_fix(self, scene: Scene, fake_llm: FakeLLM) -> None:
        result = await scene.admin.slash(scene.channel, "health", probe=True)
        backend = {f.name: f.value for f in result.response.embeds[0].fields}["Backend fake"]
        assert "⚡ serves one at a time" in backend
        assert "OLLAMA_NUM_PARALLEL" in backend and "max_concurrency" in backend
        assert fake_llm.peak_parallel == 1
        metrics = scene.bot.metrics.exposition().decode()
        assert 'shenron_backend_parallel_requests{backend="fake"} 1.0' in metrics


async def test_councils_in_discord_feed_the_metrics(scene: Scene, fake_llm: FakeLLM) -> None:
    script_council(fake_llm)
    fake_llm.script("vegeta", Script(status=500, error_message="boom"))
    await scene.alice.slash(scene.channel, "shenron", question="ZFS or ext4?")
    text = scene.bot.metrics.exposition().decode()
    assert 'shenron_councils_total{outcome="partial"} 1.0' in text
    assert 'shenron_errors_total{backend="fake",fighter="VEGETA",kind="http_500"} 1.0' in text
    assert "shenron_councils_in_flight 0.0" in text
    doc = await scene.bot.health_document()
    assert doc["status"] in ("ok", "degraded") and doc["councils"]["served"] == 1
