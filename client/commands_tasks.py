"""moorctl tasks ps/pause/resume/metrics/exec (ctr's task subcommands).

Attached to the `tasks` group of client/cli.py on import; imports only click up front.
"""

from __future__ import annotations

import json
import threading
from typing import Any

import click

from moord.client.cli import Context, call, pass_ctx, tasks


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


@tasks.command("exec", context_settings={"allow_interspersed_args": False})
@click.option("--exec-id", required=True, help="id of the new process")
@click.option("--cwd", default="", help="working directory (default: the container's)")
@click.option("--env", "-e", "env", multiple=True, help="extra KEY=VALUE")
@click.option("--user", "-u", default="", help="uid[:gid] (default: the container's user)")
@click.option("--detach", "-d", is_flag=True, help="start it and return")
@click.argument("container_id")
@click.argument("args", nargs=-1, required=True)
@pass_ctx
def tasks_exec(
    ctx: Context, exec_id: str, cwd: str, env: tuple[str, ...], user: str, detach: bool, container_id: str,
    args: tuple[str, ...],
) -> None:
    """Run another process in a running task (its spec starts from the container's process)."""
    from moord.client.run import Fifos
    from moord.oci.spec import merge_env

    container = call(ctx, "containers.get", {"id": container_id})["container"]
    try:
        spec = json.loads(container.get("spec") or b"{}")
    except ValueError:
        raise click.ClickException("the container's spec is not JSON") from None
    process: dict[str, Any] = dict(spec.get("process") or {})
    process["args"] = list(args)
    process["terminal"] = False
    process["env"] = merge_env(process.get("env") or [], list(env))
    if cwd:
        process["cwd"] = cwd
    if user:
        uid, _, gid = user.partition(":")
        if not uid.isdigit() or (gid and not gid.isdigit()):
            raise click.BadParameter("--user takes numeric uid[:gid]")
        process["user"] = {"uid": int(uid), "gid": int(gid or 0)}
    base = {"container_id": container_id, "exec_id": exec_id}
    if detach:
        call(ctx, "tasks.exec", {**base, "spec": process})
        call(ctx, "tasks.start", base)
        return
    fifos = Fifos(f"{ctx.state_dir}/fifo", exec_id)
    try:
        call(ctx, "tasks.exec", {**base, "spec": process, "stdout": fifos.stdout, "stderr": fifos.stderr})
        box: dict[str, Any] = {}
        waiter = threading.Thread(
            target=lambda: box.update(call(ctx, "tasks.wait", base, timeout=7 * 24 * 3600.0)), daemon=True
        )
        waiter.start()
        call(ctx, "tasks.start", base)
        fifos.pump()
        waiter.join()
        call(ctx, "tasks.delete", base)
    finally:
        fifos.close()
    raise SystemExit(int(box.get("exit_status", 255)))
