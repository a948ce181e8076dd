"""Configuration: every mistake is one message naming the file, the key and the fix."""

from __future__ import annotations

from pathlib import Path

import pytest

from bot.config import ConfigError, load_council, load_settings, parse_council

REPO = Path(__file__).resolve().parent.parent

GOOD = """
[backends.local]
base_url = "http://localhost:1234/v1"

[[fighters]]
name = "GOKU"
model = "m"
persona = "You fight."

[synthesizer]
model = "m"
prompt = "Synthesise."
"""


def error_for(text: str, env: dict[str, str] | None = None) -> ConfigError:
    with pytest.raises(ConfigError) as info:
        parse_council(text, file="council.toml", env=env or {})
    return info.value


def test_the_shipped_roster_is_valid_and_complete() -> None:
    council = load_council(REPO / "council.toml", env={})
    assert [f.name for f in council.fighters] == ["GOKU", "VEGETA", "PICCOLO", "GOHAN", "KRILLIN", "FRIEZA"]
    assert council.synthesizer.name == "SHENRON"
    assert council.backends["local"].base_url == "http://localhost:1234/v1"
    assert len({f.persona for f in council.fighters}) == 6, "each fighter has its own perspective"
    assert len({f.role for f in council.fighters}) == 6


def test_minimal_roster_gets_defaults() -> None:
    council = parse_council(GOOD, env={})
    goku = council.fighters[0]
    assert goku.backend == "local" and goku.emoji and goku.role
    assert council.synthesizer.name == "SHENRON"


def test_llm_base_url_and_model_override_every_backend_and_model() -> None:
    council = parse_council(GOOD, env={"LLM_BASE_URL": "http://10.0.0.5:11434/v1/", "LLM_MODEL": "llama3"})
    assert council.backends["local"].base_url == "http://10.0.0.5:11434/v1"
    assert council.fighters[0].model == "llama3" and council.synthesizer.model == "llama3"
    assert council.synthesizer.fallback_model is None  # none configured: LLM_MODEL does not invent one
    shipped = load_council(REPO / "council.toml", env={"LLM_MODEL": "llama3"})
    assert shipped.synthesizer.fallback_model == "llama3"
    assert {f.model for f in shipped.fighters} == {"llama3"}


@pytest.mark.parametrize(
    ("change", "key", "fix_words"),
    [
        (lambda t: t.replace('name = "GOKU"', 'name = "GOKU'), "(syntax)", "quotes"),
        (
            lambda t: t.replace('model = "m"\npersona', 'model = "m"\nbackend = "ollama"\npersona'),
            "fighters[0].backend",
            "local",
        ),
        (lambda t: t.replace("http://localhost:1234/v1", "localhost:1234"), "backends.local.base_url", "http://"),
        (
            lambda t: t.replace("http://localhost:1234/v1", "http://localhost:12x4/v1"),
            "backends.local.base_url",
            "http://",
        ),
        (
            lambda t: t.replace("http://localhost:1234/v1", "https://me:hunter2@proxy.example/v1"),
            "backends.local.base_url",
            "api_key_env",
        ),
        (
            lambda t: t.replace('persona = "You fight."', 'persona = "You fight."\ntemperature = 3.5'),
            "fighters[0].temperature",
            "between 0 and 2",
        ),
        (
            lambda t: t.replace('persona = "You fight."', 'persona = "You fight."\ntemperature = "hot"'),
            "fighters[0].temperature",
            "temperature = 0.7",
        ),
        (lambda t: t.replace('name = "GOKU"', 'name = ""'), "fighters[0].name", "value"),
        (
            lambda t: t.replace(
                "[synthesizer]", '[[fighters]]\nname = "goku"\nmodel = "m"\npersona = "x"\n\n[synthesizer]'
            ),
            "fighters[1].name",
            "different name",
        ),
        (
            lambda t: t.split("[[fighters]]")[0] + "[synthesizer]" + t.split("[synthesizer]")[1],
            "fighters",
            "[[fighters]]",
        ),
        (
            lambda t: t.replace('[backends.local]\nbase_url = "http://localhost:1234/v1"\n', ""),
            "backends",
            "[backends.local]",
        ),
        (lambda t: t.replace('prompt = "Synthesise."', ""), "synthesizer.prompt", "prompt"),
        (lambda t: t + "\n[extras]\nx = 1\n", "extras", "[council]"),
        (
            lambda t: t.replace('persona = "You fight."', 'persona = "You fight."\nmax_tokens = 0'),
            "fighters[0].max_tokens",
            "between 1",
        ),
    ],
    ids=[
        "toml-syntax",
        "unknown-backend",
        "url-without-scheme",
        "malformed-port",
        "credentials-in-url",
        "temperature-range",
        "temperature-type",
        "empty-name",
        "duplicate-name",
        "empty-roster",
        "no-backend",
        "no-synth-prompt",
        "unknown-section",
        "max-tokens-range",
    ],
)
def test_each_mistake_names_file_key_and_fix(change, key: str, fix_words: str) -> None:
    err = error_for(change(GOOD))
    assert err.file == "council.toml"
    assert err.key == key
    assert fix_words in err.fix
    assert str(err).startswith(f"council.toml: {key}: ")


def test_missing_api_key_env_var() -> None:
    text = GOOD.replace(
        'base_url = "http://localhost:1234/v1"', 'base_url = "https://api.example.com/v1"\napi_key_env = "EXAMPLE_KEY"'
    )
    err = error_for(text)
    assert err.key == "backends.local.api_key_env"
    assert "EXAMPLE_KEY is not set" in err.problem and ".env" in err.fix
    council = parse_council(text, env={"EXAMPLE_KEY": "sk-123"})
    assert council.backends["local"].api_key == "sk-123"
    assert "sk-123" not in repr(council.backends["local"])


def test_missing_roster_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as info:
        load_council(tmp_path / "nope.toml")
    assert info.value.key == "(file)" and "SHENRON_COUNCIL" in info.value.fix


@pytest.mark.parametrize(
    ("env", "key"),
    [
        ({"DEV_GUILD_ID": "my-server"}, "DEV_GUILD_ID"),
        ({"ALLOWED_ROLE_IDS": "123, admins"}, "ALLOWED_ROLE_IDS"),
        ({"EDIT_INTERVAL_S": "0"}, "EDIT_INTERVAL_S"),
        ({"LOG_LEVEL": "LOUD"}, "LOG_LEVEL"),
        ({"CHROMA_URL": "chroma:8000"}, "CHROMA_URL"),
        ({"KB_ENABLED": "maybe"}, "KB_ENABLED"),
        ({"HEALTH_PORT": "70000"}, "HEALTH_PORT"),
        ({"LLM_BASE_URL": "localhost:1234"}, "LLM_BASE_URL"),
    ],
)
def test_bad_settings_name_the_variable(env: dict[str, str], key: str) -> None:
    with pytest.raises(ConfigError) as info:
        load_settings(env)
        parse_council(GOOD, env=env)
    assert info.value.key == key


def test_settings_parse_and_hide_the_token() -> None:
    s = load_settings({"DISCORD_TOKEN": "secret.token.value", "ALLOWED_CHANNEL_IDS": "1, 2;3", "USER_COOLDOWN_S": "5"})
    assert s.allowed_channel_ids == {1, 2, 3}
    assert s.user_cooldown_s == 5.0
    assert "secret.token.value" not in repr(s)
