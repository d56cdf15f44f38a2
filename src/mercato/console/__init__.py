"""The operator console: `/console`, a live view of the running shop for staff (ADR 0050).

Server side: a session cookie made from an existing staff access token, one SSE stream of snapshots
(processes and health, sagas with their step history, breakers, stream lag and dead letters, real-time
connections, SLO burn, the simulators' fault settings), a few actions (replay a dead letter, set a
simulator's faults) and the lab catalogue. Client side: one HTML page and a small vanilla JS file,
shipped in this package (no CDN, no build step), drawing its charts in SVG.
"""

from mercato.console.app import create_app, install_console

__all__ = ["create_app", "install_console"]
