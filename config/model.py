"""The daemon's configuration: a TOML file validated by pydantic.

Keys follow containerd's config.toml where one exists (`root`, `state`, `[grpc]
address`, `[debug] level`); subsystem settings live under `[plugins.<subsystem>]`.
"""

from __future__ import annotations

import os
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from moord.config.paths import DEFAULT_ROOT, DEFAULT_STATE, grpc_address_for, ipc_dir_for, read_toml


class Section(BaseModel):
    """A config table: unknown keys are refused so typos do not pass silently."""

    model_config = ConfigDict(extra="forbid")


class GrpcConfig(Section):
    """The gRPC gateway's socket."""

    address: str = ""
    uid: int = 0
    gid: int = 0
    max_recv_message_size: int = 16 * 1024 * 1024
    max_send_message_size: int = 16 * 1024 * 1024


class ZmqConfig(Section):
    """The ZeroMQ endpoints' directory (default <state>/ipc)."""

    ipc_dir: str = ""


class DebugConfig(Section):
    """Logging."""

    level: Literal["trace", "debug", "info", "warn", "warning", "error", "fatal", "panic"] = "info"


class SupervisorConfig(Section):
    """The supervision tree: OTP strategy, restart intensity and backoff."""

    strategy: Literal["one_for_one", "rest_for_one"] = "one_for_one"
    max_restarts: int = Field(default=10, ge=0)
    max_seconds: float = Field(default=30.0, gt=0)
    backoff_initial: float = Field(default=0.05, ge=0)
    backoff_max: float = Field(default=5.0, ge=0)
    backoff_reset_after: float = Field(default=10.0, ge=0)
    ready_timeout: float = Field(default=30.0, gt=0)
    shutdown_timeout: float = Field(default=5.0, gt=0)


class SnapshotterConfig(Section):
    """Snapshotters."""

    default: Literal["overlayfs", "native"] = "overlayfs"


class RuntimeConfig(Section):
    """Tasks: the OCI runtime and its shims."""

    default_runtime: str = "io.containerd.runc.v2"
    binary: str = "runc"
    shim_debug: bool = False


class GcConfig(Section):
    """Garbage collection: containerd's scheduler knobs (gc/scheduler), plus an expiry timer.

    Durations are seconds. A collection runs `schedule_delay` after enough deletions
    (`deletion_threshold`, 0: any) or mutations (`mutation_threshold`), at most as often
    as keeps writes paused for `pause_threshold` of the time. containerd never collects
    on an idle daemon; with `reap_expired` a timer also collects when a lease or ingest
    expires.
    """

    pause_threshold: float = Field(default=0.02, ge=0.0, le=0.5)
    deletion_threshold: int = Field(default=0, ge=0)
    mutation_threshold: int = Field(default=100, ge=0)
    schedule_delay: float = Field(default=0.0, ge=0.0)
    startup_delay: float = Field(default=0.1, ge=0.0)
    reap_expired: bool = True


class RegistryConfig(Section):
    """Registries: per-host settings in containerd's hosts.toml layout (`<config_path>/<host>/hosts.toml`).

    `timeout` bounds connecting and every read (a stalled body fails after it); failed
    connections, 5xx and 429 are retried `retries` times with exponential backoff from
    `retry_backoff` seconds. `auths` holds credentials per registry host, as containerd's
    CRI `registry.configs."host".auth`: `[plugins.registry.auths."host:port"] username,
    password` (used for Basic auth and to ask bearer token servers).
    """

    config_path: str = ""
    max_concurrent_downloads: int = Field(default=3, ge=1, le=64)
    timeout: float = Field(default=30.0, gt=0, le=3600)
    retries: int = Field(default=3, ge=0, le=20)
    retry_backoff: float = Field(default=0.2, ge=0, le=60)
    auths: dict[str, dict[str, str]] = Field(default_factory=dict)

    @field_validator("auths")
    @classmethod
    def _credentials_only(cls, value: dict[str, dict[str, str]]) -> dict[str, dict[str, str]]:
        for host, entry in value.items():
            unknown = set(entry) - {"username", "password"}
            if unknown:
                raise ValueError(f"auths.{host}: unknown key(s) {sorted(unknown)} (use username, password)")
            if "username" not in entry:
                raise ValueError(f"auths.{host}: username is required")
        return value


class PluginsConfig(Section):
    """Per-subsystem settings."""

    snapshotter: SnapshotterConfig = Field(default_factory=SnapshotterConfig)
    runtime: RuntimeConfig = Field(default_factory=RuntimeConfig)
    gc: GcConfig = Field(default_factory=GcConfig)
    registry: RegistryConfig = Field(default_factory=RegistryConfig)


class Config(Section):
    """The whole daemon configuration."""

    version: int = 1
    root: str = DEFAULT_ROOT
    state: str = DEFAULT_STATE
    grpc: GrpcConfig = Field(default_factory=GrpcConfig)
    zmq: ZmqConfig = Field(default_factory=ZmqConfig)
    debug: DebugConfig = Field(default_factory=DebugConfig)
    supervisor: SupervisorConfig = Field(default_factory=SupervisorConfig)
    plugins: PluginsConfig = Field(default_factory=PluginsConfig)

    @field_validator("root", "state")
    @classmethod
    def _absolute(cls, value: str) -> str:
        if not os.path.isabs(value):
            raise ValueError(f"must be an absolute path, got {value!r}")
        return os.path.normpath(value)

    @field_validator("version")
    @classmethod
    def _known_version(cls, value: int) -> int:
        if value != 1:
            raise ValueError(f"config version {value} is not supported (want 1)")
        return value

    @property
    def ipc_dir(self) -> str:
        """Directory of the ZeroMQ endpoints."""
        return ipc_dir_for(self.state, self.zmq.ipc_dir)

    @property
    def grpc_address(self) -> str:
        """Path of the gRPC socket."""
        return grpc_address_for(self.state, self.grpc.address)


class ConfigError(Exception):
    """The config file is unreadable or invalid; the message names the key and why."""


def load_config(path: str) -> Config:
    """Read and validate a config file (the default path may be absent: defaults apply)."""
    try:
        raw = read_toml(path)
    except FileNotFoundError:
        raise ConfigError(f"{path}: no such file") from None
    except OSError as exc:
        raise ConfigError(f"{path}: {exc.strerror}") from None
    except ValueError as exc:  # tomllib.TOMLDecodeError
        raise ConfigError(f"{path}: not valid TOML: {exc}") from None
    try:
        return Config.model_validate(raw)
    except ValidationError as exc:
        lines = []
        for err in exc.errors():
            key = ".".join(str(p) for p in err["loc"])
            lines.append(f"{path}: key {key!r}: {err['msg']}")
        raise ConfigError("\n".join(lines)) from None


def dump_toml(config: Config) -> str:
    """The config as TOML text."""
    import tomli_w

    return tomli_w.dumps(config.model_dump())
