"""Stage entrypoints: one module per stage, each with `run(ctx) -> (counts, summary)` (train: `main(argv)`);
the registry names them (`jobs.registry.StageDef.module`).

Modules import torch (and the fusion core) lazily, inside `run`, so that listing or validating stays light.
"""
