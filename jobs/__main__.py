"""`python -m jobs <stage> [--model M] [--shard N] [--variant V] [--spec FILE] [--run NAME]`: one task.

This is exactly the command Kubernetes Jobs run (jobs.plan.Task.args()); the spec comes from --spec or env
FUSIONRUN_SPEC (JSON), the run name from --run or env FUSIONRUN_NAME.
"""

from jobs.cli import stage_main

if __name__ == "__main__":
    raise SystemExit(stage_main())
