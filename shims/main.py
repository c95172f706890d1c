"""`moord-shim`: the shim's command line.

  moord-shim zygote --fd N --parent PID   the pre-loaded forker the runtime actor starts
  moord-shim spawn --namespace NS --id ID --state DIR [--runtime runc] [--ipc-dir DIR]
                                          start one detached shim for an existing bundle
                                          and print its pid (for scripts and debugging)
"""

from __future__ import annotations

import argparse
import importlib
import json
import sys

from moord.shims.shim import ShimConfig
from moord.shims.zygote import serve_zygote, spawn_detached

# Loaded before the zygote forks, so every shim shares these pages copy-on-write.
PRELOAD = (
    "moord.bus.events",
    "moord.linux.mount",
    "setproctitle",
    "faulthandler",
    "termios",
    "logging",
)


def main(argv: list[str] | None = None) -> int:
    """Entry point of the `moord-shim` console script."""
    parser = argparse.ArgumentParser(prog="moord-shim", description="moord's per-container shim")
    sub = parser.add_subparsers(dest="command", required=True)
    zygote = sub.add_parser("zygote", help="serve spawn requests on an inherited socket")
    zygote.add_argument("--fd", type=int, required=True)
    zygote.add_argument("--parent", type=int, required=True)
    spawn = sub.add_parser("spawn", help="start one detached shim for an existing bundle")
    spawn.add_argument("--namespace", required=True)
    spawn.add_argument("--id", required=True)
    spawn.add_argument("--state", required=True)
    spawn.add_argument("--runtime", default="runc")
    spawn.add_argument("--ipc-dir", default="")
    spawn.add_argument("--debug", action="store_true")
    args = parser.parse_args(argv)
    if args.command == "zygote":
        for module in PRELOAD:
            try:
                importlib.import_module(module)
            except ImportError:
                pass  # optional until its subsystem lands; imported on use instead
        serve_zygote(args.fd, args.parent)
        return 0
    from moord.messages.base import validate_identifier

    validate_identifier(args.namespace)
    validate_identifier(args.id)
    config = ShimConfig(
        namespace=args.namespace,
        container_id=args.id,
        state=args.state,
        runtime=args.runtime,
        ipc_dir=args.ipc_dir or f"{args.state}/ipc",
        debug=args.debug,
    )
    pid, ready_ms, _ = spawn_detached(config)
    print(json.dumps({"pid": pid, "ready_ms": round(ready_ms, 2)}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
