"""Dynamic configuration: a versioned, validated document in the database, applied atomically by
every process within a bounded time, with each process's running version reported (ADR 0045)."""

from mercato.kit.dynconfig.store import (
    ConfigConflict,
    ConfigInvalid,
    ConfigStore,
    ConfigVersion,
    ProcessReport,
    canonical,
)
from mercato.kit.dynconfig.tables import runtime_config_versions, runtime_processes
from mercato.kit.dynconfig.watcher import (
    ConfigHook,
    ConfigWatcher,
    ProcessIdentity,
    PrometheusConfigHook,
)

__all__ = [
    "ConfigConflict",
    "ConfigHook",
    "ConfigInvalid",
    "ConfigStore",
    "ConfigVersion",
    "ConfigWatcher",
    "ProcessIdentity",
    "ProcessReport",
    "PrometheusConfigHook",
    "canonical",
    "runtime_config_versions",
    "runtime_processes",
]
