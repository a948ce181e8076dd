"""Start-up checks of the bot process: the token is validated without ever being echoed."""

from __future__ import annotations

import pytest
import simcord

from bot.config import ConfigError, Settings
from bot.discord_bot import check_token, run_bot
from tests.factories import make_council

GOOD = "MTIzNDU2Nzg5MDEyMzQ1Njc4OQ.GaBcDe.abcdefghijklmnopqrstuvwxyz0123456789AB"


def test_a_well_formed_token_passes() -> None:
    assert check_token(GOOD) == GOOD


@pytest.mark.parametrize(
    ("token", "problem"),
    [
        (None, "is not set"),
        ("", "is not set"),
        (f"Bot {GOOD}", "starts with 'Bot '"),
        (f'"{GOOD}"', "contains quotes or spaces"),
        ("1234567890123456789", "does not look like a bot token"),
        ("not.a.token", "does not look like a bot token"),
    ],
)
def test_bad_tokens_say_what_is_wrong_without_echoing_them(token: str | None, problem: str) -> None:
    with pytest.raises(ConfigError) as caught:
        check_token(token)
    error = caught.value
    assert (error.file, error.key) == (".env", "DISCORD_TOKEN")
    assert problem in error.problem and error.fix
    if token:
        assert token not in str(error) and GOOD not in str(error)


async def test_run_bot_refuses_to_start_without_a_token() -> None:
    council = make_council("http://127.0.0.1:9/v1")
    with pytest.raises(ConfigError, match="DISCORD_TOKEN: is not set"):
        await run_bot(Settings(discord_token=None, kb_enabled=False), council)


DEV_GUILD = 1456074443980800999


class TestDevelopmentGuild:
    @pytest.fixture
    def bot_settings(self) -> Settings:
        return Settings(edit_interval_s=0.05, dev_guild_id=DEV_GUILD)

    async def test_commands_sync_to_the_development_guild_only(self, simcord_env: simcord.Env) -> None:
        puts = [r.path for r in simcord_env.http_requests if r.method == "PUT"]
        assert puts == [f"/applications/{simcord_env.bot.application_id}/guilds/{DEV_GUILD}/commands"]
        dev = simcord_env.create_guild("Dev", id=DEV_GUILD)
        other = simcord_env.create_guild("Elsewhere")
        dev_member = dev.add_member(simcord_env.create_user("dev"))
        other_member = other.add_member(simcord_env.create_user("someone"))
        assert "shenron" in dev_member.available_commands(dev.create_text_channel("lab"))
        assert "shenron" not in other_member.available_commands(other.create_text_channel("general"))
