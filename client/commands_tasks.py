"""moorctl tasks ps/pause/resume/metrics/exec/checkpoint/restore (ctr's task subcommands).

Attached to the `tasks` group of client/app.py on import; imports only click up front.
"""

from __future__ import annotations

import json
from typing import Any

import click

from moord.client.app import Context, call, fail, pass_ctx, tasks


@tasks.command("ps")
@click.argument("container_id")
@pass_ctx
def tasks_ps(ctx: Context, container_id: str) -> None:
    """List the processes of a task."""
    from moord.client.table import print_table

    reply = call(ctx, "tasks.pids", {"container_id": container_id})
    print_table(("PID", "EXEC"), [(p["pid"], p.get("exec_id") or "-") for p in reply["processes"]])


@tasks.command("pause")
@click.argument("container_id")
@pass_ctx
def tasks_pause(ctx: Context, container_id: str) -> None:
    """Freeze a task."""
    call(ctx, "tasks.pause", {"container_id": container_id})


@tasks.command("resume")
@click.argument("container_id")
@pass_ctx
def tasks_resume(ctx: Context, container_id: str) -> None:
    """Thaw a paused task."""
    call(ctx, "tasks.resume", {"container_id": container_id})


@tasks.command("metrics")
@click.option("--format", "fmt", type=click.Choice(["table", "json"]), default="table", show_default=True)
@click.argument("container_id")
@pass_ctx
def tasks_metrics(ctx: Context, fmt: str, container_id: str) -> None:
    """Show a task's cgroup statistics."""
    from moord.client.table import human_size, print_table

    reply = call(ctx, "tasks.metrics", {"container_id": container_id})
    if fmt == "json":
        click.echo(json.dumps(reply, indent=2))
        return
    memory, cpu, pids = reply["memory"], reply["cpu"], reply["pids"]
    print_table(
        ("ID", "CPU (s)", "MEMORY", "LIMIT", "PIDS", "OOM KILLS"),
        [(
            container_id,
            f"{cpu['usage_total'] / 1e9:.3f}",
            human_size(memory["usage"]),
            human_size(memory["limit"]) if memory["limit"] else "-",
            f"{pids['current']}/{pids['limit'] or '-'}",
            memory["oom_kills"],
        )],
    )


def _container_spec(ctx: Context, container_id: str) -> tuple[dict[str, Any], dict[str, Any]]:
    """The container record and its OCI spec."""
    container = call(ctx, "containers.get", {"id": container_id})["container"]
    try:
        spec = json.loads(container.get("spec") or b"{}")
    except ValueError:
        raise click.ClickException("the container's spec is not JSON") from None
    if not isinstance(spec, dict):
        raise click.ClickException("the container's spec is not a JSON object")
    return container, spec


def _fifo_root(ctx: Context, fifo_dir: str) -> str:
    return fifo_dir or f"{ctx.state_dir}/fifo"


@tasks.command("start")
@click.option("--detach", "-d", is_flag=True, help="start the task and return")
@click.option("--tty", "-t", is_flag=True, help="with a terminal even if the container's spec has none")
@click.option("--null-io", is_flag=True, help="send all IO to /dev/null")
@click.option("--log-uri", default="", help="stdout and stderr to file:///path")
@click.option("--fifo-dir", default="", help="directory for the stdio FIFOs (default <state>/fifo)")
@click.argument("container_id")
@pass_ctx
def tasks_start(
    ctx: Context, detach: bool, tty: bool, null_io: bool, log_uri: str, fifo_dir: str, container_id: str
) -> None:
    """Create and start the task of an existing container (e.g. one `run` kept); exit code is the task's.

    As `ctr tasks start`: the terminal comes from the container's spec; attached, the task
    is deleted once it exits (the container stays).
    """
    from moord.client.run import TaskIO, run_task
    from moord.messages.errors import MoordError

    container, spec = _container_spec(ctx, container_id)
    terminal = tty or bool((spec.get("process") or {}).get("terminal"))
    try:
        task_io = TaskIO(tty=terminal, detach=detach, null_io=null_io, log_uri=log_uri, fifo_root=_fifo_root(ctx, fifo_dir))
        rootfs: list[dict[str, Any]] = []
        if container.get("snapshot_key"):
            rootfs = ctx.client.call(
                "snapshots.mounts", {"snapshotter": container.get("snapshotter") or "overlayfs", "key": container["snapshot_key"]}
            )["mounts"]
        status = run_task(ctx.client, container_id, rootfs, task_io)
    except MoordError as exc:
        fail(exc)
        return
    raise SystemExit(status)


