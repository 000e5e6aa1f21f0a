"""Configuration: defaults, TOML file, environment overrides, and clear errors."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from clipservice.config import ConfigError, Settings, load_settings

ROOT = Path(__file__).resolve().parent.parent


def test_defaults_match_contract(tmp_path: Path) -> None:
    """With no file and no environment, every default is the contract's."""
    s = load_settings(environ={}, default_path=tmp_path / "absent.toml")
    assert s.server.port == 8080 and s.server.host == "127.0.0.1"
    assert s.jobs.retention_s == 600 and s.jobs.clip_timeout_s == 300
    assert s.jobs.max_concurrent_clips == 4 and s.jobs.max_clips_per_job == 50
    assert s.cut.default_mode == "accurate" and s.resolver.kind == "vidfly"
    assert s.security.create_rate_per_min == 60 and not s.security.allow_private_sources
    assert s.queue.url == ""


def test_shipped_config_toml_is_the_defaults() -> None:
    """The repository's config.toml writes out every default, and only defaults."""
    assert load_settings(ROOT / "config.toml", environ={}) == Settings()


def test_file_then_env_override(tmp_path: Path) -> None:
    """Environment variables win over the file; JSON values give lists and numbers."""
    cfg = tmp_path / "c.toml"
    cfg.write_text("[jobs]\nclip_timeout_s = 10\n[server]\nport = 9000\n")
    s = load_settings(
        cfg,
        environ={
            "CLIPSERVICE_JOBS__CLIP_TIMEOUT_S": "60",
            "CLIPSERVICE_SECURITY__API_KEYS": '["a", "b"]',
            "CLIPSERVICE_STORAGE__DATA_DIR": "/tmp/x",
        },
    )
    assert s.jobs.clip_timeout_s == 60
    assert s.server.port == 9000
    assert s.security.api_keys == ("a", "b")
    assert s.storage.data_dir == Path("/tmp/x")


def test_settings_are_frozen() -> None:
    """Settings cannot be changed after loading."""
    s = Settings()
    with pytest.raises(ValueError):
        s.jobs.retention_s = 1  # type: ignore[misc]


@pytest.mark.parametrize(
    ("toml", "env", "needle"),
    [
        ("[jobs]\nretention = 5\n", {}, "jobs.retention: unknown key"),
        ("[nope]\nx = 1\n", {}, "nope: unknown key"),
        ("[jobs]\nmax_concurrent_clips = 0\n", {}, "jobs.max_concurrent_clips"),
        ("[cut]\ndefault_mode = 'slow'\n", {}, "cut.default_mode"),
        ("", {"CLIPSERVICE_SERVER__PORT": "eighty"}, "server.port"),
        ("", {"CLIPSERVICE_JOBS__TYPO_S": "1"}, "jobs.typo_s: unknown key"),
        ("", {"CLIPSERVICE_PORT": "1"}, "CLIPSERVICE_PORT"),
        ("not toml [", {}, "not valid TOML"),
    ],
)
def test_bad_config_names_the_key(
    tmp_path: Path, toml: str, env: dict[str, str], needle: str
) -> None:
    """Unknown keys and bad values stop loading with a message naming the key."""
    cfg = tmp_path / "c.toml"
    cfg.write_text(toml)
    with pytest.raises(ConfigError) as info:
        load_settings(cfg, environ=env)
    assert needle in str(info.value)


def test_missing_config_file(tmp_path: Path) -> None:
    """An explicit --config that does not exist is an error, not the defaults."""
    with pytest.raises(ConfigError, match="not found"):
        load_settings(tmp_path / "missing.toml", environ={})


def test_serve_refuses_bad_config(tmp_path: Path) -> None:
    """`clipservice serve` with a bad config exits 2 and names the key on stderr."""
    cfg = tmp_path / "c.toml"
    cfg.write_text("[jobs]\nclip_timeout_s = -1\n")
    proc = subprocess.run(
        [sys.executable, "-m", "clipservice", "serve", "--config", str(cfg)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 2
    assert "jobs.clip_timeout_s" in proc.stderr
