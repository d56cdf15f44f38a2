"""A cancellation a database call hid, surfaced again.

A task cancelled while a statement runs can leave the statement's code path by another door: the
driver invalidates the connection mid-statement and the cleanup's error (a refused rollback) comes
out instead of the `CancelledError`, or `asyncio.wait_for` swallows it as the call fails (Python
3.11). The task is still marked cancelling either way; a loop that retries failed calls must look,
or it polls on for ever while whoever cancelled it waits (the realtime hub's stop did, in 1 of
7-130 stops: tests/integration's `test_the_runtime_stops_every_time_it_is_stopped_in_its_first_statements`).
"""

from __future__ import annotations

import asyncio

__all__ = ["stop_if_cancelled"]


def stop_if_cancelled() -> None:
    """Raise `CancelledError` when the current task has a cancellation pending."""
    current = asyncio.current_task()
    if current is not None and current.cancelling():
        raise asyncio.CancelledError
