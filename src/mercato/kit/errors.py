"""Domain error kinds. Contexts subclass these; the gateway maps each kind to an HTTP status.

Every concrete error has a stable `slug` that becomes its problem `type` URI
(`/problems/<slug>`), and a `title` and `description` for the problem catalogue.
"""

from __future__ import annotations

from typing import Any, ClassVar

__all__ = [
    "Conflict",
    "DomainError",
    "Forbidden",
    "NotFound",
    "PreconditionFailed",
    "RuleViolated",
    "Unauthenticated",
    "registered_errors",
]

_REGISTRY: dict[str, type[DomainError]] = {}


class DomainError(Exception):
    slug: ClassVar[str] = "domain-error"
    title: ClassVar[str] = "Domain rule violated"
    description: ClassVar[str] = "A request broke a rule of the domain."

    def __init__(self, detail: str, **extensions: Any) -> None:
        super().__init__(detail)
        self.detail = detail
        self.extensions = extensions

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if "slug" in cls.__dict__:
            _REGISTRY[cls.slug] = cls


class NotFound(DomainError):
    """The thing does not exist, or the caller may not know that it does."""


class Conflict(DomainError):
    """The request conflicts with the current state of the resource."""


class RuleViolated(DomainError):
    """A well-formed request that breaks a business rule."""


class Unauthenticated(DomainError):
    """Missing or invalid credentials."""


class Forbidden(DomainError):
    """A known caller without the right to do this."""


class PreconditionFailed(DomainError):
    """A conditional request whose condition does not hold."""


def registered_errors() -> dict[str, type[DomainError]]:
    """Every concrete error by slug, for the problem catalogue."""
    return dict(_REGISTRY)
