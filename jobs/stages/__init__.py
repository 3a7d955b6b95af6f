"""Stage entrypoints: one module per stage, each with `run(ctx) -> (counts, summary)` (train: `main(argv)`).

Modules import torch (and the fusion core) lazily, inside `run`, so that listing or validating stays light.
"""

STAGE_MODULES = {
    "prepare": "jobs.stages.prepare",
    "extract": "jobs.stages.extract",
    "align": "jobs.stages.align",
    "fuse": "jobs.stages.fuse",
    "train": "jobs.stages.train",
    "evaluate": "jobs.stages.evaluate",
}
