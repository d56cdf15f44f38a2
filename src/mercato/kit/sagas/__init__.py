"""An orchestrated saga engine: persistent state machines with compensations.

A saga is a list of steps, each an action with an optional compensation. The engine persists the
saga's state in the same local transaction as a local step's effects and the events it emits; runs
steps with per-step timeouts and jittered retries; on failure runs the compensations the progress
so far requires, newest first; and resumes every unfinished saga after a crash. One runner drives
one saga at a time, enforced by a lease whose fencing token guards every state write.
"""

from mercato.kit.sagas.definition import (
    EventSink,
    RetrySchedule,
    SagaDefinition,
    StagingEventSink,
    Step,
    StepContext,
    StepRejected,
)
from mercato.kit.sagas.metrics import NullSagaHook, PrometheusSagaHook, SagaHook
from mercato.kit.sagas.runner import SagaRunner
from mercato.kit.sagas.store import SagaInstance, SagaStatus, SagaStepRecord, SagaStore, StepOutcome
from mercato.kit.sagas.wakeups import PostgresSagaWakeups, SagaWakeups

__all__ = [
    "EventSink",
    "NullSagaHook",
    "PostgresSagaWakeups",
    "PrometheusSagaHook",
    "RetrySchedule",
    "SagaDefinition",
    "SagaHook",
    "SagaInstance",
    "SagaRunner",
    "SagaStatus",
    "SagaStepRecord",
    "SagaStore",
    "SagaWakeups",
    "StagingEventSink",
    "Step",
    "StepContext",
    "StepOutcome",
    "StepRejected",
]
