"""Default locations, and how a client finds the daemon from a config file.

Kept free of pydantic: moorctl and scripts read the file with tomllib alone.
"""

from __future__ import annotations

import os
import tomllib
from typing import Any

DEFAULT_CONFIG_PATH = "/etc/moord/config.toml"
DEFAULT_ROOT = "/var/lib/moord"
DEFAULT_STATE = "/run/moord"
CONFIG_ENV = "MOORD_CONFIG"


def ipc_dir_for(state: str, ipc_dir: str = "") -> str:
    """The directory holding the ZeroMQ endpoints: `[zmq] ipc_dir`, else <state>/ipc."""
    return ipc_dir or os.path.join(state, "ipc")


def grpc_address_for(state: str, address: str = "") -> str:
    """The gRPC socket: `[grpc] address`, else <state>/moord.sock."""
    return address or os.path.join(state, "moord.sock")


def config_path(explicit: str | None = None) -> str:
    """The config file in force: explicit, else $MOORD_CONFIG, else the default path."""
    return explicit or os.environ.get(CONFIG_ENV) or DEFAULT_CONFIG_PATH


def read_toml(path: str) -> dict[str, Any]:
    """The file's TOML as a dict; a missing default file reads as empty."""
    try:
        with open(path, "rb") as fh:
            return tomllib.load(fh)
    except FileNotFoundError:
        if path == DEFAULT_CONFIG_PATH:
            return {}
        raise


def client_paths(explicit_config: str | None = None) -> tuple[str, str]:
    """(state dir, ipc dir) a client uses, read cheaply from the config file."""
    raw = read_toml(config_path(explicit_config))
    state = raw.get("state") if isinstance(raw.get("state"), str) else DEFAULT_STATE
    zmq_section = raw.get("zmq") if isinstance(raw.get("zmq"), dict) else {}
    ipc = zmq_section.get("ipc_dir", "")
    return state, ipc_dir_for(state, ipc if isinstance(ipc, str) else "")
