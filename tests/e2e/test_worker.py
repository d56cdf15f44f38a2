"""`mercato worker` runs the background jobs as its own process and stops cleanly on SIGTERM."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from mercato.bootstrap import SCRIPT_LOCATION
from mercato.kit.storage.migrations import upgrade
from tests.e2e.conftest import free_port

pytestmark = pytest.mark.e2e


def test_worker_process_serves_metrics_and_stops_on_sigterm(tmp_path: Path) -> None:
    url = f"sqlite+aiosqlite:///{tmp_path}/worker.db"
    upgrade(SCRIPT_LOCATION, url)
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("MERCATO_")}
    env.update({"MERCATO_DATABASE_URL": url, "MERCATO_WORKER_RESERVATION_SWEEP_S": "0.05"})
    proc = subprocess.Popen(
        [sys.executable, "-m", "mercato.cli.main", "worker", "--metrics-port", str(port)],
        cwd=tmp_path,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    try:
        deadline = time.monotonic() + 30
        text = ""
        while time.monotonic() < deadline:
            try:
                text = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=1).text
                if 'mercato_worker_job_duration_seconds_count{job="expire_reservations"}' in text:
                    break
            except httpx.TransportError:
                pass
            time.sleep(0.1)
        assert 'job="expire_reservations"' in text
        assert "mercato_breaker_state" in text  # the provider breakers' metrics are served too
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=10) == 0
        # Its events are logged as the settings say (JSON by default), not on structlog's
        # unconfigured console renderer, whose rich tracebacks cost the worker most of its CPU
        # under load.
        assert proc.stdout is not None
        lines = proc.stdout.read().decode().splitlines()
        events = [json.loads(line) for line in lines if line.startswith("{")]
        assert any(str(event.get("event", "")).startswith("Started server process") for event in events)
        # The rest is the banner printed for the operator; no log record in another format.
        assert not [line for line in lines if re.match(r"(INFO|WARNING|ERROR):|\d{4}-\d\d-\d\d", line)]
    finally:
        if proc.poll() is None:
            proc.kill()
