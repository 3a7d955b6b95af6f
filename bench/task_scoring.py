"""Scoring a multiple-choice lm-eval task: lm-eval's HFLM against the shared-context LM the evaluate stage
uses (fusion.shared_context: each item's question runs once for its choices), same model, task and items.

    .venv/bin/python -m bench.task_scoring                        # SmolLM2-135M, pkg_docname, 120 items
    .venv/bin/python -m bench.task_scoring --task pkg_nextline --limit 200
    .venv/bin/python -m bench.task_scoring --smoke                # a tiny random model, 12 items

Prints seconds and tokens run per item for each, side by side with the ratio, and checks that every way
gives the same per-item accuracy as HFLM at batch 4 (exit 1 otherwise; never on a timing). The default
task folder is examples/tasks-pkg (`make evidence-data` makes its data), the model the real SmolLM2 of
scripts/fetch-real-models.sh. HFLM runs at the evidence runs' batch size (4) and at 16.
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from bench.timing import machine_load

ROOT = Path(__file__).resolve().parent.parent
SMOLLM2 = ROOT / ".cache/models/smollm2-135m/SmolLM2-135M-Instruct.Q4_1.gguf"
MAX_LENGTH = 2048


def tiny_task(folder: Path) -> Path:
    """A multiple-choice task of 12 items (4 choices each, contexts of a few dozen tokens) for --smoke."""
    (folder / "data").mkdir(parents=True, exist_ok=True)
    words = [
        "alpha",
        "beta",
        "gamma",
        "delta",
        "epsilon",
        "zeta",
        "eta",
        "theta",
        "iota",
        "kappa",
        "mu",
        "nu",
    ]
    rows = [
        {
            "doc": f"Return the {w} of the {words[(i + 3) % 12]} table, or None when it has no {w} row.",
            "choices": [f"get_{w}", f"set_{w}", f"{w}_rows", "parse"],
            "answer": i % 4,
        }
        for i, w in enumerate(words)
    ]
    (folder / "data" / "tiny.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (folder / "tiny_mc.yaml").write_text(
        (ROOT / "examples/tasks-pkg/pkg_docname.yaml")
        .read_text()
        .replace("task: pkg_docname", "task: tiny_mc")
        .replace("data/pkg_docname.jsonl", "data/tiny.jsonl")
    )
    return folder


def load(smoke: bool) -> tuple[Any, Any]:
    from fusion.hub import load_tokenizer
    from fusion.models import load_model

    if smoke:
        tok = load_tokenizer("pkg://mistral_common/data/tokenizer.model.v1")
        ri = {"architecture": "llama", "hidden_size": 32, "num_layers": 2, "num_heads": 2, "seed": 0}
        return load_model(None, random_init=ri, vocab_size=len(tok), device="cpu", dtype="float32"), tok
    if not SMOLLM2.is_file():
        sys.exit(f"bench.task_scoring: no {SMOLLM2}: run scripts/fetch-real-models.sh (or use --smoke)")
    tok = load_tokenizer(str(SMOLLM2.parent), SMOLLM2.name)
    model = load_model(str(SMOLLM2.parent), SMOLLM2.name, vocab_size=len(tok), eos_token_id=tok.eos_token_id)
    return model, tok


class Counting:
    """Tokens through the model's embeddings (what each way of scoring ran)."""

    def __init__(self, model: Any):
        self.tokens = 0
        self.hook = model.get_input_embeddings().register_forward_hook(self._count)

    def _count(self, module: Any, inputs: Any, output: Any) -> None:
        self.tokens += inputs[0].numel()


def score(lm: Any, model: Any, task: str, manager: Any, limit: int) -> tuple[float, int, dict[str, Any]]:
    """Seconds, tokens run, and the scores as the evaluate stage keeps them (fusion.benchmarks.score_task)."""
    from fusion.benchmarks import TaskRequest, score_task

    counter = Counting(model)
    t0 = time.perf_counter()
    out = score_task(lm, TaskRequest(task, limit=limit), manager, bootstrap_iters=0)
    seconds = time.perf_counter() - t0
    counter.hook.remove()
    return seconds, counter.tokens, out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tasks", type=Path, default=ROOT / "examples/tasks-pkg")
    ap.add_argument("--task", default="pkg_docname")
    ap.add_argument("--limit", type=int, default=120)
    ap.add_argument("--smoke", action="store_true", help="a tiny random model on a 12-item task")
    args = ap.parse_args(argv)
    from lm_eval.models.huggingface import HFLM

    from fusion.benchmarks import task_manager, wrap_model

    with tempfile.TemporaryDirectory() as tmp:
        tasks, task = (tiny_task(Path(tmp)), "tiny_mc") if args.smoke else (args.tasks, args.task)
        data = tasks / "data"
        if not args.smoke and not any(data.glob(f"{task}*.jsonl")):
            sys.exit(f"bench.task_scoring: no data for {task} in {data}: run `make evidence-data`")
        model, tok = load(args.smoke)
        manager = task_manager([tasks], builtin=False)
        ways = {
            f"HFLM, batch {b}": HFLM(
                pretrained=model, tokenizer=copy.deepcopy(tok), max_length=MAX_LENGTH, batch_size=b
            )
            for b in (4, 16)
        }
        # What the evaluate stage scores with (fusion.benchmarks.wrap_model), at the same batch size.
        ways["shared context"] = wrap_model(model, copy.deepcopy(tok), None, MAX_LENGTH, 4)
        results = {name: score(lm, model, task, manager, args.limit) for name, lm in ways.items()}
    return report(results, task)


def report(results: dict[str, tuple[float, int, dict[str, Any]]], task: str) -> int:
    """The side-by-side table; exit 1 when a way of scoring gives other per-item results than HFLM's."""
    base_s, _, base = results["HFLM, batch 4"]
    want = base["per_doc"][task]
    items = len(want["doc_ids"])
    print(f"\n{task}, {items} items ({machine_load()})")
    print(f"{'':<18}{'s/item':>10}{'tokens/item':>14}{'time vs HFLM b4':>18}{'acc':>8}")
    failed = []
    for name, (seconds, tokens, out) in results.items():
        acc = out["results"][task]["metrics"]["acc"]["value"]
        ratio = seconds / base_s
        print(f"{name:<18}{seconds / items:>10.3f}{tokens / items:>14.0f}{ratio:>18.2f}{acc:>8.3f}")
        if out["per_doc"][task] != want:
            failed.append(f"{name}: per-item accuracy differs from HFLM's (batch 4)")
    for f in failed:
        print(f"FAILED {f}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
