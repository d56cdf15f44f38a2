"""The SLO rules in deploy/prometheus: rendered from `mercato.cli.slo`, valid, and their burn-rate
alerts fire when (and only when) the budget burns (promtool's unit tests in deploy/prometheus/tests).

Also the generated scrape config: promtool accepts it, with the rules loaded, and it names the
processes of the settings under the job names the rules select on."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest
from typer.testing import CliRunner

from mercato.cli.main import app
from mercato.cli.observability import render_scrape_config
from mercato.cli.slo import ALERTS, SLOS, render_rules
from mercato.config import HttpSettings, Settings, WorkerSettings
from mercato.kit.observability.metrics import LATENCY_BUCKETS
from mercato.providers.config import ProviderSettings

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy" / "prometheus"
RULES = DEPLOY / "rules" / "slos.rules.yml"
PROMTOOL = shutil.which("promtool")
needs_promtool = pytest.mark.skipif(
    PROMTOOL is None, reason="promtool (Debian package prometheus) not installed"
)


def _promtool(*args: str | Path, cwd: Path = ROOT) -> subprocess.CompletedProcess[str]:
    assert PROMTOOL is not None
    return subprocess.run(
        [PROMTOOL, *map(str, args)], cwd=cwd, capture_output=True, text=True, timeout=120, check=False
    )


def test_the_committed_rules_are_what_the_code_renders() -> None:
    assert RULES.read_text(encoding="utf-8") == render_rules(), (
        "run `mercato observability slo-rules > deploy/prometheus/rules/slos.rules.yml`"
    )
    result = CliRunner().invoke(app, ["observability", "slo-rules", "--check", str(RULES)])
    assert result.exit_code == 0, result.output


def test_slo_rules_check_refuses_a_stale_file(tmp_path: Path) -> None:
    stale = tmp_path / "slos.rules.yml"
    stale.write_text(render_rules().replace("14.4", "20"), encoding="utf-8")
    result = CliRunner().invoke(app, ["observability", "slo-rules", "--check", str(stale)])
    assert result.exit_code == 1


def test_every_journey_has_availability_and_latency_and_thresholds_are_bucket_bounds() -> None:
    pairs = {(s.journey, s.sli) for s in SLOS}
    for journey in ("browse", "cart", "checkout", "order_status"):
        assert {(journey, "availability"), (journey, "latency")} <= pairs
    assert ("checkout", "completion") in pairs
    for slo in SLOS:
        if slo.sli == "latency":
            le = slo.bad.split('le="')[1].split('"')[0]
            assert float(le) in LATENCY_BUCKETS
    # The workbook's table for a 30-day window: 2 %, 5 % and 10 % of the budget.
    assert [round(a.budget_share, 3) for a in ALERTS] == [0.02, 0.05, 0.1]


@needs_promtool
def test_promtool_checks_the_rules() -> None:
    result = _promtool("check", "rules", RULES)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS" in result.stdout


@needs_promtool
def test_promtool_unit_tests_of_the_burn_rate_alerts_pass() -> None:
    tests = sorted((DEPLOY / "tests").glob("*.yml"))
    assert tests
    result = _promtool("test", "rules", *tests)
    assert result.returncode == 0, result.stdout + result.stderr


@needs_promtool
def test_the_alert_tests_fail_without_the_short_window(tmp_path: Path) -> None:
    """The unit tests can fail: with the 5m window dropped from the fast burn, the page keeps firing
    after the burn stopped, and the test that says it resolves fails."""
    (tmp_path / "rules").mkdir()
    (tmp_path / "tests").mkdir()
    broken = RULES.read_text(encoding="utf-8").replace("ratio_rate5m > on", "ratio_rate1h > on")
    assert broken != RULES.read_text(encoding="utf-8")
    (tmp_path / "rules" / "slos.rules.yml").write_text(broken, encoding="utf-8")
    shutil.copy(DEPLOY / "tests" / "short_window.test.yml", tmp_path / "tests")
    result = _promtool("test", "rules", tmp_path / "tests" / "short_window.test.yml", cwd=tmp_path)
    assert result.returncode != 0
    assert "MercatoSLOFastBurn" in result.stdout + result.stderr


def _settings(**overrides: object) -> Settings:
    return Settings(**overrides)  # type: ignore[arg-type]


def test_the_scrape_config_names_every_process_of_the_settings() -> None:
    settings = _settings(
        http=HttpSettings(host="0.0.0.0", port=9000),
        worker=WorkerSettings(http_port=9081),
        providers=ProviderSettings(host="127.0.0.1", psp_port=9100, carrier_port=9101, mail_port=9102),
    )
    text = render_scrape_config(settings)
    assert "job_name: mercato-api" in text
    assert "'127.0.0.1:9000'" in text
    assert "job_name: mercato-worker" in text
    assert "'127.0.0.1:9081'" in text
    for name, port in (("psp", 9100), ("carrier", 9101), ("mail", 9102)):
        assert f"job_name: mercato-provider-{name}" in text
        assert f"'127.0.0.1:{port}'" in text
    quiet = render_scrape_config(
        _settings(worker=WorkerSettings(http_port=0), providers=ProviderSettings(enabled=False))
    )
    assert "job_name: mercato-worker" not in quiet
    assert "mercato-provider" not in quiet
    several = render_scrape_config(settings, api=["10.0.0.1:8000", "10.0.0.2:8000"])
    assert "['10.0.0.1:8000', '10.0.0.2:8000']" in several
    shared_port = render_scrape_config(_settings(http=HttpSettings(workers=4)))
    assert "WARNING: MERCATO_HTTP_WORKERS=4" in shared_port


@needs_promtool
def test_promtool_accepts_the_generated_scrape_config_with_the_rules(tmp_path: Path) -> None:
    result = CliRunner().invoke(
        app, ["observability", "scrape-config", "--rules", str(DEPLOY / "rules" / "*.yml")]
    )
    assert result.exit_code == 0, result.output
    config = tmp_path / "prometheus.yml"
    config.write_text(result.stdout, encoding="utf-8")
    checked = _promtool("check", "config", config)
    assert checked.returncode == 0, checked.stdout + checked.stderr
    assert "SUCCESS: 1 rule files found" in checked.stdout
