"""Rate-limit policies: which requests a rule covers, whose quota they draw on, and under which limit.

A policy file (TOML) holds rules; several rules can cover one request and *all* must admit it. Each rule
names its *dimensions*, the request attributes that together identify one quota:

    api_key   the caller's API key          user     the authenticated subject
    ip        the client address            tenant   the tenant the request is for
    route     the route template            body.F   field F of the JSON body (e.g. `body.email`)
    anonymous "1" for a caller with neither API key nor user, else no value (pair it with `ip`)

No dimension at all means one quota shared by every caller (a global limit). A rule whose dimension has no
value for a request (no API key sent, no bearer token) does not apply to that request. The values are
resolved by the HTTP layer; this module only knows their names, so it carries no web or shop knowledge.

    exempt = ["/healthz", "/readyz"]   # exact paths never limited (top level: before any table)

    [defaults]
    algorithm = "token_bucket"         # any of ALGORITHM_NAMES
    fail_open = true                   # when the store (Redis) cannot answer
    # backend = "redis"                # omitted: the deployment's default backend

    [[rules]]
    name = "per-key"
    dimensions = ["api_key"]
    match = { path_prefix = "/v1/" }   # or path_regex = "^/v1/orders/[^/]+$"; methods = ["POST"]
    limit = { rate = 100, period_s = 1, burst = 200 }

`PolicyStore` re-reads the file when its modification time or size changes (checked at most every
`check_interval_s`), swaps the whole `PolicySet` in one assignment, and keeps the old one when the new
file is invalid. `PolicyEnforcer` applies a `PolicySet` with limiters from a `LimiterPool`.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import re
import tomllib
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mercato.kit.clock import Clock, SystemClock
from mercato.kit.health import Degraded
from mercato.kit.observability import get_logger
from mercato.kit.ratelimit.base import BackendError, RateLimiter
from mercato.kit.ratelimit.factory import (
    ALGORITHM_NAMES,
    BACKEND_NAMES,
    build_limiter,
    pipelined_client_for_limiter,
)
from mercato.kit.ratelimit.limit import Decision, Limit
from mercato.kit.ratelimit.metrics import RateLimitMetrics
from mercato.kit.ratelimit.pipelined import PipelinedRedis
from mercato.kit.ratelimit.redis_backend import DEFAULT_KEY_PREFIX
from mercato.kit.ratelimit.resilient import ResilientLimiter

__all__ = [
    "BODY_DIMENSION_PREFIX",
    "DIMENSIONS",
    "LimiterPool",
    "PolicyEnforcer",
    "PolicyError",
    "PolicySet",
    "PolicyStore",
    "Rule",
    "RuleDecision",
    "Verdict",
    "load_policies",
    "parse_policies",
]

DIMENSIONS: frozenset[str] = frozenset({"api_key", "user", "ip", "tenant", "route", "anonymous"})
BODY_DIMENSION_PREFIX = "body."
# Values that are secrets or personal data never appear in a store key or a status answer as sent.
_HASHED_DIMENSIONS = frozenset({"api_key"})
_SAFE_VALUE = re.compile(r"^[A-Za-z0-9._:/@{}\-]{1,96}$")
_RULE_NAME = re.compile(r"^[a-z0-9][a-z0-9_.-]{0,62}$")
# A rule with one of these prefixes (or none) covers the whole API.
_WHOLE_API_PREFIXES = frozenset({None, "", "/", "/v1", "/v1/"})
_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})

_log = get_logger("mercato.ratelimit.policy")


class PolicyError(ValueError):
    """The policy file cannot be used (unreadable, not TOML, or a rule breaks the schema)."""


def _is_dimension(name: str) -> bool:
    if name in DIMENSIONS:
        return True
    field_name = name.removeprefix(BODY_DIMENSION_PREFIX)
    return name.startswith(BODY_DIMENSION_PREFIX) and field_name.isidentifier()


def _digest(value: str) -> str:
    return hashlib.sha256(value.encode("utf-8")).hexdigest()[:24]


def key_part(dimension: str, value: str) -> str:
    """How a dimension's value appears in a store key: hashed when secret, personal or unsafe."""
    if dimension in _HASHED_DIMENSIONS or dimension.startswith(BODY_DIMENSION_PREFIX):
        return "h:" + _digest(value)
    return value if _SAFE_VALUE.match(value) else "h:" + _digest(value)


