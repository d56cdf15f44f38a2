"""Canary and blue/green releases with a real HAProxy in front of real `mercato api` processes
(cluster/release.py, ADR 0047): a bad canary is rolled back automatically with a record saying why,
a healthy one is promoted to 100 %, blue/green switches only to a group that passes its checks and
switches back on command."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from mercato.cluster.release import Deployment, Member, Slo, run_canary, switch_blue_green
from mercato.lab.canary_fleet import FleetMember, LoadGenerator, ReleaseFleet

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def fleet(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ReleaseFleet]:
    members = [
        FleetMember("hsp_stable", "stable", "stable", "1.0"),
        FleetMember("hsp_good", "canary", "canary", "1.1"),
        FleetMember("hsp_bad", "bad", "canary", "1.1-bad", error_ratio=0.3),
    ]
    with ReleaseFleet(tmp_path_factory.mktemp("hsp-release"), members) as running:
        yield running


def _weights(fleet: ReleaseFleet) -> dict[str, int]:
    assert fleet.haproxy is not None
    return {s.name: s.weight for s in fleet.haproxy.stats()}


def test_the_canary_runs_the_new_search(fleet: ReleaseFleet) -> None:
    def skus(name: str) -> list[str]:
        url = f"http://127.0.0.1:{fleet.ports[name]}/v1/products"
        return [p["sku"] for p in httpx.get(url, params={"q": "shoe red", "limit": 100}).json()["items"]]

    assert skus("hsp_stable") == []  # the old search: the string as typed
    assert len(skus("hsp_good")) == 16  # "Red running shoe n" and "Shoe rack, red n"
    ready = httpx.get(f"http://127.0.0.1:{fleet.ports['hsp_good']}/readyz").json()["config"]
    assert (ready["track"], ready["app_version"], ready["version"]) == ("canary", "1.1", 1)


def test_a_bad_canary_is_rolled_back_automatically_with_a_record(fleet: ReleaseFleet) -> None:
    deployment = fleet.deployment({"stable": ["hsp_stable"], "canary": ["hsp_bad"]})
    with LoadGenerator(fleet.url, rate=40) as load:
        record = run_canary(
            deployment, steps=[20, 50, 100], interval_s=8, check_every_s=0.5, slo=Slo(min_requests=20)
        )
    assert record.outcome == "rolled_back"
    assert record.reason.startswith("at 20 %")
    assert "error rate" in record.reason
    assert record.detected_after_s is not None
    assert record.detected_after_s < 8
    assert _weights(fleet)["hsp_bad"] == 0
    assert _weights(fleet)["hsp_stable"] == 100
    assert deployment.records()[-1]["outcome"] == "rolled_back"
    served_bad = [s for s in load.samples if s.server == "hsp_bad"]
    assert served_bad
    assert len(served_bad) < len(load.samples) / 2


def test_a_healthy_canary_ramps_to_full_traffic(fleet: ReleaseFleet) -> None:
    deployment = fleet.deployment({"stable": ["hsp_stable"], "canary": ["hsp_good"]})
    try:
        with LoadGenerator(fleet.url, rate=40) as load:
            record = run_canary(
                deployment, steps=[50, 100], interval_s=3, check_every_s=0.5, slo=Slo(min_requests=20)
            )
        assert record.outcome == "promoted", record
        assert _weights(fleet)["hsp_good"] == 100
        assert _weights(fleet)["hsp_stable"] == 0
        assert all(s.status == 200 for s in load.samples[-20:])
        assert load.samples[-1].server == "hsp_good"
    finally:
        switch_blue_green(deployment, to="stable", smoke_paths=())


def test_blue_green_switches_only_to_a_group_that_passes_and_switches_back(
    fleet: ReleaseFleet, tmp_path: Path
) -> None:
    deployment = fleet.deployment({"blue": ["hsp_stable"], "green": ["hsp_good"]})
    deployment.live = "blue"
    switched = switch_blue_green(deployment, to="green")
    assert (switched.outcome, switched.reason) == ("switched", "blue -> green")
    assert _weights(fleet)["hsp_good"] == 100
    assert _weights(fleet)["hsp_stable"] == 0
    back = switch_blue_green(deployment, to="blue")
    assert back.outcome == "switched"
    assert _weights(fleet)["hsp_stable"] == 100
    # A group whose member fails its checks gets no traffic at all.
    broken = Deployment(
        deployment.runtime_port,
        {**deployment.groups, "green": [Member("hsp_good", "http://127.0.0.1:9")]},
        tmp_path,
        live="blue",
    )
    refused = switch_blue_green(broken, to="green")
    assert refused.outcome == "refused"
    assert "unreachable" in refused.reason
    assert _weights(fleet)["hsp_stable"] == 100
    assert _weights(fleet)["hsp_good"] == 0


def test_the_release_cli_drives_the_same_deployment(fleet: ReleaseFleet, tmp_path: Path) -> None:
    assert fleet.haproxy is not None
    state = tmp_path / "deploy"

    def cli(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "mercato.cli.main", "release", *args, "--state", str(state)],
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )

    stable = f"hsp_stable@http://127.0.0.1:{fleet.ports['hsp_stable']}"
    green = f"hsp_good@http://127.0.0.1:{fleet.ports['hsp_good']}"
    init = cli(
        "init",
        "--runtime-port",
        str(fleet.haproxy.runtime_port),
        "--group",
        f"blue={stable}",
        "--group",
        f"green={green}",
        "--live",
        "blue",
    )
    assert init.returncode == 0, init.stderr
    switched = cli("blue-green", "--to", "green", "--json")
    assert switched.returncode == 0, switched.stderr
    assert json.loads(switched.stdout)["outcome"] == "switched"
    assert _weights(fleet)["hsp_good"] == 100
    back = cli("blue-green", "--to", "blue", "--json")
    assert back.returncode == 0
    assert _weights(fleet)["hsp_stable"] == 100
    history = json.loads(cli("history", "--json").stdout)
    assert [r["reason"] for r in history] == ["blue -> green", "green -> blue"]
    bad_steps = cli("canary", "--steps", "50,20")
    assert bad_steps.returncode == 2  # not increasing: refused before anything moves
