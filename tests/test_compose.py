"""docker-compose.yml: what a schema cannot see (scripts/check validates the schema).

Docker cannot run here, so these read the file: references between services
resolve, the clipservice environment is a valid configuration of the S3 +
Redis deployment, the worker can be scaled, and the store's identity and
bucket are the ones the clipservice containers use.
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from clipservice.config import load_settings

ROOT = Path(__file__).resolve().parent.parent
COMPOSE = ROOT / "docker-compose.yml"
# ${NAME:-default}: compose's interpolation with a default.
_DEFAULTED = re.compile(r"\$\{([A-Z0-9_]+):-([^}]*)\}")


def _interpolate(value: Any) -> str:
    text = str(value)
    assert "$" not in _DEFAULTED.sub("", text), f"{text!r}: a variable without a default"
    return _DEFAULTED.sub(lambda m: m.group(2), text)


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    data: dict[str, Any] = yaml.safe_load(COMPOSE.read_text())
    return data


def _env(service: dict[str, Any]) -> dict[str, str]:
    env = service.get("environment", {})
    assert isinstance(env, dict), "environment as a mapping"
    return {k: _interpolate(v) for k, v in env.items()}


def test_references_resolve(compose: dict[str, Any]) -> None:
    """Every depends_on names a service with a healthcheck, every named volume is declared."""
    services = compose["services"]
    assert {"api", "worker", "redis", "s3"} <= services.keys()
    for name, service in services.items():
        for dep, how in service.get("depends_on", {}).items():
            assert dep in services, f"{name} depends on unknown {dep}"
            if how.get("condition") == "service_healthy":
                assert "test" in services[dep].get("healthcheck", {}), f"{dep}: no healthcheck"
        for mount in service.get("volumes", []):
            source = str(mount).split(":", 1)[0]
            if not source.startswith((".", "/")):
                assert source in (compose.get("volumes") or {}), f"{name}: undeclared {source}"


@pytest.mark.parametrize("name", ["api", "worker"])
def test_clipservice_environment_is_a_valid_s3_redis_config(
    compose: dict[str, Any], name: str, tmp_path: Path
) -> None:
    """The CLIPSERVICE_* variables load (no unknown key) into S3 storage and a Redis queue."""
    env = _env(compose["services"][name])
    settings = load_settings(environ=env, default_path=tmp_path / "absent.toml")
    assert settings.storage.kind == "s3" and settings.storage.bucket
    assert settings.storage.endpoint_url == "http://s3:8333"
    assert settings.queue.url.startswith("redis://redis:")
    assert env["AWS_ACCESS_KEY_ID"] and env["AWS_SECRET_ACCESS_KEY"]


def test_api_serves_and_worker_scales(compose: dict[str, Any]) -> None:
    """api runs `serve` on a published port; worker runs `worker` and nothing pins one instance."""
    api, worker = compose["services"]["api"], compose["services"]["worker"]
    assert api["command"] == ["serve"] and api["ports"]
    assert worker["command"] == ["worker"]
    # A fixed name or host port would make `--scale worker=N` fail for N > 1.
    assert "container_name" not in worker and "ports" not in worker
    assert api["build"] == worker["build"] == "."
    # The image's SIGTERM drain needs more than shutdown_grace_s (30 s) before SIGKILL.
    for service in (api, worker):
        grace = service["stop_grace_period"]
        assert grace.endswith("s") and int(grace[:-1]) > 30


def test_store_identity_and_bucket_match_the_clients(compose: dict[str, Any]) -> None:
    """The store accepts the keys the clipservice containers sign with and creates their bucket."""
    services = compose["services"]
    store_env, api_env = _env(services["s3"]), _env(services["api"])
    for key in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
        assert store_env[key] == api_env[key]
    assert f"-bucket={api_env['CLIPSERVICE_STORAGE__BUCKET']}" in services["s3"]["command"]
    image = services["s3"]["image"]
    assert re.fullmatch(r"[\w./-]+:\d[\w.]*", image), f"{image}: pin a version"


def test_compose_file_passes_the_schema_check() -> None:
    """The compose-spec schema check that scripts/check runs accepts the file."""
    exe = Path(sys.executable).with_name("check-jsonschema")
    result = subprocess.run(
        [str(exe), "--builtin-schema", "vendor.compose-spec", str(COMPOSE)],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_schema_check_refuses_a_misspelt_key(tmp_path: Path) -> None:
    """The schema check is not a no-op: a misspelt service key fails it."""
    bad = tmp_path / "docker-compose.yml"
    bad.write_text(COMPOSE.read_text().replace("healthcheck:", "helthcheck:", 1))
    exe = Path(sys.executable).with_name("check-jsonschema")
    result = subprocess.run(
        [str(exe), "--builtin-schema", "vendor.compose-spec", str(bad)],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode != 0 and "helthcheck" in result.stdout, result.stdout