@dataclass(frozen=True, slots=True)
class Rule:
    """One quota per distinct combination of `dimensions` values, over requests the match covers.

    `backend=None` means the deployment's default. `fingerprint` changes whenever the algorithm or the limit
    does, and is part of every key, so a reloaded rule never reads state written under other rules
    (ADR 0010: a key is always used with one `Limit` and algorithm); the price is a fresh quota on change.
    """

    name: str
    limit: Limit
    algorithm: str = "token_bucket"
    backend: str | None = None
    dimensions: tuple[str, ...] = ()
    path_prefix: str | None = None
    path_regex: re.Pattern[str] | None = None
    methods: frozenset[str] = frozenset()
    fail_open: bool = True
    fingerprint: str = field(init=False, default="")

    def __post_init__(self) -> None:
        source = f"{self.algorithm}|{self.limit.rate}|{self.limit.period_s!r}|{self.limit.capacity}"
        object.__setattr__(self, "fingerprint", _digest(source)[:8])

    def matches(self, method: str, path: str) -> bool:
        if self.methods and method not in self.methods:
            return False
        if self.path_prefix is not None and not path.startswith(self.path_prefix):
            return False
        return self.path_regex is None or self.path_regex.search(path) is not None

    @property
    def needs_body(self) -> bool:
        return any(d.startswith(BODY_DIMENSION_PREFIX) for d in self.dimensions)

    def key(self, values: Mapping[str, str | None]) -> str | None:
        """The quota key for these dimension values, or None when one is missing (the rule does not apply)."""
        parts = [f"{self.name}@{self.fingerprint}"]
        for dimension in self.dimensions:
            value = values.get(dimension)
            if not value:
                return None
            parts.append(f"{dimension}={key_part(dimension, value)}")
        return ":".join(parts)

    def describe(self) -> str:
        return f"{self.limit} {self.algorithm}"

    @property
    def covers_every_route(self) -> bool:
        """Whether the rule matches every method on every API path (no method, regex or narrow prefix)."""
        return not self.methods and self.path_regex is None and self.path_prefix in _WHOLE_API_PREFIXES


@dataclass(frozen=True, slots=True)
class PolicySet:
    rules: tuple[Rule, ...] = ()
    exempt: frozenset[str] = frozenset()
    source: str = ""

    def applicable(self, method: str, path: str) -> list[Rule]:
        """The rules covering a request (none for an exempt path)."""
        if path in self.exempt:
            return []
        return [rule for rule in self.rules if rule.matches(method, path)]

    def backends(self, default_backend: str) -> set[str]:
        return {rule.backend or default_backend for rule in self.rules}


def _table(value: Any, where: str) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise PolicyError(f"{where} must be a table")
    return value


def _str_list(value: Any, where: str) -> list[str]:
    if not isinstance(value, list) or not all(isinstance(item, str) for item in value):
        raise PolicyError(f"{where} must be a list of strings")
    return value


def _known_keys(table: Mapping[str, Any], allowed: Iterable[str], where: str) -> None:
    unknown = sorted(set(table) - set(allowed))
    if unknown:
        raise PolicyError(f"{where}: unknown key(s) {unknown}")


def _limit(raw: Any, where: str) -> Limit:
    table = _table(raw, where)
    _known_keys(table, ("rate", "period_s", "burst"), where)
    rate, period_s, burst = table.get("rate"), table.get("period_s", 1.0), table.get("burst")
    if not isinstance(rate, int) or isinstance(rate, bool):
        raise PolicyError(f"{where}.rate must be an integer")
    if not isinstance(period_s, int | float) or isinstance(period_s, bool):
        raise PolicyError(f"{where}.period_s must be a number of seconds")
    if burst is not None and (not isinstance(burst, int) or isinstance(burst, bool)):
        raise PolicyError(f"{where}.burst must be an integer")
    try:
        return Limit(rate=rate, period_s=float(period_s), burst=burst)
    except ValueError as exc:
        raise PolicyError(f"{where}: {exc}") from exc