@tasks.command("attach")
@click.argument("container_id")
@pass_ctx
def tasks_attach(ctx: Context, container_id: str) -> None:
    """Attach to a running task's stdio (FIFOs of a `run -d -t`, or of another moorctl); exit code is the task's.

    As `ctr tasks attach`: with a terminal the local one goes raw and follows window size,
    and SIGINT/SIGTERM/SIGHUP to moorctl detach it (the task keeps running, exit 128+N);
    without one, signals are passed to the task. Once the task exits it is deleted.
    """
    from moord.client.run import delete_task
    from moord.client.terminal import FifoSet, Session
    from moord.messages.errors import MoordError

    try:
        process = ctx.client.call("tasks.get", {"container_id": container_id})["process"]
        tty = bool(process.get("terminal"))
        try:
            fifos = FifoSet.attach(process.get("stdin", ""), process.get("stdout", ""), process.get("stderr", ""))
        except (OSError, ValueError) as exc:
            raise click.ClickException(f"cannot attach to {container_id}: {exc}") from None
        try:
            session = Session(
                ctx.client, container_id, fifos, tty=tty, close_io_on_eof=False,
                forward_signals=not tty, detach_signals=tty,
            )
            status = session.run(None)
        finally:
            fifos.close()
        if not session.detached_by:
            delete_task(ctx.client, container_id, f"{ctx.state_dir}/fifo")
    except MoordError as exc:
        fail(exc)
        return
    raise SystemExit(status)


@tasks.command("exec", context_settings={"allow_interspersed_args": False})
@click.option("--exec-id", required=True, help="id of the new process")
@click.option("--tty", "-t", is_flag=True, help="allocate a terminal; the local one goes raw")
@click.option("--cwd", default="", help="working directory (default: the container's)")
@click.option("--env", "-e", "env", multiple=True, help="extra KEY=VALUE")
@click.option("--user", "-u", default="", help="uid[:gid] or name[:group] (default: the container's user)")
@click.option("--detach", "-d", is_flag=True, help="start it and return")
@click.option("--null-io", is_flag=True, help="send all IO to /dev/null")
@click.option("--log-uri", default="", help="stdout and stderr to file:///path")
@click.option("--fifo-dir", default="", help="directory for the stdio FIFOs (default <state>/fifo)")
@click.argument("container_id")
@click.argument("args", nargs=-1, required=True)
@pass_ctx
def tasks_exec(
    ctx: Context, exec_id: str, tty: bool, cwd: str, env: tuple[str, ...], user: str, detach: bool, null_io: bool,
    log_uri: str, fifo_dir: str, container_id: str, args: tuple[str, ...],
) -> None:
    """Run another process in a running task (its spec starts from the container's process).

    As `ctr tasks exec`: stdin is forwarded (EOF closes it), signals go to the process,
    and the process is deleted once it exits; its exit code is moorctl's.
    """
    from moord.client.run import TaskIO, discard_task
    from moord.client.terminal import FifoSet, Session
    from moord.messages.errors import MoordError
    from moord.oci.spec import merge_env, resolve_user

    _, spec = _container_spec(ctx, container_id)
    process: dict[str, Any] = dict(spec.get("process") or {})
    process["args"] = list(args[1:] if args[:1] == ("--",) else args)
    process["terminal"] = tty
    process["env"] = merge_env(process.get("env") or [], list(env) + (["TERM=xterm"] if tty else []))
    if cwd:
        process["cwd"] = cwd
    base = {"container_id": container_id, "exec_id": exec_id}
    fifos: FifoSet | None = None
    try:
        if user:
            # Names are looked up in the running container's own /etc/passwd and /etc/group.
            init_pid = ctx.client.call("tasks.get", {"container_id": container_id})["process"]["pid"]
            uid, gid, extra = resolve_user(user, f"/proc/{init_pid}/root")
            process["user"] = {"uid": uid, "gid": gid, "additionalGids": extra}
        task_io = TaskIO(tty=tty, detach=detach, null_io=null_io, log_uri=log_uri, fifo_root=_fifo_root(ctx, fifo_dir))
        fifos = task_io.fifos(exec_id)
        ctx.client.call("tasks.exec", {**base, "spec": process, "terminal": tty, **task_io.paths(fifos)})
        if detach:
            ctx.client.call("tasks.start", base)
            if fifos is not None:
                fifos.close()  # kept on disk for an attach; `tasks rm --exec-id` removes them
                fifos = None
            return
        try:
            session = Session(ctx.client, container_id, fifos or FifoSet(), exec_id=exec_id, tty=tty)
            status = session.run(lambda: ctx.client.call("tasks.start", base))
        except BaseException:
            discard_task(ctx.client, container_id, exec_id)
            raise
        ctx.client.call("tasks.delete", base)
    except MoordError as exc:
        if fifos is not None:
            fifos.close(remove=True)
            fifos = None
        fail(exc)
        return
    finally:
        if fifos is not None:
            fifos.close(remove=True)
    raise SystemExit(status)


