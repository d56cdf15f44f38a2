"""The read-model reconciliation job: each pass checks a sample of every read model against the
write model and exports the drift (`mercato_projection_drift_rows{projection}`). The full check and
the repair are `mercato projections verify NAME [--repair]`."""

from __future__ import annotations

from mercato.bootstrap import Container
from mercato.kit.observability import get_logger
from mercato.kit.projections import PrometheusProjectionHook
from mercato.shop.reporting.reconcile import RECONCILED, Drift, Mode, Reconciler

__all__ = ["ReadModelReconciliation", "build_reconciler"]

_log = get_logger("mercato.reconcile")


def build_reconciler(container: Container) -> Reconciler:
    worker = container.settings.worker
    return Reconciler(
        container.db,
        container.orders,
        container.clock,
        settle_s=worker.reconcile_settle_s,
        sample_size=worker.reconcile_sample,
        cpu=container.cpu_pool,
    )


class ReadModelReconciliation:
    """Checks the read models and reports each outcome to the container's metrics and the log."""

    def __init__(self, container: Container) -> None:
        self.reconciler = build_reconciler(container)
        self._hook = PrometheusProjectionHook.for_registry(container.metrics_registry)

    async def check(self, projection: str, *, mode: Mode) -> Drift:
        drift = await self.reconciler.verify(projection, mode=mode)
        self._hook.reconciled(projection=projection, checked=drift.checked, drift_rows=drift.rows)
        if drift.rows:
            _log.warning(
                "read_model_drift",
                projection=projection,
                mode=mode,
                rows=drift.rows,
                missing=drift.missing[:10],
                wrong=drift.wrong[:10],
                extra=drift.extra[:10],
            )
        return drift

    async def sample_pass(self) -> int:
        """One periodic pass; returns the rows compared (a job's "items handled")."""
        checked = 0
        for projection in RECONCILED:
            checked += (await self.check(projection, mode="sample")).checked
        return checked
