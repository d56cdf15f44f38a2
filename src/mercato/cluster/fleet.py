"""N `mercato api` processes behind one HAProxy, in one folder: start, restart one by one, stop.

Each instance is a real `mercato api --workers 1` on its own free loopback port, with the same
MERCATO_* environment (plus per-instance extras: the balancing lab makes one slow this way). HAProxy
health-checks each on `/readyz`; a restarted instance rejoins through slow start. `fleet.json` in the
folder remembers the ports so `mercato cluster status` and `down` find everything again.

A rolling restart stops one instance at a time with SIGTERM: the instance answers `/readyz` 503 for
its drain period (HAProxy marks it DOWN and routes elsewhere), finishes what it has in flight, exits;
the new process starts on the same port and HAProxy brings it back UP (ADR 0040).
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path

import httpx

from mercato.cluster.haproxy import Backend, HAProxy, HAProxySettings
from mercato.cluster.processes import alive, read_pid, spawn, stop, wait_until
from mercato.kit.ports import free_port

__all__ = ["FLEET_FILE", "ApiFleet", "ApiInstance"]

FLEET_FILE = "fleet.json"


@dataclass(frozen=True)
class ApiInstance:
    name: str
    port: int
    env: dict[str, str] = field(default_factory=dict)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def backend(self) -> Backend:
        return Backend(self.name, "127.0.0.1", self.port)


class ApiFleet:
    """`instances` API processes and the HAProxy in front of them."""

    def __init__(
        self,
        folder: Path,
        *,
        instances: int = 2,
        env: Mapping[str, str] | None = None,
        instance_env: Mapping[str, Mapping[str, str]] | None = None,
        settings: HAProxySettings | None = None,
        ports: Sequence[int] | None = None,
        haproxy_ports: tuple[int, int, int] | None = None,
    ) -> None:
        if instances < 1:
            raise ValueError("instances must be >= 1")
        self.folder = folder.resolve()
        self.env = dict(env or {})
        taken: set[int] = set()
        port_list = list(ports) if ports is not None else [free_port(taken=taken) for _ in range(instances)]
        extra = instance_env or {}
        self.instances = [
            ApiInstance(f"api{i}", port_list[i], dict(extra.get(f"api{i}", {}))) for i in range(instances)
        ]
        port, stats_port, runtime_port = haproxy_ports or (None, None, None)
        self.haproxy = HAProxy(
            self.folder / "haproxy",
            [i.backend() for i in self.instances],
            settings,
            port=port,
            stats_port=stats_port,
            runtime_port=runtime_port,
        )

    @property
    def url(self) -> str:
        """The balanced entry point (HAProxy's frontend)."""
        return self.haproxy.url

    def instance(self, name: str) -> ApiInstance:
        for instance in self.instances:
            if instance.name == name:
                return instance
        raise KeyError(name)

    # -- processes ------------------------------------------------------------------------------

    def _process_env(self, instance: ApiInstance) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("MERCATO_")}
        env.update(self.env)
        env.update(instance.env)
        env.setdefault("MERCATO_DATA_DIR", str(self.folder / instance.name))
        # Drain longer than HAProxy needs to mark the instance DOWN (fall checks, one more of margin).
        s = self.haproxy.settings
        env.setdefault("MERCATO_HTTP_DRAIN_S", f"{(s.fall + 2) * s.check_interval_ms / 1000:.2f}")
        return env

    def spawn_instance(self, instance: ApiInstance) -> int:
        argv = [sys.executable, "-m", "mercato.cli.main", "api", "--host", "127.0.0.1"]
        argv += ["--port", str(instance.port), "--workers", "1"]
        (self.folder / instance.name).mkdir(parents=True, exist_ok=True)
        return spawn(self.folder, instance.name, argv, env=self._process_env(instance))

    def wait_ready(self, instance: ApiInstance, *, timeout_s: float = 90.0) -> None:
        def ready() -> bool:
            if not alive(read_pid(self.folder, instance.name)):
                raise RuntimeError(f"{instance.name} exited; see {self.folder}/{instance.name}.log")
            return httpx.get(f"{instance.url}/readyz", timeout=2.0).status_code == 200

        if not wait_until(ready, timeout_s=timeout_s, interval_s=0.3):
            raise RuntimeError(
                f"{instance.name} not ready in {timeout_s:.0f} s; see {self.folder}/{instance.name}.log"
            )

    def start(self, *, timeout_s: float = 120.0) -> str:
        """Start every instance, wait until each answers /readyz, start HAProxy, wait until all UP."""
        self.folder.mkdir(parents=True, exist_ok=True)
        self.save()
        try:
            for instance in self.instances:
                self.spawn_instance(instance)
            with ThreadPoolExecutor(len(self.instances)) as pool:
                list(pool.map(lambda i: self.wait_ready(i, timeout_s=timeout_s), self.instances))
            self.haproxy.start()
            self.haproxy.wait_up(len(self.instances), timeout_s=30.0)
        except BaseException:
            self.stop()
            raise
        return self.url

    def stop_instance(self, name: str, *, timeout_s: float = 30.0) -> bool:
        """SIGTERM one instance and wait for it to exit (it drains first; SIGKILL after timeout_s)."""
        return stop(self.folder, name, timeout_s=timeout_s)

    def restart(self, name: str, *, timeout_s: float = 90.0) -> None:
        """Stop `name` gracefully, start it again on the same port, wait until HAProxy has it UP."""
        instance = self.instance(name)
        self.stop_instance(name)
        self.spawn_instance(instance)
        self.wait_ready(instance, timeout_s=timeout_s)
        self.haproxy.wait_status(name, "UP", timeout_s=30.0)

    def rolling_restart(self, *, timeout_s: float = 90.0) -> None:
        """Restart every instance, one at a time."""
        for instance in self.instances:
            self.restart(instance.name, timeout_s=timeout_s)

    def stop(self) -> None:
        """HAProxy's clients first: the instances (gracefully), then HAProxy."""
        with ThreadPoolExecutor(len(self.instances)) as pool:
            list(pool.map(lambda i: self.stop_instance(i.name), self.instances))
        self.haproxy.stop()

    def running(self) -> dict[str, bool]:
        return {i.name: alive(read_pid(self.folder, i.name)) for i in self.instances}

    # -- persistence ------------------------------------------------------------------------------

    def save(self) -> None:
        data = {
            "instances": [asdict(i) for i in self.instances],
            "env": self.env,
            "haproxy": {
                "port": self.haproxy.port,
                "stats_port": self.haproxy.stats_port,
                "runtime_port": self.haproxy.runtime_port,
                "settings": {
                    k: v for k, v in asdict(self.haproxy.settings).items() if k != "extra_backend_lines"
                },
            },
        }
        self.folder.mkdir(parents=True, exist_ok=True)
        (self.folder / FLEET_FILE).write_text(json.dumps(data, indent=2))

    @classmethod
    def load(cls, folder: Path) -> ApiFleet:
        data = json.loads((folder / FLEET_FILE).read_text())
        instances = data["instances"]
        h = data["haproxy"]
        return cls(
            folder,
            instances=len(instances),
            env=data["env"],
            instance_env={i["name"]: i["env"] for i in instances},
            settings=HAProxySettings(**h["settings"]),
            ports=[i["port"] for i in instances],
            haproxy_ports=(h["port"], h["stats_port"], h["runtime_port"]),
        )

    @staticmethod
    def exists(folder: Path) -> bool:
        return (folder / FLEET_FILE).exists()
