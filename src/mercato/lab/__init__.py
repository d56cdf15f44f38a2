"""Experiments: each tests one claim of the guide with a hypothesis, a run and a measured result.

Every experiment writes its table, JSON, verdict and figure through the harness the benchmarks share,
`mercato.bench.harness` (the bench sits below the lab in the layer contract): a run folder under
``./lab-results/<name>/``, ``--out`` to choose another, ``--update-docs`` to refresh ``docs/lab/<name>.png``.
"""
