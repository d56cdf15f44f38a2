"""Run a ``mercato`` command with a database statement counter attached (the checkout bench's servers).

``python -m mercato.bench.checkout_probe --counter-port N -- api|worker|up [args...]`` installs
SQLAlchemy engine listeners, serves the counts as JSON on ``127.0.0.1:N`` (a daemon thread, so the
measured event loop does no extra work to answer), then runs ``mercato.cli.main`` exactly as the
``mercato`` script would. The command itself is untouched: only statements are counted.

What is counted, per phase:

- **statements**: every ``before_cursor_execute`` (one SQL statement sent; on PostgreSQL one network
  round trip with asyncpg's cached prepared statements, on SQLite one hop to aiosqlite's thread);
- **transactions**: every commit or rollback of a connection that executed at least one statement
  (not counted for autocommit connections, which send no BEGIN/COMMIT).
  On asyncpg each such transaction adds two round trips (``BEGIN``, sent lazily before the first
  statement, and ``COMMIT``/``ROLLBACK``); an empty one adds none.

The phase of a statement is, in this order: the HTTP request it serves, recognised by the request id
the bench sends (``<tag>-<i>.cart`` for the cart PUT, ``<tag>-<i>`` for the checkout POST); the saga
runner's current move (set by thin wrappers around `SagaStore`/`SagaRunner` methods, below); the
periodic job whose task runs it (``job:<name>``); else ``other``.

``BENCH_STATEMENT_TRACE=<file>`` in the bench's environment also appends one line per statement
(request id, phase, the statement, ``BEGIN`` marking a transaction's first) and per commit or
rollback: the way to read which statements one checkout costs.
"""

from __future__ import annotations

import contextvars
import json
import os
import runpy
import sys
import threading
from collections import Counter
from collections.abc import Awaitable, Callable
from functools import wraps
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from sqlalchemy import event
from sqlalchemy.engine import Connection, Engine

from mercato.bench.client import ALLOWED_HOST
from mercato.kit.messaging.sql_log import add_driver_listener
from mercato.kit.observability import request_id_var
from mercato.kit.sagas.runner import SagaRunner
from mercato.kit.sagas.store import SagaStore
from mercato.kit.storage.statements_in_tx import DRIVER_STATEMENTS_IN_TX

_phase: contextvars.ContextVar[str | None] = contextvars.ContextVar("bench_phase", default=None)
_DIRTY = "_bench_statements_in_tx"
_PROVIDER_DATABASES = ("psp.db", "carrier.db")


class StatementCounter:
    """Statements and non-empty transactions per phase; safe to snapshot from another thread."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.statements: Counter[str] = Counter()
        self.transactions: Counter[str] = Counter()
        self.verbs: Counter[str] = Counter()

    def statement(self, phase: str, sql: str) -> None:
        verb = sql.lstrip().split(None, 1)[0].upper() if sql.strip() else "?"
        with self._lock:
            self.statements[phase] += 1
            self.verbs[f"{phase}|{verb}"] += 1

    def transaction(self, phase: str) -> None:
        with self._lock:
            self.transactions[phase] += 1

    def snapshot(self) -> dict[str, dict[str, int]]:
        with self._lock:
            return {
                "statements": dict(self.statements),
                "transactions": dict(self.transactions),
                "verbs": dict(self.verbs),
            }


COUNTER = StatementCounter()


def phase_of_request(rid: str | None) -> str | None:
    """``api:PUT cart`` / ``api:POST checkout`` for the bench's own requests, ``api:other`` otherwise."""
    if not rid:  # the context variable's default is ""
        return None
    if rid.startswith("ck"):
        return "api:PUT cart line" if rid.endswith(".cart") else "api:POST checkout"
    return "api:other"


def current_phase(database: str | None = None) -> str:
    # The simulated providers keep their own SQLite files (in the same process under `mercato up`).
    if database is not None and database.endswith(_PROVIDER_DATABASES):
        return "provider (own database)"
    by_request = phase_of_request(request_id_var.get())
    if by_request is not None:
        return by_request
    marked = _phase.get()
    if marked is not None:
        return marked
    try:
        import asyncio

        task = asyncio.current_task()
    except RuntimeError:
        task = None
    name = task.get_name() if task is not None else ""
    return name if name.startswith("job:") else "other"


_TRACE = os.environ.get("BENCH_STATEMENT_TRACE")
_TRACE_FILE = open(_TRACE, "a", buffering=1) if _TRACE else None  # noqa: SIM115 - the process's lifetime


