"""The output of ``mercato lab network``: the table, the figure and the conclusions in words."""

from __future__ import annotations

from pathlib import Path

from rich.table import Table

from mercato.lab.network_model import NetworkReport

# --- output -----------------------------------------------------------------------------------------------


def table(report: NetworkReport) -> Table:
    out = Table(
        title=f"mercato lab network ({report.mode}, loopback; TLS {report.tls.get('version')} "
        f"{report.tls.get('cipher')}; load {report.host['loadavg_before']} → "
        f"{report.host.get('loadavg_after')})"
    )
    for column in (
        "scenario",
        "proto",
        "reqs",
        "conc",
        "conns",
        "p50 ms",
        "p90 ms",
        "p99 ms",
        "mean ms",
        "req/s",
    ):
        out.add_column(column, justify="left" if column in ("scenario", "proto") else "right")
    for s in report.scenarios:
        out.add_row(
            s.name,
            s.protocol or "—",
            str(s.requests),
            str(s.concurrency),
            str(s.connections) if s.connections else "—",
            f"{s.p50_ms:.3f}",
            f"{s.p90_ms:.3f}",
            f"{s.p99_ms:.3f}",
            f"{s.mean_ms:.3f}",
            f"{s.per_s:,.0f}",
        )
    return out


def plot(report: NetworkReport, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")  # files only: no display on a server
    import matplotlib.pyplot as plt

    panels = [
        (("httpx",), "httpx (Mercato's client): p50, whisker to p99", "latency, ms", False),
        (
            ("socket", "handshake"),
            "Raw sockets and handshakes alone: p50, whisker to p99",
            "latency, ms (log)",
            True,
        ),
        (("nagle",), "Nagle: POST as two small writes", "latency, ms (log)", True),
        (("http2",), "Concurrent requests to one server: req/s", "requests/s", False),
    ]
    colours = {"keep-alive": "tab:blue", "new connection": "tab:red", "alone": "tab:gray"}
    fig, axes = plt.subplots(2, 2, figsize=(15, 10))
    for ax, (groups, title, ylabel, log) in zip(axes.flat, panels, strict=True):
        scenarios = [s for s in report.scenarios if s.group in groups]
        if not scenarios:
            ax.set_axis_off()
            ax.set_title(title + " (not measured)", fontsize=10)
            continue
        labels = [s.name.replace(" ", "\n", 1) for s in scenarios]
        colour = [next((c for k, c in colours.items() if k in s.name), "tab:purple") for s in scenarios]
        if groups == ("http2",):
            values = [s.per_s for s in scenarios]
            bars = ax.bar(labels, values, color=colour)
            ax.bar_label(bars, labels=[f"{v:,.0f}/s" for v in values], fontsize=8)
        else:
            values = [s.p50_ms for s in scenarios]
            errors = [[0.0] * len(scenarios), [s.p99_ms - s.p50_ms for s in scenarios]]
            bars = ax.bar(labels, values, yerr=errors, capsize=3, color=colour)
            ax.bar_label(bars, labels=[f"{v:.3g}" for v in values], fontsize=8, label_type="center")
        if log:
            ax.set_yscale("log")
        ax.set_ylabel(ylabel)
        ax.set_title(title, fontsize=10)
        ax.tick_params(axis="x", labelsize=7)
    load = report.host["loadavg_before"]
    fig.suptitle(
        f"mercato lab network: loopback, {report.mode}, {report.host['cpus']} CPUs, "
        f"load average {load[0]:.2f} at start, {report.tls.get('version')} ({report.date})"
    )
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)


def conclusions(report: NetworkReport) -> list[str]:
    c = report.claims()
    lines = []
    if c["new_tcp_connection_adds_ms"] is not None:
        lines.append(
            f"a new TCP connection per request adds {c['new_tcp_connection_adds_ms']} ms at p50 on raw "
            f"sockets ({c['socket_new_over_keepalive_p50']}x keep-alive), "
            f"{c['httpx_new_tcp_connection_adds_ms']} ms with httpx ({c['httpx_new_over_keepalive_p50']}x)"
        )
    if c["new_tls_connection_adds_ms"] is not None:
        lines.append(
            f"a new TLS connection (full handshake) adds {c['new_tls_connection_adds_ms']} ms at p50 on raw "
            f"sockets ({c['socket_tls_new_over_keepalive_p50']}x TLS keep-alive), "
            f"{c['httpx_new_tls_connection_adds_ms']} ms with httpx "
            f"({c['httpx_tls_new_over_keepalive_p50']}x)"
        )
    if c["tls_handshake_over_tcp_connect_p50"] is not None:
        lines.append(
            f"a TLS handshake alone costs {c['tls_handshake_over_tcp_connect_p50']}x a TCP connect()"
        )
    if c["h2_over_h1_one_connection_per_s"] is not None:
        lines.append(
            f"HTTP/2 over one connection: {c['h2_over_h1_one_connection_per_s']}x the req/s of HTTP/1.1 over "
            f"one connection, {c['h2_one_over_h1_n_connections_per_s']}x HTTP/1.1 over N connections"
        )
    if c["nagle_over_nodelay_p50"] is not None:
        lines.append(f"Nagle on, two small writes: p50 {c['nagle_over_nodelay_p50']}x TCP_NODELAY")
    return lines