# CRIU writes (or reads) the container's whole memory: allow more than a usual call.
CHECKPOINT_CALL_TIMEOUT = 150.0


@tasks.command("checkpoint")
@click.option("--exit", "exit_after", is_flag=True, help="stop the container after the checkpoint")
@click.option("--image-path", default="", help="directory for the CRIU image (default: a new one under the daemon's root)")
@click.option("--work-path", default="", help="keep CRIU's work files and logs in this directory")
@click.option("--tcp-established", is_flag=True, help="allow open TCP connections")
@click.option("--ext-unix-sk", is_flag=True, help="allow external unix sockets")
@click.option("--shell-job", is_flag=True, help="allow a terminal (shell job)")
@click.option("--file-locks", is_flag=True, help="allow file locks")
@click.argument("container_id")
@pass_ctx
def tasks_checkpoint(
    ctx: Context,
    exit_after: bool,
    image_path: str,
    work_path: str,
    tcp_established: bool,
    ext_unix_sk: bool,
    shell_job: bool,
    file_locks: bool,
    container_id: str,
) -> None:
    """Checkpoint a running task with CRIU (as `ctr tasks checkpoint`); prints the image path when not given."""
    import os

    payload = {
        "container_id": container_id,
        "path": os.path.abspath(image_path) if image_path else "",
        "work_path": os.path.abspath(work_path) if work_path else "",
        "exit": exit_after,
        "open_tcp": tcp_established,
        "external_unix_sockets": ext_unix_sk,
        "terminal": shell_job,
        "file_locks": file_locks,
    }
    reply = call(ctx, "tasks.checkpoint", payload, timeout=CHECKPOINT_CALL_TIMEOUT)
    if not image_path:
        click.echo(reply["path"])


@tasks.command("restore")
@click.option("--image-path", required=True, help="the CRIU image a `tasks checkpoint` wrote")
@click.option("--log-uri", default="", help="stdout and stderr to file:///path (default: /dev/null)")
@click.argument("container_id")
@pass_ctx
def tasks_restore(ctx: Context, image_path: str, log_uri: str, container_id: str) -> None:
    """Create the task of an existing container from a checkpoint and start it, detached.

    containerd restores at start (`runc restore --detach`); the task is RUNNING once this returns.
    The container's rootfs must be the one checkpointed (its snapshot is reused as is).
    """
    import os

    container, _ = _container_spec(ctx, container_id)
    rootfs: list[dict[str, Any]] = []
    if container.get("snapshot_key"):
        rootfs = call(
            ctx, "snapshots.mounts", {"snapshotter": container.get("snapshotter") or "overlayfs", "key": container["snapshot_key"]}
        )["mounts"]
    payload = {
        "container_id": container_id,
        "rootfs": rootfs,
        "checkpoint": os.path.abspath(image_path),
        "stdout": log_uri,
        "stderr": log_uri,
    }
    from moord.messages.errors import MoordError

    call(ctx, "tasks.create", payload)
    try:
        reply = ctx.client.call("tasks.start", {"container_id": container_id}, timeout=CHECKPOINT_CALL_TIMEOUT)
    except MoordError as exc:
        # A failed restore leaves nothing running: do not leave its created task behind either.
        try:
            ctx.client.call("tasks.delete", {"container_id": container_id})
        except MoordError:
            pass
        fail(exc)
        return
    click.echo(reply["pid"])