def _before_cursor_execute(
    conn: Connection, _cursor: Any, statement: str, _params: Any, _context: Any, _many: bool
) -> None:
    phase = current_phase(conn.engine.url.database)
    if _TRACE_FILE is not None:
        # One line per statement, to read which statements one checkout costs (a diagnosis aid).
        begins = "" if conn.info.get(_DIRTY) else "BEGIN "
        flat = " ".join(statement.split())[:300]
        _TRACE_FILE.write(f"{request_id_var.get() or '-'}\t{phase}\t{begins}{flat}\n")
    conn.info[_DIRTY] = True
    COUNTER.statement(phase, statement)


def _end_transaction(conn: Connection) -> None:
    if conn.get_execution_options().get("isolation_level") == "AUTOCOMMIT":
        # Each statement committed on its own: no BEGIN/COMMIT was sent, so no transaction to count.
        conn.info.pop(_DIRTY, None)
        conn.info.pop(DRIVER_STATEMENTS_IN_TX, None)
        return
    # A transaction whose statements went (some or all) on the driver path under the connection.
    if conn.info.pop(_DIRTY, False) | conn.info.pop(DRIVER_STATEMENTS_IN_TX, False):
        if _TRACE_FILE is not None:
            _TRACE_FILE.write(f"{request_id_var.get() or '-'}\t{current_phase()}\tCOMMIT/ROLLBACK\n")
        COUNTER.transaction(current_phase(conn.engine.url.database))


def _driver_path(sql: str | None) -> None:
    """The SQL stream's statements sent on the driver's connection (no engine events for them)."""
    phase = current_phase()
    if sql is None:
        COUNTER.transaction(phase)
    else:
        COUNTER.statement(phase, sql)


def install_listeners() -> None:
    add_driver_listener(_driver_path)
    event.listen(Engine, "before_cursor_execute", _before_cursor_execute)
    event.listen(Engine, "commit", _end_transaction)
    event.listen(Engine, "rollback", _end_transaction)


def _marking(phase: Callable[..., str], method: Callable[..., Awaitable[Any]]) -> Callable[..., Any]:
    @wraps(method)
    async def wrapper(self: Any, *args: Any, **kwargs: Any) -> Any:
        # Set, not reset: the mark must stay on for the statements that follow in the same task.
        _phase.set(phase(*args))
        return await method(self, *args, **kwargs)

    return wrapper


def mark_saga_phases() -> None:
    """Label the saga runner's statements by what it is doing (bench processes only)."""
    claim_due = _marking(lambda *a, **k: "saga:claim due", SagaStore.claim_due)
    setattr(SagaStore, "claim_due", claim_due)  # noqa: B010
    claim_one = _marking(lambda *a, **k: "saga:claim", SagaStore.claim_instance)
    setattr(SagaStore, "claim_instance", claim_one)  # noqa: B010
    setattr(SagaStore, "get", _marking(lambda *a: "saga:load", SagaStore.get))  # noqa: B010
    setattr(SagaStore, "renew", _marking(lambda *a, **k: "saga:renew lease", SagaStore.renew))  # noqa: B010
    forward = _marking(lambda saga, definition, step: f"saga:{step.name}", SagaRunner._forward)
    setattr(SagaRunner, "_forward", forward)  # noqa: B010
    compensate = _marking(lambda saga, definition, step: f"saga:undo {step.name}", SagaRunner._compensate)
    setattr(SagaRunner, "_compensate", compensate)  # noqa: B010
    setattr(SagaRunner, "_finish", _marking(lambda *a: "saga:finish", SagaRunner._finish))  # noqa: B010


class _Handler(BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        body = json.dumps(COUNTER.snapshot()).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:
        return


def serve_counts(port: int) -> ThreadingHTTPServer:
    server = ThreadingHTTPServer((ALLOWED_HOST, port), _Handler)
    threading.Thread(target=server.serve_forever, name="bench-counter", daemon=True).start()
    return server


def main(argv: list[str] | None = None) -> None:
    args = list(sys.argv[1:] if argv is None else argv)
    if len(args) < 3 or args[0] != "--counter-port" or "--" not in args:
        raise SystemExit("usage: python -m mercato.bench.checkout_probe --counter-port N -- COMMAND [ARGS]")
    port = int(args[1])
    command = args[args.index("--") + 1 :]
    install_listeners()
    mark_saga_phases()
    serve_counts(port)
    sys.argv = ["mercato", *command]
    runpy.run_module("mercato.cli.main", run_name="__main__", alter_sys=True)


if __name__ == "__main__":
    main()
