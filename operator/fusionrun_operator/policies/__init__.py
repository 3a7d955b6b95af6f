"""Reconcile's decisions as small pure policies, one per module; reconcile.py composes them.

| module | policy |
|---|---|
| `transition` | one task's new record from its record, Jobs and the store (Succeeded, running, lost, gone) |
| `retry` | failure classification from Jobs (permanent or not); Retrying / Failed is jobs.transitions' |
| `restart` | restartFrom + restartNonce (stages to rerun, manifests to invalidate), generation change |
| `deadline` | suspend / failure / deadline stop reasons, the activeDeadlineSeconds clock |
| `start` | which tasks start now and the objects of their next attempt |
| `memoize` | ready tasks the shared cache has (adopt, Memoized) or another run makes now (wait) |
| `status` | the new status: jobs.derive's (both backends'), with `progress`, `compaction`, `events` |
| `invalid_spec` | a spec that does not validate |

Policies take small structs (observations, records, the pipeline) and return data (`effects.Transition`,
records, status); they never call an API or read the store. What a task's record becomes and what the
run's status says are not the operator's own: jobs.transitions and jobs.derive decide them for both
backends, so the local runner's status has the same words for the same history.
"""
