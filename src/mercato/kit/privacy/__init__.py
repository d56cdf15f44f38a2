"""Privacy: personal data kept out of places that outlive their purpose (guide §12).

Client addresses reduced to their network, envelope encryption with one data key per person
(erasure by crypto-shredding), and the append-only audit log of staff actions.
"""

from mercato.kit.privacy.addresses import network_prefix
from mercato.kit.privacy.audit import AuditEntry, AuditLog
from mercato.kit.privacy.envelope import DataKey, FieldUnreadable, MasterKey
from mercato.kit.privacy.keyring import Keyring

__all__ = ["AuditEntry", "AuditLog", "DataKey", "FieldUnreadable", "Keyring", "MasterKey", "network_prefix"]
