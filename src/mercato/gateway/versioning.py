"""API versions at the edge: media-type negotiation, deprecation headers and adoption metrics.

A version is chosen by the URL (`/v1/...`, `/v2/...`) or, on any versioned path, by
`Accept: application/vnd.mercato.v2+json`: when the requested version has a route for the same
method and path, the request is rewritten to it before routing, so one handler serves both ways
in. A request for a version without such a route is served by the path's version (never a 406:
a client that prefers v2 everywhere keeps working on resources that have only a v1).

Responses of an operation with a newer successor carry RFC 9745 `Deprecation` (`@<unix-seconds>`),
RFC 8594 `Sunset` (an HTTP-date) and `Link: </v2/...>; rel="successor-version"`. Responses that
`Accept` could have changed say `Vary: Accept`; a JSON body sent because the client asked for a
vendor media type is labelled with it. Every versioned request counts once in
`mercato_http_requests_by_version_total{version, selected_by}` (`path` or `accept`), the adoption
figure that decides when a sunset can actually happen.

The scope is rewritten in place, not copied: the edge reads the matched route from the same dict, so
metrics and spans name the route that really ran.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import UTC, datetime
from email.utils import format_datetime
from typing import TYPE_CHECKING, Any, Final
from urllib.parse import quote

from prometheus_client import CollectorRegistry
from starlette.routing import BaseRoute, Route
from starlette.types import ASGIApp, Scope

from mercato.kit.observability.loop_metrics import LoopCounter

__all__ = [
    "V1_POLICY",
    "DeprecationPolicy",
    "VersionMetrics",
    "Versioning",
    "document_versioning",
    "requested_version",
    "vendor_media_type",
]

LATEST_VERSION: Final = 2

_VERSIONED_PATH = re.compile(r"^/v([0-9]{1,3})(/.*)?$")
_VENDOR_RANGE = re.compile(r"^application/vnd\.mercato\.v([0-9]{1,3})\+json$")
_JSON = b"application/json"
_RAW_VERSION_PREFIX = re.compile(rb"^/v[0-9]{1,3}(?=/|$)")
_MEMO_SIZE = 4096

if TYPE_CHECKING:
    from mercato.gateway.edge import Exchange


def vendor_media_type(version: int) -> str:
    return f"application/vnd.mercato.v{version}+json"


@dataclass(frozen=True, slots=True)
class DeprecationPolicy:
    """When a version was deprecated and when it stops being served (policy: at least 12 months)."""

    deprecated_at: datetime
    sunset_at: datetime

    def __post_init__(self) -> None:
        if self.sunset_at <= self.deprecated_at:
            raise ValueError("a sunset comes after the deprecation")

    @property
    def deprecation_header(self) -> str:
        # RFC 9745: a structured-field Date, `@` and the Unix time in seconds.
        return f"@{int(self.deprecated_at.timestamp())}"

    @property
    def sunset_header(self) -> str:
        # RFC 8594: an IMF-fixdate, e.g. `Tue, 30 Nov 2027 23:59:59 GMT`.
        return format_datetime(self.sunset_at.astimezone(UTC), usegmt=True)


# v1 of every resource that has a v2: deprecated the day v2 shipped, served for 12 more months.
V1_POLICY: Final = DeprecationPolicy(
    deprecated_at=datetime(2026, 11, 25, tzinfo=UTC),
    sunset_at=datetime(2027, 11, 30, 23, 59, 59, tzinfo=UTC),
)


class VersionMetrics:
    def __init__(self, registry: CollectorRegistry) -> None:
        # Recorded into by the edge step on the event loop's thread (`record`, no lock).
        self.requests = LoopCounter(
            "mercato_http_requests_by_version_total",
            "Requests to versioned routes, by the API version served and how it was selected "
            "(path or accept).",
            ["version", "selected_by"],
            registry=registry,
        )

    def observe(self, *, version: int, selected_by: str) -> None:
        self.requests.labels(f"v{version}", selected_by).inc()


def requested_version(accept: str | None) -> int | None:
    """The vendor version the Accept header prefers (highest q, then first listed), if any."""
    if not accept:
        return None
    best: tuple[float, int] | None = None
    # Bounded: a header with thousands of ranges is not worth parsing past the first few dozen.
    for media_range in accept.split(",")[:32]:
        media, *params = (part.strip() for part in media_range.split(";"))
        match = _VENDOR_RANGE.match(media.lower())
        if match is None:
            continue
        quality = 1.0
        for param in params:
            name, _, value = param.partition("=")
            if name.strip().lower() == "q":
                try:
                    quality = float(value)
                except ValueError:
                    quality = 0.0
        if quality <= 0:
            continue
        if best is None or quality > best[0]:
            best = (quality, int(match.group(1)))
    return best[1] if best else None


class _RouteIndex:
    """Which versioned (method, path) pairs have a route.

    Built once from the routers' own routes (their paths carry the `/vN` prefix) and grouped by
    version, so a lookup tries only that version's compiled path regexes, the ones the router uses.
    """

    def __init__(self, routes: Iterable[BaseRoute]) -> None:
        self._by_version: dict[int, list[tuple[re.Pattern[str], frozenset[str]]]] = {}
        for route in routes:
            if not isinstance(route, Route) or not route.methods:
                continue
            match = _VERSIONED_PATH.match(route.path)
            if match is not None:
                entry = (route.path_regex, frozenset(route.methods))
                self._by_version.setdefault(int(match.group(1)), []).append(entry)

        # (version, rest, method) -> answer: a repeat request skips the regex walk. Bounded (paths carry
        # ids): emptied when full, which costs one walk per entry again.
        self._memo: dict[tuple[int, str, str], bool] = {}

    def exists(self, version: int, rest: str, method: str) -> bool:
        key = (version, rest, method)
        found = self._memo.get(key)
        if found is None:
            path = f"/v{version}{rest}"
            found = any(
                method in methods and regex.match(path) is not None
                for regex, methods in self._by_version.get(version, ())
            )
            if len(self._memo) >= _MEMO_SIZE:
                self._memo.clear()
            self._memo[key] = found
        return found

    def negotiable(self, served: int, rest: str, method: str, latest: int) -> bool:
        """Another version serves this method and path, so `Accept` could have changed the answer."""
        return any(other != served and self.exists(other, rest, method) for other in range(1, latest + 1))


class Versioning:
    """Edge step: the `Accept`-selected version's rewrite, deprecation headers and adoption metrics."""

    def __init__(
        self,
        *,
        routes: Iterable[BaseRoute],
        metrics: VersionMetrics,
        policies: dict[int, DeprecationPolicy] | None = None,
        latest: int = LATEST_VERSION,
    ) -> None:
        self.routes = _RouteIndex(routes)
        self.metrics = metrics
        self.policies = policies if policies is not None else {1: V1_POLICY}
        self.latest = latest
        # The counter's children, resolved once per (version, selected_by).
        self._counters: dict[tuple[int, str], LoopCounter] = {}
        self._encoded: dict[DeprecationPolicy, list[tuple[bytes, bytes]]] = {}
        self._links: dict[tuple[bytes, bytes], bytes] = {}
        self._plans: dict[tuple[str, str, bytes | None, bytes, str | None], _Plan] = {}

    def _link(self, raw_path: bytes, scope: Scope) -> bytes:
        """The successor's `Link` value for this raw path and query; memoised (bounded), as quoting
        it costs more than the rest of the step."""
        query: bytes = scope.get("query_string", b"")
        key = (raw_path, query)
        link = self._links.get(key)
        if link is None:
            target = _with_version(raw_path, self.latest) + (b"?" + query if query else b"")
            if len(self._links) >= _MEMO_SIZE:
                self._links.clear()
            link = self._links[key] = b"<" + _header_safe(target) + b'>; rel="successor-version"'
        return link

    def _policy_headers(self, policy: DeprecationPolicy) -> list[tuple[bytes, bytes]]:
        """`Deprecation` and `Sunset` of a policy, encoded once (formatting a date costs per request)."""
        found = self._encoded.get(policy)
        if found is None:
            found = self._encoded[policy] = [
                (b"deprecation", policy.deprecation_header.encode("latin-1")),
                (b"sunset", policy.sunset_header.encode("latin-1")),
            ]
        return found

    async def __call__(self, ex: Exchange) -> ASGIApp | None:
        scope = ex.scope
        accept = ex.header(b"accept")
        # What this step does depends only on these: decided once per distinct request line and Accept
        # (bounded), so a repeated read costs a lookup, its counter and its header hook.
        key = (ex.method, ex.path, scope.get("raw_path"), scope.get("query_string", b""), accept)
        plan = self._plans.get(key)
        if plan is None:
            if len(self._plans) >= _MEMO_SIZE:
                self._plans.clear()
            plan = self._plans[key] = self._plan(ex.method, ex.path, scope, accept)
        if plan is _UNVERSIONED:
            return None
        if plan.path is not None:
            ex.path = scope["path"] = plan.path
            scope["raw_path"] = plan.raw_path
        plan.counter.record()
        if plan.hook is not None:
            ex.on_start(plan.hook)
        return None

    def _plan(self, method: str, path: str, scope: Scope, accept: str | None) -> _Plan:
        match = _VERSIONED_PATH.match(path)
        if match is None:
            return _UNVERSIONED
        path_version, rest = int(match.group(1)), match.group(2) or ""
        requested = requested_version(accept)
        served, selected_by = path_version, "path"
        new_path = new_raw = None
        raw_path = _raw_path(scope)
        if (
            requested is not None
            and requested != path_version
            and self.routes.exists(requested, rest, method)
        ):
            served, selected_by = requested, "accept"
            new_path = f"/v{served}{rest}"
            new_raw = raw_path = _with_version(raw_path, served)
        counter = self._counters.get((served, selected_by))
        if counter is None:
            counter = self.metrics.requests.labels(f"v{served}", selected_by)
            self._counters[(served, selected_by)] = counter

        extra: list[tuple[bytes, bytes]] = []
        policy = self.policies.get(served)
        successor = served != self.latest and self.routes.exists(self.latest, rest, method)
        if policy is not None and successor:
            # Built from the raw (percent-encoded) bytes: the decoded path may hold any character,
            # and a header value may only hold bytes a client can read back unchanged.
            extra += [*self._policy_headers(policy), (b"link", self._link(raw_path, scope))]
        negotiable = successor or self.routes.negotiable(served, rest, method, self.latest)
        labelled = vendor_media_type(served).encode("latin-1") if requested == served else None
        hook = None
        if extra or negotiable or labelled is not None:
            hook = _Rewrite(tuple(extra), negotiable, labelled)
        return _Plan(new_path, new_raw, counter, hook)


