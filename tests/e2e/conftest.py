"""Starts a real `mercato up` process in a temporary directory and waits until it is ready."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from mercato.kit.ports import free_port


@dataclass(frozen=True)
class RunningShop:
    base_url: str
    workdir: Path
    output: Path
    mail_url: str = ""  # the mail provider's HTTP side (GET /messages)


def start_mercato(
    workdir: Path, args: list[str], env_extra: dict[str, str] | None = None, timeout_s: float = 120.0
) -> tuple[subprocess.Popen[bytes], str, Path]:
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("MERCATO_")}
    env.update(
        {
            "MERCATO_SEED_PRODUCTS": "1000",
            "MERCATO_AUTH_ARGON2_TIME_COST": "1",
            "MERCATO_AUTH_ARGON2_MEMORY_KIB": "8192",
            # Several shops may run at once in one test session: each gets its own providers.
            "MERCATO_PROVIDERS_PSP_PORT": str(free_port()),
            "MERCATO_PROVIDERS_CARRIER_PORT": str(free_port()),
            "MERCATO_PROVIDERS_MAIL_PORT": str(free_port()),
            "MERCATO_PROVIDERS_MAIL_SMTP_PORT": str(free_port()),
            "MERCATO_WORKER_NOTIFY_INTERVAL_S": "0.2",
        }
    )
    env.update(env_extra or {})
    output = workdir / "mercato.log"
    with output.open("wb") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "mercato.cli.main", *args, "--port", str(port)],
            cwd=workdir,
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    base_url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"mercato exited early:\n{output.read_text()}")
        try:
            if httpx.get(f"{base_url}/startupz", timeout=1.0).status_code == 200:
                return proc, base_url, output
        except httpx.TransportError:
            pass
        time.sleep(0.2)
    proc.kill()
    raise RuntimeError(f"mercato did not become ready:\n{output.read_text()}")


@pytest.fixture(scope="session")
def shop(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningShop]:
    workdir = tmp_path_factory.mktemp("shop")
    mail_port = free_port()
    proc, base_url, output = start_mercato(workdir, ["up"], {"MERCATO_PROVIDERS_MAIL_PORT": str(mail_port)})
    try:
        yield RunningShop(
            base_url=base_url, workdir=workdir, output=output, mail_url=f"http://127.0.0.1:{mail_port}"
        )
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()


# Demo-account logins shared by the tests of one running shop: the login limit per account (10 at
# once, 5 a minute; gateway/ratelimit.toml) is the shop's own protection, and a session of e2e tests
# logging in as the admin for each test would trip it. Tokens live 15 minutes; reused for 10.
_DEMO_TOKENS: dict[tuple[str, str], tuple[float, str]] = {}


def demo_token(base_url: str, role: str) -> str:
    """An access token for the demo account with `role` on the shop at `base_url`."""
    from mercato.config import SeedSettings
    from mercato.demo.seed import demo_accounts

    cached = _DEMO_TOKENS.get((base_url, role))
    if cached is not None and time.monotonic() - cached[0] < 600:
        return cached[1]
    _, email, password = next(a for a in demo_accounts(SeedSettings()) if a[0].value == role)
    answer = httpx.post(f"{base_url}/v1/auth/login", json={"email": email, "password": password}, timeout=10)
    assert answer.status_code == 200, answer.text
    token = str(answer.json()["access_token"])
    _DEMO_TOKENS[(base_url, role)] = (time.monotonic(), token)
    return token
