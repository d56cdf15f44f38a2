"""Privacy helpers: personal data kept out of places that outlive their purpose (guide §12)."""

from mercato.kit.privacy.addresses import network_prefix

__all__ = ["network_prefix"]