class _Rewrite:
    """The response-header rewrite of one plan (`_rewrite` with its arguments bound)."""

    __slots__ = ("done", "extra", "labelled", "negotiable")

    def __init__(
        self, extra: tuple[tuple[bytes, bytes], ...], negotiable: bool, labelled: bytes | None
    ) -> None:
        self.extra = list(extra)
        self.negotiable = negotiable
        self.labelled = labelled
        # Results by the headers given: a prepared answer hands the same ones every time.
        self.done: dict[tuple[tuple[bytes, bytes], ...], list[tuple[bytes, bytes]]] = {}

    def __call__(self, _status: int, headers: list[tuple[bytes, bytes]]) -> None:
        given = tuple(headers)
        result = self.done.get(given)
        if result is None:
            _rewrite(headers, self.extra, self.negotiable, self.labelled)
            if len(self.done) >= 8:
                self.done.clear()
            self.done[given] = list(headers)
        else:
            headers[:] = result


class _Plan:
    """What the step does to one request line and Accept: the rewritten path (or None), the adoption
    counter's child to count it with, and the response-header rewrite (or None)."""

    __slots__ = ("counter", "hook", "path", "raw_path")

    def __init__(self, path: str | None, raw_path: bytes | None, counter: Any, hook: _Rewrite | None) -> None:
        self.path = path
        self.raw_path = raw_path
        self.counter = counter
        self.hook = hook