def _rule(raw: Any, index: int, defaults: Mapping[str, Any]) -> Rule:
    where = f"rules[{index}]"
    table = _table(raw, where)
    _known_keys(table, ("name", "dimensions", "match", "limit", "algorithm", "backend", "fail_open"), where)
    name = table.get("name")
    if not isinstance(name, str) or not _RULE_NAME.match(name):
        raise PolicyError(f"{where}.name must match {_RULE_NAME.pattern}")
    dimensions = tuple(_str_list(table.get("dimensions", []), f"{where}.dimensions"))
    bad = [d for d in dimensions if not _is_dimension(d)]
    if bad or len(set(dimensions)) != len(dimensions):
        raise PolicyError(f"{where}.dimensions: unknown or repeated {bad or list(dimensions)}")
    match = _table(table.get("match", {}), f"{where}.match")
    _known_keys(match, ("path_prefix", "path_regex", "methods"), f"{where}.match")
    prefix = match.get("path_prefix")
    if prefix is not None and (not isinstance(prefix, str) or not prefix.startswith("/")):
        raise PolicyError(f"{where}.match.path_prefix must be a string starting with /")
    regex: re.Pattern[str] | None = None
    if "path_regex" in match:
        if not isinstance(match["path_regex"], str):
            raise PolicyError(f"{where}.match.path_regex must be a string")
        try:
            regex = re.compile(match["path_regex"])
        except re.error as exc:
            raise PolicyError(f"{where}.match.path_regex: {exc}") from exc
    methods = frozenset(m.upper() for m in _str_list(match.get("methods", []), f"{where}.match.methods"))
    if not methods <= _METHODS:
        raise PolicyError(f"{where}.match.methods: unknown {sorted(methods - _METHODS)}")
    algorithm = table.get("algorithm", defaults.get("algorithm", "token_bucket"))
    if algorithm not in ALGORITHM_NAMES:
        raise PolicyError(f"{where}.algorithm must be one of {list(ALGORITHM_NAMES)}")
    backend = table.get("backend", defaults.get("backend"))
    if backend is not None and backend not in BACKEND_NAMES:
        raise PolicyError(f"{where}.backend must be one of {list(BACKEND_NAMES)}")
    fail_open = table.get("fail_open", defaults.get("fail_open", True))
    if not isinstance(fail_open, bool):
        raise PolicyError(f"{where}.fail_open must be true or false")
    return Rule(
        name=name,
        limit=_limit(table.get("limit"), f"{where}.limit"),
        algorithm=str(algorithm),
        backend=None if backend is None else str(backend),
        dimensions=dimensions,
        path_prefix=prefix,
        path_regex=regex,
        methods=methods,
        fail_open=fail_open,
    )


def parse_policies(data: Mapping[str, Any], *, source: str = "") -> PolicySet:
    """A `PolicySet` from parsed TOML; any schema error raises `PolicyError` (nothing half-applied)."""
    _known_keys(data, ("defaults", "exempt", "rules"), "policy file")
    defaults = _table(data.get("defaults", {}), "defaults")
    _known_keys(defaults, ("algorithm", "backend", "fail_open"), "defaults")
    exempt = _str_list(data.get("exempt", []), "exempt")
    rules_raw = data.get("rules", [])
    if not isinstance(rules_raw, list):
        raise PolicyError("rules must be an array of tables ([[rules]])")
    rules = tuple(_rule(raw, i, defaults) for i, raw in enumerate(rules_raw))
    names = [rule.name for rule in rules]
    if len(set(names)) != len(names):
        raise PolicyError(f"rule names must be unique, got {names}")
    return PolicySet(rules=rules, exempt=frozenset(exempt), source=source)


