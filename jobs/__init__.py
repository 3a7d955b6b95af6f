"""FusionRun stage jobs, the spec, the DAG, the artifact store and the local runner.

Keep this package's import light: the operator imports jobs.spec, jobs.plan and jobs.store and has no torch.
"""
