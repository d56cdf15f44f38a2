"""`mercato cluster up|status|down|env`: the local HA topology (etcd, Patroni, NATS) for labs."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

from mercato.bootstrap import SCRIPT_LOCATION
from mercato.cli.backup import promote_restored
from mercato.cluster import Topology, cluster_down, cluster_status, cluster_up
from mercato.cluster.haproxy import Backend, HAProxySettings, render_config
from mercato.cluster.patroni import create_database_on_primary
from mercato.cluster.shop import SHOP_DATABASE, shop_env, shop_fleet, shop_url, start_shop
from mercato.cluster.topology import TOPOLOGY_FILE
from mercato.kit.storage.migrations import upgrade

app = typer.Typer(
    help="A local HA cluster: etcd, Patroni-managed PostgreSQL, NATS JetStream.", no_args_is_help=True
)
console = Console()
RootOption = Annotated[Path, typer.Option("--root", help="The folder the cluster owns.")]
DEFAULT_ROOT = Path("./var/cluster")


@app.command("up")
def up(
    root: RootOption = DEFAULT_ROOT,
    synchronous: Annotated[
        bool, typer.Option("--synchronous/--asynchronous", help="Patroni synchronous_mode (RPO 0).")
    ] = True,
    backups: Annotated[
        bool, typer.Option("--backups/--no-backups", help="Archive WAL to a pgBackRest repository")
    ] = True,
    shop: Annotated[
        bool, typer.Option("--shop/--no-shop", help="Also start `mercato api` and `mercato worker` on it")
    ] = False,
    api_instances: Annotated[
        int,
        typer.Option("--api-instances", min=1, max=16, help="With --shop: N API processes behind HAProxy"),
    ] = 1,
    balance: Annotated[
        str | None,
        typer.Option(
            help="With --shop: HAProxy's algorithm (roundrobin, leastconn, random(2)); implies HAProxy"
        ),
    ] = None,
) -> None:
    """Start 3 etcd members, 3 PostgreSQL nodes under Patroni and 3 NATS nodes; wait until healthy."""
    started = time.monotonic()
    try:
        with console.status("Starting etcd, Patroni (primary, then replicas) and NATS"):
            topology = cluster_up(root, synchronous_mode=synchronous, backups=backups)
    except (FileExistsError, RuntimeError, PermissionError) as exc:
        console.print(f"[red]cluster up failed:[/red] {exc}")
        raise typer.Exit(1) from exc
    console.print(f"[green]✓[/green] cluster up in {time.monotonic() - started:.1f} s at {topology.root}")
    with console.status("Creating the shop's database and applying migrations on the primary"):
        create_database_on_primary(topology, SHOP_DATABASE)
        upgrade(SCRIPT_LOCATION, topology.database_url(database=SHOP_DATABASE))
    if shop:
        with console.status("Starting mercato api and mercato worker on the cluster"):
            try:
                url = start_shop(topology, api_instances=api_instances, balance=balance)
            except (RuntimeError, ValueError) as exc:
                console.print(f"[red]{exc}[/red]")
                raise typer.Exit(1) from exc
        console.print(f"[green]✓[/green] the shop answers at {url}")
    _print_status(topology)
    _print_env(topology)


@app.command("status")
def status(root: RootOption = DEFAULT_ROOT) -> None:
    """Each node's role, timeline and replication lag; each stream's leader."""
    _print_status(_load(root))


@app.command("roll")
def roll(
    root: RootOption = DEFAULT_ROOT,
    name: Annotated[str | None, typer.Option(help="Only this instance (api0, api1, ...)")] = None,
) -> None:
    """Rolling restart of the API instances behind HAProxy, one at a time: each drains (/readyz 503,
    in-flight requests finish) before it stops, and rejoins with slow start."""
    topology = _load(root)
    fleet = shop_fleet(topology)
    if fleet is None:
        console.print("[red]no balanced API here[/red]: `mercato cluster up --shop --api-instances N`")
        raise typer.Exit(1)
    names = [name] if name else [i.name for i in fleet.instances]
    for each in names:
        started = time.monotonic()
        with console.status(f"Restarting {each} (drain, stop, start, wait until UP)"):
            try:
                fleet.restart(each)
            except (KeyError, RuntimeError) as exc:
                console.print(f"[red]{each}: {exc}[/red]")
                raise typer.Exit(1) from exc
        console.print(f"[green]✓[/green] {each} restarted in {time.monotonic() - started:.1f} s")
    _print_balancer(topology)


@app.command("haproxy-config")
def haproxy_config(
    server: Annotated[
        list[str], typer.Option("--server", help="host:port of one `mercato api` (repeat per instance)")
    ],
    balance: Annotated[str, typer.Option(help="roundrobin, leastconn or random(2)")] = "leastconn",
    bind: Annotated[str, typer.Option(help="host:port HAProxy listens on")] = "127.0.0.1:8080",
    stats_port: Annotated[int, typer.Option(help="Stats page and /metrics port (loopback)")] = 8404,
    runtime_port: Annotated[int, typer.Option(help="Runtime API port (loopback, admin level)")] = 9999,
) -> None:
    """Print the HAProxy configuration Mercato generates (health checks on /readyz, slow start,
    retries of refused connections only) for the given API instances."""
    try:
        backends = [
            Backend(f"api{i}", host, int(port))
            for i, (host, port) in enumerate(s.rsplit(":", 1) for s in server)
        ]
        host, port = bind.rsplit(":", 1)
        text = render_config(
            backends,
            HAProxySettings(balance=balance),
            port=int(port),
            stats_port=stats_port,
            runtime_port=runtime_port,
            host=host,
        )
    except ValueError as exc:
        console.print(f"[red]{exc}[/red]")
        raise typer.Exit(2) from exc
    args = " ".join(f"--server {s}" for s in server)
    print(f"# Generated by `mercato cluster haproxy-config {args} --balance '{balance}'`", end="\n")
    print(text, end="")


@app.command("env")
def env(root: RootOption = DEFAULT_ROOT) -> None:
    """The MERCATO_* variables that point `mercato api` / `mercato worker` at this cluster."""
    _print_env(_load(root), plain=True)


@app.command("down")
def down(
    root: RootOption = DEFAULT_ROOT,
    keep: Annotated[
        bool, typer.Option("--keep", help="Keep the folder (logs, data) for a post-mortem.")
    ] = False,
) -> None:
    """Stop every process (replicas, primary, NATS, etcd) and delete the folder unless --keep."""
    if not cluster_down(root, purge=not keep):
        console.print(f"no cluster at {root}")
        raise typer.Exit(1)
    console.print(f"[green]✓[/green] cluster at {root} stopped{' (files kept)' if keep else ' and removed'}")


@app.command("adopt-restore")
def adopt_restore(
    source: Annotated[
        Path, typer.Option("--from", help="The folder `mercato restore --cluster` restored into")
    ],
    root: RootOption = DEFAULT_ROOT,
    database: Annotated[str, typer.Option("--database", help="The shop's database")] = "mercato",
) -> None:
    """Put a restored copy into service: check the shop's invariants on it (it must still be open on
    its port), then make it the cluster's primary (old data folders kept aside, replicas re-cloned,
    a new Patroni scope), restart the shop if it ran, take a full backup. Runbook: disaster-recovery."""
    _load(root)
    try:
        port = int((source / "postmaster.pid").read_text().splitlines()[3])
    except (FileNotFoundError, IndexError, ValueError) as exc:
        console.print(
            f"[red]{source} is not open[/red]: run `mercato restore --cluster` again (it starts it)"
        )
        raise typer.Exit(1) from exc
    promote_restored(root, source, port, database)


def _load(root: Path) -> Topology:
    try:
        return Topology.load(root)
    except FileNotFoundError as exc:
        console.print(f"[red]no cluster at {root}[/red] (no {TOPOLOGY_FILE}): run `mercato cluster up`")
        raise typer.Exit(1) from exc


def _print_status(topology: Topology) -> None:
    state = cluster_status(topology)
    table = Table(title=f"PostgreSQL (Patroni scope {topology.scope!r}, etcd {state.etcd_up}/3 up)")
    for column in ("node", "port", "role", "state", "timeline", "sync", "lag bytes", "lag s"):
        table.add_column(column)
    for n in state.nodes:
        table.add_row(
            n.name,
            str(n.port),
            n.role,
            n.state,
            str(n.timeline if n.timeline is not None else "-"),
            n.sync_state or "-",
            str(n.lag_bytes if n.lag_bytes is not None else "-"),
            f"{n.lag_s:.3f}" if n.lag_s is not None else "-",
        )
    console.print(table)
    streams = Table(title=f"NATS JetStream ({state.nats_up}/3 nodes up)")
    for column in ("stream", "replicas", "messages", "leader", "followers (current, lag)"):
        streams.add_column(column)
    for s in state.streams:
        followers = ", ".join(
            f"{f['name']} ({'ok' if f['current'] else 'behind'}, {f['lag'] or 0})" for f in s["followers"]
        )
        streams.add_row(s["stream"], str(s["replicas"]), str(s["messages"]), str(s["leader"]), followers)
    console.print(streams)
    _print_balancer(topology)
    url = shop_url(topology)
    if url:
        console.print(f"shop: {url}")


def _print_balancer(topology: Topology) -> None:
    fleet = shop_fleet(topology)
    if fleet is None:
        return
    proxy = fleet.haproxy
    title = f"HAProxy {proxy.url} (balance {proxy.settings.balance}, stats http://127.0.0.1:{proxy.stats_port}/stats)"
    table = Table(title=title)
    for column in ("server", "port", "process", "status", "weight", "in flight", "requests", "5xx", "check"):
        table.add_column(column)
    try:
        stats = {s.name: s for s in proxy.stats()}
    except OSError:
        console.print(f"[red]HAProxy is not answering[/red] ({proxy.folder}/haproxy.log)")
        stats = {}
    running = fleet.running()
    for instance in fleet.instances:
        s = stats.get(instance.name)
        table.add_row(
            instance.name,
            str(instance.port),
            "running" if running[instance.name] else "stopped",
            s.status if s else "-",
            str(s.weight) if s else "-",
            str(s.current_sessions) if s else "-",
            str(s.total_sessions) if s else "-",
            str(s.responses_5xx) if s else "-",
            s.check_status if s else "-",
        )
    console.print(table)


def _print_env(topology: Topology, *, plain: bool = False) -> None:
    lines = [f"{key}='{value}'" for key, value in shop_env(topology).items()]
    if plain:
        for line in lines:
            print(f"export {line}")
    else:
        console.print("Point the shop at it (`eval $(mercato cluster env)`):\n  " + "\n  ".join(lines))
