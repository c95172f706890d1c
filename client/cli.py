"""`moorctl`: the command-line client, over moord's ZeroMQ API.

Start-up CPU is most of what a `moorctl run --rm` costs (4 parallel run loops are
client-bound), so this entry module imports neither click nor ZeroMQ. A well-formed
`moorctl [global options] run [options] IMAGE ID [ARGS...]` is parsed here, from the same
option tables the click command is built from (client/app.py), and runs without click;
anything else (help, other commands, a malformed or unusual command line) goes to the
click application, which then parses, reports errors and prints help as it always did.
pydantic is never imported on the client side (the daemon validates every request).
"""

from __future__ import annotations

import os
import sys
from typing import Any, NamedTuple

from moord.config.paths import CONFIG_ENV


class Context:
    """Global options, and the client built from them on first use."""

    def __init__(self, config: str | None, address: str | None, namespace: str, timeout: float) -> None:
        self.config = config
        self.address = address
        self.namespace = namespace
        self.timeout = timeout
        self._client: Any = None
        self._state = ""

    @property
    def state_dir(self) -> str:
        """The daemon's state dir (for FIFOs), from the config file."""
        self.client  # noqa: B018  (resolves paths)
        return self._state

    @property
    def client(self) -> Any:
        """The ZeroMQ client (created lazily)."""
        if self._client is None:
            from moord.bus.client import Client
            from moord.config.paths import client_paths

            try:
                state, ipc_dir = client_paths(self.config)
            except (OSError, ValueError) as exc:
                import click

                raise click.ClickException(f"cannot read config: {exc}") from None
            if self.address:
                ipc_dir = self.address
            self._state = state
            self._client = Client(ipc_dir, namespace=self.namespace, timeout=self.timeout)
        return self._client


def fail(exc: Exception) -> None:
    """Print a daemon error the way ctr does and exit 1."""
    code = getattr(exc, "code", "error")
    print(f"moorctl: {code}: {exc}", file=sys.stderr, flush=True)
    sys.exit(1)


def call(ctx: Context, kind: str, payload: dict[str, Any] | None = None, **kw: Any) -> dict[str, Any]:
    """One request; typed errors become a clean message and exit status 1."""
    from moord.messages.errors import MoordError

    try:
        return ctx.client.call(kind, payload or {}, **kw)
    except MoordError as exc:
        fail(exc)
        raise  # unreachable


# -- option tables: the one definition of the root's and `run`'s options ------------------

FLAG = "flag"  # is_flag
TEXT = "text"  # a string
MULTIPLE = "multiple"  # a repeatable string
COUNT = "count"  # an int >= 0 (click.IntRange(min=0))
AMOUNT = "amount"  # a float >= 0 (click.FloatRange(min=0))
SECONDS = "seconds"  # any float


class OptionSpec(NamedTuple):
    """One command-line option, as click.option takes it (app.py builds click options from these)."""

    decls: tuple[str, ...]
    dest: str
    kind: str
    default: Any = None
    help: str | None = None
    show_default: bool = False
    envvar: str | None = None


ROOT_OPTIONS = (
    OptionSpec(("--config", "-c"), "config", TEXT, None, f"moord config file (default /etc/moord/config.toml, or ${CONFIG_ENV})"),
    OptionSpec(("--address", "-a"), "address", TEXT, None, "directory of moord's ipc endpoints", envvar="MOORD_ADDRESS"),
    OptionSpec(("--namespace", "-n"), "namespace", TEXT, "default", None, True, "CONTAINERD_NAMESPACE"),
    OptionSpec(("--timeout",), "timeout", SECONDS, 10.0, "seconds to wait for each reply", True),
)