def load_policies(path: Path) -> PolicySet:
    try:
        with path.open("rb") as fh:
            data = tomllib.load(fh)
    except OSError as exc:
        raise PolicyError(f"cannot read {path}: {exc.strerror or exc}") from exc
    except tomllib.TOMLDecodeError as exc:
        raise PolicyError(f"{path} is not valid TOML: {exc}") from exc
    return parse_policies(data, source=str(path))


# Reload outcome hook: (ok, message).
ReloadHook = Callable[[bool, str], None]


class PolicyStore:
    """The current `PolicySet`, re-read from `path` when the file changes.

    `refresh()` is cheap enough for the request path: it does nothing until `check_interval_s` has passed
    since the last look, then one `stat`. A changed file is parsed completely before the swap (a single
    attribute assignment, so a request sees either the old or the new set, never a mix); an invalid file
    is logged, reported to `on_reload` and ignored until it changes again. `reload()` forces a read
    (e.g. from a SIGHUP handler).
    """

    def __init__(
        self,
        path: Path,
        *,
        check_interval_s: float = 2.0,
        clock: Clock | None = None,
        on_reload: ReloadHook | None = None,
    ) -> None:
        if check_interval_s < 0:
            raise ValueError("check_interval_s must be >= 0")
        self._path = path
        self._interval_s = check_interval_s
        self._clock: Clock = clock or SystemClock()
        self._on_reload = on_reload
        self._signature = self._stat()
        self._current = load_policies(path)  # at start an invalid file is fatal: there is no old set
        self._checked_at_s = self._clock.monotonic()
        self.last_error: str | None = None
        self._override: PolicySet | None = None

    def override(self, policies: PolicySet | None) -> None:
        """Policies from the runtime configuration (ADR 0045) win over the file; None: the file again."""
        self._override = policies

    @property
    def path(self) -> Path:
        return self._path

    @property
    def current(self) -> PolicySet:
        return self._override if self._override is not None else self._current

    def _stat(self) -> tuple[int, int] | None:
        try:
            st = os.stat(self._path)
        except OSError:
            return None
        return (st.st_mtime_ns, st.st_size)

    def refresh(self) -> PolicySet:
        """The current set, after re-reading the file if it changed and the check interval has passed."""
        if self._override is not None:
            return self._override
        now_s = self._clock.monotonic()
        if now_s - self._checked_at_s >= self._interval_s:
            self._checked_at_s = now_s
            signature = self._stat()
            if signature != self._signature:
                self._signature = signature
                self.reload()
        return self._current

    def reload(self) -> bool:
        """Read the file now; True when the new policies are in force."""
        try:
            policies = load_policies(self._path)
        except PolicyError as exc:
            self.last_error = str(exc)
            _log.error("ratelimit_policy_rejected", path=str(self._path), error=str(exc))
            if self._on_reload is not None:
                self._on_reload(False, str(exc))
            return False
        self._current = policies
        self.last_error = None
        _log.info("ratelimit_policy_loaded", path=str(self._path), rules=len(policies.rules))
        if self._on_reload is not None:
            self._on_reload(True, f"{len(policies.rules)} rules")
        return True


class _SharedLabelMetrics:
    """Forwards to `inner`; a (algorithm, backend) pair is reported degraded while *any* of its limiters is.

    A pool can hold a fail-open and a fail-closed limiter with the same algorithm and backend; they share the
    gauge's labels, and without this the healthy one would reset the gauge the other one raised.
    """

    def __init__(self, inner: RateLimitMetrics, spec: tuple[str, str, bool], states: dict[Any, bool]) -> None:
        self._inner = inner
        self._spec = spec
        self._states = states

    def decision(self, *, algorithm: str, backend: str, outcome: str) -> None:
        self._inner.decision(algorithm=algorithm, backend=backend, outcome=outcome)

    def backend_error(self, *, algorithm: str, backend: str, error: str) -> None:
        self._inner.backend_error(algorithm=algorithm, backend=backend, error=error)

    def degraded(self, *, algorithm: str, backend: str, active: bool) -> None:
        self._states[self._spec] = active
        pair = self._spec[:2]
        any_active = any(on for spec, on in self._states.items() if spec[:2] == pair)
        self._inner.degraded(algorithm=algorithm, backend=backend, active=any_active)


