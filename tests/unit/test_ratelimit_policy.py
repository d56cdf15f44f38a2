"""Policy files: the shipped one is valid, every schema error is refused with a reason, keys hide secrets."""

from __future__ import annotations

import tomllib
from typing import Any

import pytest

from mercato.gateway.ratelimit import DEFAULT_POLICY_FILE
from mercato.kit.ratelimit import Decision, Limit
from mercato.kit.ratelimit.policy import PolicyError, RuleDecision, Verdict, load_policies, parse_policies


def rules(*tables: dict[str, Any]) -> dict[str, Any]:
    return {"rules": list(tables)}


BASE = {"name": "r", "limit": {"rate": 5}}


def test_the_shipped_policies_load_and_cover_login_and_checkout() -> None:
    policies = load_policies(DEFAULT_POLICY_FILE)
    names = {rule.name for rule in policies.rules}
    assert {"login-ip", "login-account", "user-checkout", "api-key"} <= names
    login = {rule.name for rule in policies.applicable("POST", "/v1/auth/login")}
    assert {"login-ip", "login-account"} <= login
    assert all(not rule.fail_open for rule in policies.rules if rule.name.startswith("login"))
    assert policies.applicable("GET", "/v1/rate-limit/status") == []


@pytest.mark.parametrize(
    ("table", "message"),
    [
        ({**BASE, "dimensions": ["shoe_size"]}, "dimensions"),
        ({**BASE, "dimensions": ["ip", "ip"]}, "dimensions"),
        ({**BASE, "algorithm": "magic"}, "algorithm"),
        ({**BASE, "backend": "etcd"}, "backend"),
        ({**BASE, "limit": {"rate": 0}}, "rate must be >= 1"),
        ({**BASE, "limit": {"rate": "5"}}, "rate must be an integer"),
        ({**BASE, "match": {"path_regex": "("}}, "path_regex"),
        ({**BASE, "match": {"methods": ["FETCH"]}}, "methods"),
        ({**BASE, "match": {"path_prefix": "v1"}}, "path_prefix"),
        ({**BASE, "fail_open": "yes"}, "fail_open"),
        ({**BASE, "surprise": 1}, "unknown key"),
        ({"name": "Bad Name!", "limit": {"rate": 1}}, "name"),
    ],
)
def test_invalid_rules_are_refused_with_the_reason(table: dict[str, Any], message: str) -> None:
    with pytest.raises(PolicyError, match=message):
        parse_policies(rules(table))


def test_duplicate_names_and_misplaced_keys_are_refused() -> None:
    with pytest.raises(PolicyError, match="unique"):
        parse_policies(rules(BASE, BASE))
    # A key written after [defaults] belongs to that table: the classic TOML slip is caught, not ignored.
    data = tomllib.loads('[defaults]\nfail_open = true\nexempt = ["/x"]\n')
    with pytest.raises(PolicyError, match="defaults"):
        parse_policies(data)


def test_keys_name_the_rule_version_and_hash_secrets() -> None:
    rule = parse_policies(rules({**BASE, "dimensions": ["api_key", "body.email", "route"]})).rules[0]
    key = rule.key({"api_key": "sk_live_secret", "body.email": "ada@example.com", "route": "/v1/checkout"})
    assert key is not None
    assert "sk_live_secret" not in key
    assert "ada@example.com" not in key
    assert key.startswith(f"r@{rule.fingerprint}:")
    assert key.endswith("route=/v1/checkout")
    assert rule.key({"api_key": "k", "route": "/v1/checkout"}) is None  # a missing dimension: not applied
    changed = parse_policies(rules({**BASE, "limit": {"rate": 6}})).rules[0]
    assert changed.fingerprint != rule.fingerprint  # new limits never read old state
    everyone = parse_policies(rules(BASE)).rules[0]
    assert everyone.key({}) == f"r@{everyone.fingerprint}"  # no dimension: one global quota


def test_the_headline_is_the_most_restrictive_decision() -> None:
    a, b = parse_policies(rules(BASE, {**BASE, "name": "s"})).rules
    roomy = RuleDecision(a, "a", "memory", Decision(True, 100, 90, 1.0, 0.0))
    tight = RuleDecision(b, "b", "memory", Decision(True, 10, 2, 5.0, 0.0))
    assert Verdict((roomy, tight)).headline is tight
    refused_soon = RuleDecision(a, "a", "memory", Decision(False, 100, 0, 1.0, 1.0))
    refused_late = RuleDecision(b, "b", "memory", Decision(False, 10, 0, 9.0, 9.0))
    verdict = Verdict((refused_soon, tight, refused_late))
    assert not verdict.allowed
    assert verdict.headline is refused_late
    assert Limit(rate=5).capacity == 5