_UNVERSIONED = _Plan(None, None, None, None)


def _raw_path(scope: Scope) -> bytes:
    raw: bytes | None = scope.get("raw_path")
    return raw if raw else quote(scope["path"]).encode("ascii")


def _with_version(raw_path: bytes, version: int) -> bytes:
    """`/v1/products/x` -> `/v2/products/x`, on the raw bytes (the version prefix is plain ASCII)."""
    return _RAW_VERSION_PREFIX.sub(b"/v" + str(version).encode("ascii"), raw_path, count=1)


def _header_safe(value: bytes) -> bytes:
    # Percent-encode anything outside visible ASCII (and `<`, `>`), so it cannot end the link early.
    return quote(value, safe="/?=&%:@!$'()*+,;~-._").encode("ascii")


def _rewrite(
    original: list[tuple[bytes, bytes]],
    extra: list[tuple[bytes, bytes]],
    negotiable: bool,
    labelled: bytes | None,
) -> None:
    headers: list[tuple[bytes, bytes]] = []
    vary: list[bytes] = []
    for key, value in original:
        lower = key.lower()
        if lower == b"vary":
            vary.append(value)
        elif lower == b"content-type" and labelled is not None and value.split(b";")[0].strip() == _JSON:
            headers.append((key, labelled))
        else:
            headers.append((key, value))
    if negotiable:
        values = [v.strip() for item in vary for v in item.split(b",") if v.strip()]
        if b"accept" not in {v.lower() for v in values}:
            values.append(b"Accept")
        vary = [b", ".join(values)]
    headers.extend((b"vary", value) for value in vary)
    headers.extend(extra)
    original[:] = headers