class LimiterPool:
    """One limiter per (algorithm, backend, fail-open) in use, built on first use; Redis ones share a client.

    Each Redis limiter is a `ResilientLimiter` with its own breaker (fail-open and fail-closed rules cannot
    share one: they answer differently while it is open). `readiness_check` raises while any of them is
    degraded, or while Redis does not answer a PING when a rule uses it.
    """

    def __init__(
        self,
        *,
        default_backend: str = "memory",
        redis_url: str = "redis://127.0.0.1:6379/0",
        key_prefix: str = DEFAULT_KEY_PREFIX,
        socket_timeout_s: float = 0.1,
        timeout_s: float = 0.25,
        failure_threshold: int = 5,
        reset_timeout_s: float = 5.0,
        max_keys: int = 100_000,
        clock: Clock | None = None,
        metrics: RateLimitMetrics | None = None,
    ) -> None:
        if default_backend not in BACKEND_NAMES:
            raise ValueError(f"default_backend must be one of {BACKEND_NAMES}")
        self.default_backend = default_backend
        self._redis_url = redis_url
        self._key_prefix = key_prefix
        self._socket_timeout_s = socket_timeout_s
        self._timeout_s = timeout_s
        self._failure_threshold = failure_threshold
        self._reset_timeout_s = reset_timeout_s
        self._max_keys = max_keys
        self._clock = clock
        self._metrics = metrics
        self._degraded_states: dict[Any, bool] = {}
        self._redis: PipelinedRedis | None = None
        self._limiters: dict[tuple[str, str, bool], RateLimiter] = {}

    def backend_of(self, rule: Rule) -> str:
        return rule.backend or self.default_backend

    def limiter_for(self, rule: Rule) -> RateLimiter:
        backend = self.backend_of(rule)
        # Fail-open/closed only matters where the store can fail.
        fail_open = rule.fail_open if backend == "redis" else True
        spec = (rule.algorithm, backend, fail_open)
        limiter = self._limiters.get(spec)
        if limiter is None:
            limiter = build_limiter(
                rule.algorithm,
                backend,
                redis_client=self._client() if backend == "redis" else None,
                key_prefix=self._key_prefix,
                fail_open=fail_open,
                timeout_s=self._timeout_s,
                failure_threshold=self._failure_threshold,
                reset_timeout_s=self._reset_timeout_s,
                max_keys=self._max_keys,
                clock=self._clock,
                metrics=None
                if self._metrics is None
                else _SharedLabelMetrics(self._metrics, spec, self._degraded_states),
            )
            self._limiters[spec] = limiter
        return limiter

    def _client(self) -> PipelinedRedis:
        if self._redis is None:
            timeout_s = self._socket_timeout_s
            self._redis = pipelined_client_for_limiter(self._redis_url, socket_timeout_s=timeout_s)
        return self._redis

    def degraded(self) -> list[str]:
        """`algorithm/backend/fail-open|closed` of every limiter answering from its policy right now."""
        out = []
        for (algorithm, backend, fail_open), limiter in self._limiters.items():
            if isinstance(limiter, ResilientLimiter) and not limiter.healthy():
                out.append(f"{algorithm}/{backend}/fail-{'open' if fail_open else 'closed'}")
        return sorted(out)

    async def readiness_check(self, policies: PolicySet | None = None) -> None:
        """Raises while the store is down (a limiter answers from its policy, or Redis misses a PING).

        `Degraded` when the node still serves its traffic: every Redis rule fails open, or the ones that
        fail closed cover a few routes only (login: those answer 429 on every node alike, so pulling this
        one helps nobody). `BackendError` (not ready) when a fail-closed Redis rule covers every route.
        """
        problem = ", ".join(self.degraded())
        uses_redis = policies is not None and "redis" in policies.backends(self.default_backend)
        if not problem and uses_redis:
            try:
                async with asyncio.timeout(max(self._timeout_s, self._socket_timeout_s)):
                    await self._client().ping()  # type: ignore[misc]
            except Exception as exc:  # noqa: BLE001 - whatever the failure, the store is not answering
                problem = f"ping: {type(exc).__name__}"
        if not problem:
            return
        redis_rules = [
            rule for rule in (policies.rules if policies else ()) if self.backend_of(rule) == "redis"
        ]
        blocking = [rule.name for rule in redis_rules if not rule.fail_open and rule.covers_every_route]
        if blocking:
            raise BackendError(
                f"rate limiter store unavailable ({problem}); "
                f"failing closed on every route: {', '.join(blocking)}"
            )
        closed = [rule.name for rule in redis_rules if not rule.fail_open]
        refusing = f"; refusing (fail-closed): {', '.join(closed)}" if closed else ""
        raise Degraded(f"rate limiter store unavailable ({problem}); failing open{refusing}")

    async def aclose(self) -> None:
        if self._redis is not None:
            await self._redis.aclose()
            self._redis = None