RUN_OPTIONS = (
    OptionSpec(("--rm",), "remove", FLAG, False, "remove the container after it exits (not with --detach)"),
    OptionSpec(("--detach", "-d"), "detach", FLAG, False, "start the task and return"),
    OptionSpec(("--tty", "-t"), "tty", FLAG, False, "allocate a terminal; the local one goes raw"),
    OptionSpec(("--null-io",), "null_io", FLAG, False, "send all IO to /dev/null"),
    OptionSpec(("--log-uri",), "log_uri", TEXT, "", "stdout and stderr to file:///path instead of this terminal"),
    OptionSpec(("--fifo-dir",), "fifo_dir", TEXT, "", "directory for the stdio FIFOs (default <state>/fifo)"),
    OptionSpec(("--env",), "env", MULTIPLE, (), "environment variable NAME=VALUE"),
    OptionSpec(("--cwd",), "cwd", TEXT, "", "working directory"),
    OptionSpec(("--user", "-u"), "user", TEXT, "", "user[:group] by id or by name (names from the image's /etc/passwd, /etc/group)"),
    OptionSpec(("--hostname",), "hostname", TEXT, ""),
    OptionSpec(("--read-only",), "read_only", FLAG, False, "read-only root filesystem"),
    OptionSpec(("--mount",), "mounts", MULTIPLE, (), "type=bind,src=/host,dst=/path,options=rbind:ro"),
    OptionSpec(("--memory-limit",), "memory_limit", COUNT, 0, "memory limit in bytes"),
    OptionSpec(("--cpus",), "cpus", AMOUNT, 0.0, "CPUs (CFS quota)"),
    OptionSpec(("--pids-limit",), "pids_limit", COUNT, 0, "maximum number of tasks"),
    OptionSpec(("--privileged",), "privileged", FLAG, False, "all capabilities, host devices, no masked paths or seccomp"),
    OptionSpec(("--net-host",), "net_host", FLAG, False, "use the host's network namespace, /etc/hosts and /etc/resolv.conf"),
    OptionSpec(("--seccomp",), "seccomp", FLAG, False, "apply containerd's default seccomp profile (off unless given, as ctr)"),
    OptionSpec(("--seccomp-profile",), "seccomp_profile", TEXT, "", "a seccomp profile (OCI JSON file) instead of the default; needs --seccomp"),
    OptionSpec(("--runtime",), "runtime", TEXT, "io.containerd.runc.v2", "runtime name (io.containerd.crun.v2: crun)", True),
    OptionSpec(("--runc-binary",), "runc_binary", TEXT, "", "OCI runtime binary for this container: runc or crun"),
    OptionSpec(("--snapshotter",), "snapshotter", TEXT, "overlayfs", None, True),
)


# -- `run`: shared by the click command and the fast path -----------------------------------


def run_command(ctx: Context, params: dict[str, Any]) -> None:
    """Run a container from `run`'s parsed options and arguments; exits with its status."""
    from moord.client.run import RunOptions, parse_mount
    from moord.client.run import run as run_container
    from moord.messages.errors import MoordError

    args = params["args"]
    try:
        opts = RunOptions(
            image=params["image"],
            container_id=params["container_id"],
            args=list(args[1:] if args[:1] == ("--",) else args),
            env=list(params["env"]),
            remove=params["remove"],
            detach=params["detach"],
            tty=params["tty"],
            cwd=params["cwd"],
            user=params["user"],
            hostname=params["hostname"],
            read_only=params["read_only"],
            mounts=[parse_mount(m) for m in params["mounts"]],
            memory_limit=params["memory_limit"],
            cpus=params["cpus"],
            pids_limit=params["pids_limit"],
            privileged=params["privileged"],
            net_host=params["net_host"],
            seccomp=params["seccomp"],
            seccomp_profile=load_seccomp_profile(params["seccomp_profile"], params["seccomp"]),
            snapshotter=params["snapshotter"],
            runtime=params["runtime"],
            runtime_binary=params["runc_binary"],
            null_io=params["null_io"],
            log_uri=params["log_uri"],
            fifo_root=params["fifo_dir"] or os.path.join(ctx.state_dir, "fifo"),
        )
        status = run_container(ctx.client, opts)
    except MoordError as exc:
        fail(exc)
        return
    sys.exit(status)


def load_seccomp_profile(path: str, enabled: bool) -> dict[str, Any] | None:
    """`--seccomp-profile PATH` as a dict (None: none given); as ctr, only with --seccomp.

    Reached with a profile only through click (the fast path leaves that option to it).
    """
    if not path:
        return None
    import click

    if not enabled:
        raise click.UsageError("--seccomp-profile needs --seccomp")
    import json

    try:
        with open(path, encoding="utf-8") as fh:
            profile = json.load(fh)
    except (OSError, ValueError) as exc:
        raise click.UsageError(f"cannot read seccomp profile {path}: {exc}") from None
    if not isinstance(profile, dict):
        raise click.UsageError(f"seccomp profile {path} is not a JSON object")
    return profile