_HEADER_DOCS: Final[dict[str, dict[str, Any]]] = {
    "Deprecation": {
        "schema": {"type": "string", "pattern": "^@[0-9]+$"},
        "description": "RFC 9745: when this version was deprecated, `@<unix-seconds>`.",
    },
    "Sunset": {
        "schema": {"type": "string"},
        "description": "RFC 8594: the HTTP-date after which this version is no longer served.",
    },
    "Link": {
        "schema": {"type": "string"},
        "description": 'The successor: `</v2/...>; rel="successor-version"`.',
    },
}
_VARY_DOC: Final = {"schema": {"type": "string"}, "description": "Includes `Accept` (media-type versioning)."}


def document_versioning(schema: dict[str, Any], *, latest: int = LATEST_VERSION) -> None:
    """Mark v1 operations that have a successor deprecated, with their headers and v2 media type.

    Every response of such an operation documents `Deprecation`, `Sunset` and `Link`; its 200 also
    documents the successor's body under `application/vnd.mercato.v2+json`, which is what `Accept`
    selects. The successor's own 200 documents that media type too.
    """
    paths: dict[str, dict[str, Any]] = schema.get("paths", {})
    for path, item in paths.items():
        match = _VERSIONED_PATH.match(path)
        if match is None or int(match.group(1)) == latest:
            continue
        successor_item = paths.get(f"/v{latest}{match.group(2) or ''}", {})
        for method, operation in item.items():
            successor = successor_item.get(method)
            if not isinstance(operation, dict) or not isinstance(successor, dict):
                continue
            operation["deprecated"] = True
            for response in operation.get("responses", {}).values():
                headers = response.setdefault("headers", {})
                for name, doc in _HEADER_DOCS.items():
                    headers.setdefault(name, doc)
                headers.setdefault("Vary", _VARY_DOC)
            ok = successor.get("responses", {}).get("200", {})
            successor_body = ok.get("content", {}).get("application/json")
            if successor_body is None:
                continue
            ok.setdefault("content", {})[vendor_media_type(latest)] = successor_body
            ok.setdefault("headers", {}).setdefault("Vary", _VARY_DOC)
            own = operation.get("responses", {}).get("200")
            if own is not None:
                own.setdefault("content", {})[vendor_media_type(latest)] = successor_body