@dataclass(frozen=True, slots=True)
class RuleDecision:
    rule: Rule
    key: str
    backend: str
    decision: Decision


@dataclass(frozen=True, slots=True)
class Verdict:
    """Every applicable rule's decision; `allowed` only if all admitted; `headline` is what headers report."""

    decisions: tuple[RuleDecision, ...]

    @property
    def allowed(self) -> bool:
        return all(item.decision.allowed for item in self.decisions)

    @property
    def headline(self) -> RuleDecision | None:
        """The most restrictive: the refusal with the longest wait, else the least remaining quota."""
        if not self.decisions:
            return None
        refused = [item for item in self.decisions if not item.decision.allowed]
        if refused:
            return max(refused, key=lambda item: item.decision.retry_after_s)
        return min(
            self.decisions,
            key=lambda item: (
                item.decision.remaining / max(1, item.decision.limit),
                item.decision.remaining,
                -item.decision.reset_after_s,
            ),
        )


class PolicyEnforcer:
    """Applies the store's current policies with the pool's limiters.

    Every applicable rule is hit, even after one refuses: each rule is then a plain, independent quota (a
    refused request still counts against the others, which is what slows a guesser that rotates one
    dimension), and the decisions run concurrently so several Redis rules cost one round-trip time.
    """

    def __init__(self, store: PolicyStore, pool: LimiterPool) -> None:
        self.store = store
        self.pool = pool

    def applicable(self, method: str, path: str) -> list[Rule]:
        return self.store.refresh().applicable(method, path)

    async def check(self, keyed: Sequence[tuple[Rule, str]]) -> Verdict:
        if len(keyed) == 1:  # the common case: no task per request
            rule, key = keyed[0]
            decision = await self.pool.limiter_for(rule).hit(key, rule.limit)
            return Verdict((RuleDecision(rule, key, self.pool.backend_of(rule), decision),))
        decisions = await asyncio.gather(
            *(self.pool.limiter_for(rule).hit(key, rule.limit) for rule, key in keyed)
        )
        return Verdict(
            tuple(
                RuleDecision(rule, key, self.pool.backend_of(rule), decision)
                for (rule, key), decision in zip(keyed, decisions, strict=True)
            )
        )

    async def standing(self, keyed: Sequence[tuple[Rule, str]]) -> Verdict:
        """Each rule's state as a `peek` sees it: nothing is consumed."""
        decisions = await asyncio.gather(
            *(self.pool.limiter_for(rule).peek(key, rule.limit) for rule, key in keyed)
        )
        return Verdict(
            tuple(
                RuleDecision(rule, key, self.pool.backend_of(rule), decision)
                for (rule, key), decision in zip(keyed, decisions, strict=True)
            )
        )

    async def readiness_check(self) -> None:
        await self.pool.readiness_check(self.store.current)