def _option_value(spec: OptionSpec, text: str) -> Any:
    """`text` converted as click would, or None where click might judge otherwise (it decides then)."""
    if spec.kind == COUNT:
        return int(text) if text.isascii() and text.isdigit() else None
    if spec.kind in (AMOUNT, SECONDS):
        digits = text.replace(".", "", 1)
        if not (digits.isascii() and digits.isdigit()):
            return None  # signs, exponents, inf, nan: click's conversion and range check apply
        return float(text)
    return text


def _parse_options(argv: list[str], specs: tuple[OptionSpec, ...], values: dict[str, Any]) -> int | None:
    """Parse leading options of `argv` into `values`; the index of the first positional, or
    None when the command line is anything but plain (click must see it)."""
    by_name = {decl: spec for spec in specs for decl in spec.decls}
    i = 0
    while i < len(argv):
        arg = argv[i]
        if arg == "--":
            return i + 1
        if not arg.startswith("-") or arg == "-":
            return i
        name, eq, inline = arg.partition("=")
        spec = by_name.get(name)
        if spec is None or (eq and not name.startswith("--")):
            return None  # --help, unknown options, -xVALUE and -abc clusters: click's to judge
        if spec.kind == FLAG:
            if eq:
                return None
            values[spec.dest] = True
            i += 1
            continue
        if eq:
            text = inline
            i += 1
        else:
            if i + 1 >= len(argv) or argv[i + 1].startswith("-"):
                return None
            text = argv[i + 1]
            i += 2
        value = _option_value(spec, text)
        if value is None:
            return None
        if spec.kind == MULTIPLE:
            values[spec.dest] = (*values[spec.dest], value)
        else:
            values[spec.dest] = value
    return i


def parse_fast_run(argv: list[str]) -> tuple[dict[str, Any], dict[str, Any]] | None:
    """(root options, run parameters) of a plain `run` command line, else None."""
    root: dict[str, Any] = {spec.dest: spec.default for spec in ROOT_OPTIONS}
    for spec in ROOT_OPTIONS:
        from_env = os.environ.get(spec.envvar) if spec.envvar else None
        if from_env:  # click ignores an empty variable
            root[spec.dest] = from_env
    at = _parse_options(argv, ROOT_OPTIONS, root)
    if at is None or argv[at:at + 1] != ["run"]:
        return None
    rest = argv[at + 1:]
    params: dict[str, Any] = {spec.dest: spec.default for spec in RUN_OPTIONS}
    at = _parse_options(rest, RUN_OPTIONS, params)
    if at is None or len(rest) - at < 2 or params["seccomp_profile"]:
        return None
    params["image"], params["container_id"] = rest[at], rest[at + 1]
    params["args"] = tuple(rest[at + 2:])
    return root, params


def main() -> None:
    """moorctl's entry point: a plain `run` without click, every other command through click."""
    # click's shell completion runs off an environment variable (_MOORCTL_COMPLETE): click's.
    completing = any(name.startswith("_") and name.endswith("_COMPLETE") for name in os.environ)
    parsed = None if completing else parse_fast_run(sys.argv[1:])
    if parsed is not None:
        root, params = parsed
        ctx = Context(root["config"], root["address"], root["namespace"], root["timeout"])
        try:
            ctx.client  # noqa: B018  (an unreadable config: click reports it, as always)
        except Exception:  # noqa: BLE001
            parsed = None
        if parsed is not None:
            try:
                run_command(ctx, params)
            except (KeyboardInterrupt, EOFError):
                # As click's standalone mode.
                print("\nAborted!", file=sys.stderr, flush=True)
                sys.exit(1)
            return
    from moord.client.app import main as app

    app()


def __getattr__(name: str) -> Any:
    """The click application's names (`pass_ctx`, groups) for code that imports them from here."""
    if name.startswith("__"):
        raise AttributeError(name)
    from moord.client import app

    return getattr(app, name)
