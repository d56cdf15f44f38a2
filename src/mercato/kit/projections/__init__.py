"""CQRS read models: projectors that apply the SQL stream log (`Projector`) or a broker's stream
(`StreamProjector`) to tables, with a transactional checkpoint (never a double apply after a
crash), a lag metric, and rebuild-from-zero with an atomic swap. Generic: a projection names its
topics, its tables and its apply function."""

from mercato.kit.projections.hooks import NullProjectionHook, ProjectionHook, PrometheusProjectionHook
from mercato.kit.projections.projector import (
    REBUILD_SUFFIX,
    BatchHandler,
    Projection,
    ProjectionHandler,
    Projector,
    RebuildIncomplete,
    RebuildReport,
)
from mercato.kit.projections.stream_projector import StreamProjector
from mercato.kit.projections.tables import projection_checkpoints

__all__ = [
    "REBUILD_SUFFIX",
    "BatchHandler",
    "NullProjectionHook",
    "Projection",
    "ProjectionHandler",
    "ProjectionHook",
    "Projector",
    "PrometheusProjectionHook",
    "RebuildIncomplete",
    "RebuildReport",
    "StreamProjector",
    "projection_checkpoints",
]
