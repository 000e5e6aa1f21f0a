"""Service configuration: one frozen pydantic model, loaded once.

Sources, later ones winning: built-in defaults, a TOML file, then environment
variables named ``CLIPSERVICE_<SECTION>__<KEY>``. Any unknown key or bad value
raises :class:`ConfigError` with a message naming the key, so a typo never
starts a service on silently different settings.
"""

from __future__ import annotations

import ipaddress
import json
import os
import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

from clipservice.domain import CutMode

ENV_PREFIX = "CLIPSERVICE_"


class ConfigError(Exception):
    """The configuration could not be loaded; the message names the key."""


class _Section(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class ServerSettings(_Section):
    """HTTP listener and shutdown behaviour."""

    host: str = Field("127.0.0.1", description="Address to listen on.")
    port: int = Field(8080, ge=0, le=65535, description="TCP port to listen on.")
    public_url: str = Field(
        "", description='Base for absolute clip URLs behind a proxy; "" = relative URLs.'
    )
    shutdown_grace_s: float = Field(
        30, ge=0, description="On SIGTERM: how long running clips may finish."
    )
    trusted_proxies: tuple[str, ...] = Field(
        (), description="Addresses/networks whose X-Forwarded-* headers are believed."
    )

    @field_validator("trusted_proxies")
    @classmethod
    def _networks(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        for entry in value:
            try:
                ipaddress.ip_network(entry.strip(), strict=False)
            except ValueError as exc:
                raise ValueError(f"{entry!r} is not an IP address or CIDR network") from exc
        return value


MIB = 1024 * 1024
# S3's own floor for every part of a multipart upload but the last.
S3_MIN_PART_BYTES = 5 * MIB
# SigV4 presigned URLs live at most seven days.
S3_MAX_PRESIGN_S = 7 * 24 * 3600


class StorageSettings(_Section):
    """Where job documents and clip files live (clips: a local folder or an S3 bucket)."""

    data_dir: Path = Field(
        Path("./data"),
        description="Holds jobs/ and clips/ (with kind = s3, clips/ only stages outputs "
        "until they are uploaded).",
    )
    kind: Literal["local", "s3"] = Field(
        "local",
        description="local: clips stay in data_dir/clips (shared by every node in the "
        "distributed mode); s3: clips are uploaded to an S3-compatible bucket.",
    )
    bucket: str = Field("", description="s3: the bucket holding the clips (required).")
    prefix: str = Field(
        "", description='s3: key prefix inside the bucket, e.g. "clipservice/"; "" = the root.'
    )
    endpoint_url: str = Field(
        "",
        description='s3: the store\'s URL (MinIO, R2, GCS interop…); "" = AWS S3 for the region.',
    )
    public_endpoint_url: str = Field(
        "",
        description="s3, serve = redirect: the store's URL as clients reach it, used to sign "
        'download links; "" = endpoint_url.',
    )
    region: str = Field(
        "", description='s3: region; "" = from AWS_REGION / the shared AWS config (else us-east-1).'
    )
    addressing_style: Literal["auto", "path", "virtual"] = Field(
        "auto",
        description="s3: bucket in the path (path, what MinIO usually needs) or in the host "
        "name (virtual); auto lets botocore choose.",
    )
    serve: Literal["stream", "redirect"] = Field(
        "stream",
        description="s3: GET /api/clips/{file} streams the object through the API node (with "
        "Range), or redirects to a presigned URL valid presign_expiry_s.",
    )
    presign_expiry_s: int = Field(
        300, ge=1, le=S3_MAX_PRESIGN_S, description="s3, serve = redirect: presigned URL lifetime."
    )
    multipart_threshold_bytes: int = Field(
        16 * MIB,
        ge=S3_MIN_PART_BYTES,
        description="s3: outputs this big or bigger are uploaded in parts; smaller ones in one "
        "request (held in memory, so this bounds memory too).",
    )
    part_size_bytes: int = Field(
        8 * MIB,
        ge=S3_MIN_PART_BYTES,
        le=5 * 1024 * MIB,
        description="s3: size of one multipart part, read from disk one at a time.",
    )
    request_timeout_s: float = Field(
        60, gt=0, description="s3: connect and read timeout of one request to the store."
    )
    max_attempts: int = Field(
        3,
        ge=1,
        le=10,
        description="s3: attempts per request (retried with backoff on throttling, 5xx and "
        "connection errors).",
    )

    @field_validator("endpoint_url", "public_endpoint_url")
    @classmethod
    def _http_url(cls, value: str) -> str:
        if value and not value.startswith(("http://", "https://")):
            raise ValueError('expected "" or an http:// or https:// URL')
        return value.rstrip("/")

    @field_validator("prefix")
    @classmethod
    def _key_prefix(cls, value: str) -> str:
        # Keys are prefix + "/" + name: slashes at either end are noise, and a ".."
        # segment would only confuse stores that map keys onto file systems.
        value = value.strip("/")
        if ".." in value.split("/"):
            raise ValueError('a key prefix must not contain a ".." segment')
        return value

    @model_validator(mode="after")
    def _s3_needs_bucket(self) -> StorageSettings:
        if self.kind == "s3" and not self.bucket:
            raise ValueError('storage.bucket is required when storage.kind = "s3"')
        return self


class JobsSettings(_Section):
    """Limits and lifetimes of jobs and clips."""

    retention_s: float = Field(
        600, ge=0, description="Ended jobs and their files are deleted this long after they end."
    )
    clip_timeout_s: float = Field(
        300, gt=0, description="Bound on all the FFmpeg work of one clip."
    )
    max_concurrent_clips: int = Field(4, ge=1, description="FFmpeg processes at once.")
    max_clips_per_job: int = Field(50, ge=1, description="Most clips one job may ask for.")
    max_clip_duration_s: float = Field(600, gt=0, description="Longest clip one may ask for.")
    max_job_duration_s: float = Field(
        3600, gt=0, description="Most seconds of clips (summed over its clips) one job may ask for."
    )


class CutSettings(_Section):
    """How clips are cut."""

    default_mode: CutMode = Field("accurate", description="fast | accurate | reencode.")
    ffmpeg_path: str = Field("", description='"" = the FFmpeg bundled with imageio-ffmpeg.')


class ResolverSettings(_Section):
    """The upstream that turns a video id or page URL into stream URLs."""

    kind: Literal["vidfly", "direct"] = Field(
        "vidfly", description="vidfly | direct (direct: only video_url/audio_url requests)."
    )
    base_url: str = Field("https://api.vidfly.ai", description="Vidfly API base URL.")
    timeout_s: float = Field(30, gt=0, description="Timeout of one resolver request.")
    max_height: int = Field(1080, ge=1, description="Prefer the best stream at or below this.")


class SecuritySettings(_Section):
    """Authentication, webhooks, rate limits and the outbound URL guard."""

    api_keys: tuple[str, ...] = Field(
        (),
        description="Empty: no authentication. Else each job and its clips belong to the key "
        "that created it: another key gets 404 for them.",
    )
    admin_keys: tuple[str, ...] = Field(
        (),
        description="Keys that see, stream and delete every job and clip (valid API keys too: "
        "setting only these turns authentication on).",
    )
    webhook_secret: str = Field("", description="HMAC key for webhook signatures.")
    webhook_retry_s: float = Field(86400, ge=0, description="Retry a failed webhook this long.")
    create_rate_per_min: int = Field(60, ge=0, description="Job creations per key per minute.")
    allow_private_sources: bool = Field(
        False, description="Allow media/webhook URLs on loopback or private addresses."
    )

    @property
    def all_keys(self) -> tuple[str, ...]:
        """Every key the API accepts; empty means no authentication and no ownership."""
        return self.api_keys + self.admin_keys


class QueueSettings(_Section):
    """In-process jobs, or the distributed mode over Redis."""

    url: str = Field("", description='"" = in-process; "redis://host:6379/0" = distributed.')
    heartbeat_s: int = Field(
        5,
        ge=2,
        description="A running clip whose worker wrote no heartbeat this long is taken from it "
        "and queued again (its worker beats every heartbeat_s / 5 while the clip lives, "
        "carrying its progress). Worker hosts' clocks must agree to well within this.",
    )
    sweep_interval_s: int = Field(
        1, ge=1, description="How often the workers (one at a time) look for clips of dead workers."
    )
    clip_attempts: int = Field(
        3,
        ge=1,
        description="Attempts per clip when workers die under it; then it fails as interrupted.",
    )
    retry_delay_s: float = Field(
        0.5, ge=0, description="First delay before a clip is retried (doubles, with jitter)."
    )
    max_depth: int = Field(
        0,
        ge=0,
        description="Backpressure: while more clips than this wait in the queue, creating a "
        "job answers 503 with Retry-After; 0 = no limit.",
    )

    @field_validator("url")
    @classmethod
    def _redis_url(cls, value: str) -> str:
        if value and not value.startswith(("redis://", "rediss://", "unix://")):
            raise ValueError('expected "" or a redis://, rediss:// or unix:// URL')
        return value


class Settings(_Section):
    """All of clipservice's settings."""

    server: ServerSettings = ServerSettings()
    storage: StorageSettings = StorageSettings()
    jobs: JobsSettings = JobsSettings()
    cut: CutSettings = CutSettings()
    resolver: ResolverSettings = ResolverSettings()
    security: SecuritySettings = SecuritySettings()
    queue: QueueSettings = QueueSettings()

    @property
    def jobs_dir(self) -> Path:
        return self.storage.data_dir / "jobs"

    @property
    def clips_dir(self) -> Path:
        return self.storage.data_dir / "clips"

    def replace(self, **sections: Mapping[str, Any]) -> Settings:
        """A copy with some keys of some sections changed (validated again)."""
        data = self.model_dump()
        for name, values in sections.items():
            data[name] = {**data[name], **values}
        return Settings.model_validate(data)


def _env_value(raw: str) -> Any:
    # Lists, numbers and booleans are written as JSON; anything that is not
    # valid JSON is taken as a plain string (a path, a URL).
    try:
        return json.loads(raw)
    except ValueError:
        return raw


def _env_overrides(environ: Mapping[str, str]) -> dict[str, dict[str, Any]]:
    out: dict[str, dict[str, Any]] = {}
    for name, raw in environ.items():
        if not name.startswith(ENV_PREFIX):
            continue
        rest = name[len(ENV_PREFIX) :]
        section, sep, key = rest.partition("__")
        if not sep or not section or not key:
            raise ConfigError(f"environment variable {name}: expected {ENV_PREFIX}<SECTION>__<KEY>")
        value = _env_value(raw)
        # A string setting given as a JSON number ("8080" for host) stays a string.
        out.setdefault(section.lower(), {})[key.lower()] = value if value is not None else raw
    return out


def _format_error(err: ValidationError, origin: str) -> str:
    lines = [f"invalid configuration ({origin}):"]
    for e in err.errors():
        key = ".".join(str(p) for p in e["loc"])
        if e["type"] == "extra_forbidden":
            lines.append(f"  {key}: unknown key")
        else:
            lines.append(f"  {key}: {e['msg']} (got {e.get('input')!r})")
    return "\n".join(lines)


def load_settings(
    path: str | Path | None = None,
    environ: Mapping[str, str] | None = None,
    *,
    default_path: str | Path = "config.toml",
) -> Settings:
    """Load settings from ``path`` (or ``./config.toml`` if present) and the environment."""
    environ = os.environ if environ is None else environ
    data: dict[str, Any] = {}
    origin = "built-in defaults"
    file = Path(path) if path is not None else Path(default_path)
    if path is not None or file.is_file():
        try:
            with file.open("rb") as fh:
                data = tomllib.load(fh)
        except FileNotFoundError as exc:
            raise ConfigError(f"config file not found: {file}") from exc
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"config file {file}: not valid TOML: {exc}") from exc
        origin = str(file)
    overrides = _env_overrides(environ)
    for section, values in overrides.items():
        current = data.get(section)
        if current is not None and not isinstance(current, dict):
            raise ConfigError(f"{section}: expected a table")
        data[section] = {**(current or {}), **values}
    if overrides:
        origin += " + environment"
    try:
        return Settings.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(_format_error(exc, origin)) from exc
