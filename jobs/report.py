"""The run report: report.md + report.json + PNG plots, from what the stages left in the store.

  - held-out bits per byte (and perplexity): target before training, CLM-only baseline, FuseLLM, each source
    (evaluate/metrics.json)
  - training loss curves (train/<variant>/history.jsonl; for older runs the JSON lines of the train logs)
  - how often MinCE picked each candidate (fuse manifests' summaries)
  - per-task timings (manifests' started_at / finished_at)
  - lm-evaluation-harness benchmark tasks (evaluate/metrics.json "tasks"): a table per task, FuseLLM minus
    each trained baseline with its interval, and a plot
The first lines say what the run can show: a run of tiny random-init models shows that every stage works,
not whether fusion helps; a run of pretrained models leads with FuseLLM against CLM-only.
Written to a local folder and copied into the store under report/. Everything missing is reported as
missing, not invented.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from fusion.diagnostics import from_record, merge
from jobs.complete import read_manifest
from jobs.observe import alignment_from_store
from jobs.plan import build_dag, trained_variants
from jobs.progress import TrainingHistory, read_history
from jobs.registry import BASELINES, Layout, Stage, Task, Variant
from jobs.spec import FusionRunSpec
from jobs.store import Store, StoreError

LABELS = {
    "target-before": "target (before)",
    "clm": "CLM only",
    "self": "self-distillation",
    "sources": "sources only",
    "fused": "FuseLLM",
}


def ordered_models(metrics: dict[str, Any] | None) -> list[tuple[str, dict[str, Any]]]:
    """(label, figures) in reading order: target before training, CLM only, FuseLLM, then the sources."""
    models = (metrics or {}).get("models") or {}
    head = [k for k in LABELS if k in models]
    rest = sorted(k for k in models if k not in LABELS)
    return [(LABELS.get(k, k.removeprefix("source:") + " (source)"), models[k]) for k in [*head, *rest]]


def _json(store: Store, key: str) -> Any:
    try:
        return json.loads(store.get_bytes(key)) if store.exists(key) else None
    except (StoreError, ValueError):
        return None


def loss_curve(obj: Any) -> list[tuple[int, float]]:
    """(step, loss) pairs from a training progress record, whatever its nesting: the first list of
    mappings that have a step and a loss (loss, train_loss or total_loss)."""
    if isinstance(obj, list) and obj and all(isinstance(x, dict) for x in obj):
        pts = []
        for x in obj:
            loss = next((x[k] for k in ("loss", "train_loss", "total_loss") if k in x), None)
            if "step" in x and isinstance(loss, int | float):
                pts.append((int(x["step"]), float(loss)))
        if pts:
            return pts
    if isinstance(obj, dict):
        for v in obj.values():
            pts = loss_curve(v)
            if pts:
                return pts
    return []


def loss_curve_from_log(text: str, key: str = "loss") -> list[tuple[int, float]]:
    """(step, loss) from JSON log lines (the train stage's structured progress lines). The local runner
    appends each attempt to the same log: a later attempt's figure for a step replaces an earlier one, so a
    resumed run keeps the steps done before the interruption, a redone run replaces the steps it logs. An
    attempt that starts with another length (total_steps changed in the spec) is another training: the
    curve restarts there instead of mixing two runs' steps."""
    rows: list[dict[str, Any]] = []
    total = None
    for line in text.splitlines():
        line = line.strip()
        if not line.startswith("{"):
            continue
        try:
            obj = json.loads(line)
        except ValueError:
            continue
        if not isinstance(obj, dict):
            continue
        if obj.get("event") == "start" and "total_steps" in obj:
            if total is not None and obj["total_steps"] != total:
                rows.clear()
            total = obj["total_steps"]
        elif isinstance(obj.get(key), int | float):
            rows.append({"step": obj.get("step"), "loss": obj[key]})
    return sorted(dict(loss_curve(rows)).items())


def _stored_history(store: Store, variant: str) -> TrainingHistory | None:
    try:
        return read_history(store, variant)
    except StoreError:
        return None


def loss_curves(
    store: Store, spec: FusionRunSpec, log_dir: Path | None = None
) -> dict[str, list[tuple[int, float]]]:
    """Each variant's (step, loss) curve, and FuseLLM's CLM term alone ("fused-clm": the like-for-like
    comparison with CLM-only). From the training history in the store (train/<variant>/history.jsonl, so a
    run made on Kubernetes has its curves too); for runs made before histories existed, from a progress
    record holding a list, else from the local runner's train logs."""
    curves: dict[str, list[tuple[int, float]]] = {}
    for v in trained_variants(spec):
        history = _stored_history(store, v)
        if history is not None and history.steps():
            if v == "fused":  # (before "fused": the plot's colours stay as the log-based curves had them)
                curves["fused-clm"] = history.curve("clm_loss")
            curves[v] = history.curve("loss")
            continue
        pts = loss_curve(_json(store, Layout.progress(v)))
        if not pts and log_dir is not None:
            log = log_dir / f"{Task(Stage.train, variant=v).id}.log"
            if log.is_file():
                text = log.read_text(errors="replace")
                pts = loss_curve_from_log(text)
                if v == "fused":
                    curves["fused-clm"] = loss_curve_from_log(text, "clm_loss")
        curves[v] = pts
    return curves


def source_value(store: Store, dag: list[Any]) -> dict[str, Any] | None:
    """The source-value diagnostics of FuseLLM's fuse tasks, merged over shards (fusion.diagnostics):
    what each source could teach the target before any training. None when not recorded."""
    parts = []
    for t in dag:
        if t.stage is Stage.fuse and t.variant in (None, Variant.fused.value):
            record = _json(store, Layout.source_value(t))
            if not isinstance(record, dict):
                return None  # a shard fused before the diagnostics existed: no partial figure
            parts.append(from_record(record))
    return merge(parts).summary() if parts else None


def render_source_value(summary: dict[str, Any] | None) -> list[str]:
    if not summary:
        return []
    lines = [
        "## Can the sources teach the target? (before training: fusion.diagnostics)",
        "",
        f"**Verdict:** {summary['verdict']}.",
        "",
        "On each source's aligned positions, bits per byte of the target's next tokens, as fusion uses each "
        "distribution (its k entries, renormalised; a gold token outside them charged 1e-4) and in full:",
        "",
        "| source | coverage | target (fused view) | source (fused view) | target (full) | source (full) | "
        "gold missed: target / source | per-document oracle | MinCE |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for src in summary["sources"]:
        fv, full, miss = src["fused_view_bpb"], src["full_softmax_bpb"], src["miss_rate"]
        lines.append(
            f"| {src['source']} | {src['coverage']:.1%} | {fv['target']:.4f} | {fv['source']:.4f} | "
            f"{full['target']:.4f} | {full['source']:.4f} | {miss['target']:.1%} / {miss['source']:.1%} | "
            f"{fv['document_oracle']:.4f} | {fv['mince']:.4f} |"
        )
    return [*lines, ""]


def collect(store: Store, spec: FusionRunSpec, log_dir: Path | None = None) -> dict[str, Any]:
    dag = build_dag(spec)
    tasks = {}
    choice: dict[str, int] = {}
    for t in dag:
        m = read_manifest(store, t)
        if m is None:
            tasks[t.id] = {"state": "missing"}
            continue
        tasks[t.id] = {
            "state": "complete",
            "seconds": round(m["finished_at"] - m["started_at"], 2),
            "counts": m.get("counts", {}),
        }
        if t.stage is Stage.fuse and t.variant in (None, Variant.fused.value):  # FuseLLM's own choices
            for name, n in (m.get("summary", {}).get("choice_counts") or {}).items():
                choice[name] = choice.get(name, 0) + int(n)
    return {
        "tasks": tasks,
        "metrics": _json(store, Layout.METRICS),
        "loss_curves": loss_curves(store, spec, log_dir),
        "mince_choices": choice,
        "source_value": source_value(store, dag),
        "alignment": alignment_from_store(
            store, dag, {t for t, v in tasks.items() if v["state"] == "complete"}
        ),
        "fusion": spec.fusion.model_dump(by_alias=True),
        # Decided from the spec: every model random-init means the numbers cannot speak to fusion's worth.
        "tiny_random_init": all(m.random_init is not None for m in spec.models),
    }


def _plot_bpb(metrics: dict[str, Any], path: Path) -> bool:
    rows = [
        (name, m["bits_per_byte"])
        for name, m in ordered_models(metrics)
        if m.get("bits_per_byte") is not None
    ]
    if not rows:
        return False
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 3.5))
    ax.bar([r[0] for r in rows], [r[1] for r in rows], color="#4477aa")
    ax.set_ylabel("held-out bits per byte (lower is better)")
    for i, (_, v) in enumerate(rows):
        ax.text(i, v, f"{v:.3f}", ha="center", va="bottom", fontsize=8)
    plt.setp(ax.get_xticklabels(), rotation=20, ha="right")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return True


def _plot_loss(curves: dict[str, list[tuple[int, float]]], path: Path) -> bool:
    if not any(curves.values()):
        return False
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 3.5))
    styles = {
        "fused": ("FuseLLM (total loss)", "-"),
        "fused-clm": ("FuseLLM, its CLM term", ":"),
        "clm": ("CLM only", "-"),
    }
    for name, pts in curves.items():
        if pts:
            label, style = styles.get(name, (name, "-"))
            ax.plot([p[0] for p in pts], [p[1] for p in pts], style, label=label)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("training loss")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return True


def _plot_choices(choice: dict[str, int], path: Path) -> bool:
    if not choice:
        return False
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 3))
    ax.bar(list(choice), list(choice.values()), color="#228833")
    ax.set_ylabel("times picked by MinCE")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return True


BASELINE_NAMES = {"clm": "CLM-only", "self": "self-distillation", "sources": "sources only"}


def _plot_alignment(alignment: dict[str, dict[str, Any]], path: Path) -> bool:
    """One stacked bar per source: the share of target positions received, and lost by cause."""
    if not alignment:
        return False
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    parts = (
        ("received", "received"),
        ("lost_at_boundary", "lost at a boundary"),
        ("lost_no_boundary", "no boundary"),
        ("lost_special", "special token"),
        ("lost_normalised", "normalised"),
    )
    names = list(alignment)
    fig, ax = plt.subplots(figsize=(6, 0.6 + 0.5 * len(names)))
    left = [0.0] * len(names)
    for key, label in parts:
        share = [alignment[n].get(key, 0) / max(alignment[n].get("positions", 0), 1) for n in names]
        ax.barh(names, share, left=left, label=label)
        left = [a + b for a, b in zip(left, share, strict=True)]
    ax.set_xlim(0, 1)
    ax.set_xlabel("share of the target's predicting positions")
    ax.legend(loc="lower center", bbox_to_anchor=(0.5, 1.0), ncol=3, fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def _difference_line(diff: dict[str, float] | None, baseline: str = "clm") -> list[str]:
    if not diff:
        return []
    return [
        f"FuseLLM minus {BASELINE_NAMES[baseline]}: {diff['bits_per_byte']:+.4f} bits per byte (95% paired "
        "bootstrap interval over the held-out documents: "
        f"{diff['ci95_low']:+.4f} to {diff['ci95_high']:+.4f}; negative favours FuseLLM).",
        "",
    ]


def _difference_lines(block: dict[str, Any]) -> list[str]:
    """FuseLLM against every baseline the run trained (evaluate's fused_minus_<baseline>)."""
    return [line for b in BASELINE_NAMES for line in _difference_line(block.get(f"fused_minus_{b}"), b)]


def render_alignment(alignment: dict[str, dict[str, Any]]) -> list[str]:
    """Per source: what reached the target's positions, the byte-boundary bound, the probability mass that
    reached the target vocabulary, the positions lost by cause (jobs.status.alignment_diagnostics)."""
    if not alignment:
        return []
    lines = [
        "## Alignment: what reached the target",
        "",
        "| source | method | positions | received | bound (boundaries coincide) | mass reached | lost: no "
        "boundary | lost: at a boundary | lost: special | lost: normalised |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, d in alignment.items():
        n = max(d.get("positions", 0), 1)
        lost = [
            d.get(k, 0) / n
            for k in ("lost_no_boundary", "lost_at_boundary", "lost_special", "lost_normalised")
        ]
        lines.append(
            f"| {name} | {d.get('method')} | {d.get('positions')} | {d.get('received_fraction', 0):.1%} | "
            f"{d.get('boundary_fraction', 0):.1%} | {d.get('mass_fraction', 0):.1%} | "
            + " | ".join(f"{x:.1%}" for x in lost)
            + " |"
        )
    return [*lines, ""]


def ordered_labels(models: dict[str, Any]) -> list[str]:
    head = [k for k in LABELS if k in models]
    return [*head, *sorted(k for k in models if k not in LABELS)]


def label_name(key: str) -> str:
    return LABELS.get(key, key.removeprefix("source:") + " (source)")


def _fmt(v: Any, digits: int = 4) -> str:
    return f"{v:.{digits}f}" if isinstance(v, int | float) else ("n/a" if v is None else str(v))


def _interval(d: dict[str, Any]) -> str:
    if "ci95_low" not in d:
        return f"{d['delta']:+.4f} (no interval: per-document values not available)"
    return f"{d['delta']:+.4f} (95% paired bootstrap interval {d['ci95_low']:+.4f} to {d['ci95_high']:+.4f})"


def headline(data: dict[str, Any]) -> list[str]:
    """The report's first lines: what this run can and cannot show, then its comparison that matters."""
    metrics = data.get("metrics") or {}
    if data.get("tiny_random_init"):
        return [
            "> **Tiny random-init models.** Every model of this run is a tiny randomly initialised one "
            "(the spec sets randomInit for all of them): its numbers show that every stage works end to "
            "end, not whether fusion helps. For the evidence on real pretrained models see docs/results.md.",
            "",
        ]
    out = []
    diff = metrics.get("fused_minus_clm")
    if diff:
        out.append(
            "**FuseLLM vs CLM-only (same data, steps, seed and schedule):** held-out bits per byte "
            f"{diff['bits_per_byte']:+.4f} (95% paired bootstrap interval {diff['ci95_low']:+.4f} to "
            f"{diff['ci95_high']:+.4f}; negative favours FuseLLM)."
        )
    elif metrics.get("models"):
        out.append(
            "No CLM-only baseline in this run (training.clmBaseline: false): nothing isolates what fusion "
            "adds over training on the same data; FuseLLM is compared with the target before training only."
        )
    own = metrics.get("fused_minus_self")
    if own:
        out.append(
            "**FuseLLM vs self-distillation (the target as its own only teacher: what a source's knowledge "
            f"adds beyond regularisation):** {own['bits_per_byte']:+.4f} "
            f"(95% interval {own['ci95_low']:+.4f} to {own['ci95_high']:+.4f})."
        )
    if data.get("source_value"):
        out.append(f"Before training, the sources' value: {data['source_value']['verdict']}.")
    for name, row in (metrics.get("task_summary") or {}).items():
        block = (metrics.get("tasks") or {}).get(name, {})
        better = block.get("higher_is_better", {}).get(row["metric"])
        sign = "" if better is None else (" (higher is better)" if better else " (lower is better)")
        for baseline in BASELINES:
            d = block.get(f"fused_minus_{baseline}", {}).get(row["metric"])
            if d:
                who = BASELINE_NAMES[baseline]
                out.append(f"- {name}, {row['metric']}{sign}: FuseLLM minus {who} {_interval(d)}.")
    return [*out, ""] if out else []


def render_tasks(metrics: dict[str, Any]) -> list[str]:
    """A table per lm-eval result: each model's metrics with lm-eval's stderr, then FuseLLM minus each
    trained baseline."""
    lines: list[str] = []
    for name, b in (metrics.get("tasks") or {}).items():
        names = b.get("metric_names") or []
        shots = b.get("num_fewshot")
        limit = f", first {b['limit']} documents (limit)" if b.get("limit") else ""
        lines += [
            f"## Benchmark: {name} (lm-evaluation-harness)",
            "",
            f"{b.get('samples', '?')} documents, {shots}-shot{limit}. Each metric as lm-eval reports it, "
            "± its stderr (N/A where lm-eval computes none).",
            "",
            "| model | " + " | ".join(names) + " |",
            "|---|" + "---|" * len(names),
        ]
        for label in ordered_labels(b.get("models") or {}):
            figs = b["models"][label]
            cells = [
                f"{_fmt(figs.get(m, {}).get('value'))} ± {_fmt(figs.get(m, {}).get('stderr'))}" for m in names
            ]
            lines.append(f"| {label_name(label)} | " + " | ".join(cells) + " |")
        lines.append("")
        for baseline in BASELINES:
            for m, d in (b.get(f"fused_minus_{baseline}") or {}).items():
                lines.append(f"- FuseLLM minus {BASELINE_NAMES[baseline]}, {m}: {_interval(d)}.")
        lines.append("")
    return lines


def _plot_tasks(metrics: dict[str, Any], path: Path) -> bool:
    """Each requested task's main metric per model, with lm-eval's stderr as error bars."""
    rows = metrics.get("task_summary") or {}
    tasks = metrics.get("tasks") or {}
    if not rows:
        return False
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = ordered_labels(
        {k: 1 for row in rows.values() for k in row if k != "metric" and not k.startswith("fused_minus_")}
    )
    fig, ax = plt.subplots(figsize=(max(5, 1.6 * len(rows) * max(1, len(labels)) / 3), 3.5))
    width = 0.8 / max(1, len(labels))
    for j, label in enumerate(labels):
        xs, ys, errs = [], [], []
        for i, (name, row) in enumerate(rows.items()):
            fig_ = tasks.get(name, {}).get("models", {}).get(label, {}).get(row["metric"], {})
            if fig_.get("value") is None:
                continue
            xs.append(i + (j - (len(labels) - 1) / 2) * width)
            ys.append(fig_["value"])
            errs.append(fig_["stderr"] if isinstance(fig_.get("stderr"), int | float) else 0.0)
        ax.bar(xs, ys, width, yerr=errs, label=label_name(label), capsize=2)
    ax.set_xticks(range(len(rows)))
    ax.set_xticklabels([f"{n}\n{r['metric']}" for n, r in rows.items()], fontsize=8)
    ax.set_ylabel("main metric (lm-eval)")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return True


def render_markdown(run_name: str, data: dict[str, Any], plots: dict[str, str]) -> str:
    lines = [f"# FusionRun {run_name}", "", *headline(data)]
    metrics = data.get("metrics") or {}
    models = ordered_models(metrics)
    if models:
        lines += [
            "## Held-out evaluation",
            "",
            f"{metrics.get('heldout', {}).get('documents', '?')} held-out documents, "
            f"{metrics.get('heldout', {}).get('bytes', '?')} bytes.",
            "",
            "| model | bits per byte | perplexity (own tokens) | tokens |",
            "|---|---|---|---|",
        ]
        for name, m in models:
            lines.append(
                f"| {name} | {m.get('bits_per_byte', float('nan')):.4f} | "
                f"{m.get('perplexity', float('nan')):.2f} | {m.get('tokens', '?')} |"
            )
        lines.append("")
        lines += _difference_lines(metrics)
    else:
        lines += ["## Held-out evaluation", "", "No metrics (evaluation disabled or not run).", ""]
    for name, block in (metrics.get("corpora") or {}).items():
        lines += [
            f"## Held-out text: {name}",
            "",
            f"{block.get('documents', '?')} documents, {block.get('bytes', '?')} bytes (evaluation.corpora).",
            "",
            "| model | bits per byte | perplexity (own tokens) |",
            "|---|---|---|",
        ]
        nan = float("nan")
        lines += [
            f"| {label} | {m.get('bits_per_byte', nan):.4f} | {m.get('perplexity', nan):.2f} |"
            for label, m in ordered_models(block)
        ]
        lines.append("")
        lines += _difference_lines(block)
    lines += render_tasks(metrics)
    lines += render_source_value(data.get("source_value"))
    lines += render_alignment(data.get("alignment") or {})
    titles = (
        ("bpb", "bits per byte"),
        ("tasks", "benchmark tasks"),
        ("loss", "training loss"),
        ("alignment", "alignment: positions by outcome, per source"),
    )
    for key, title in (*titles, ("choices", "MinCE choices")):
        if key in plots:
            lines += [f"![{title}]({plots[key]})", ""]
    if data.get("mince_choices"):
        total = sum(data["mince_choices"].values())
        lines += [
            "## Fusion: candidate picked by MinCE",
            "",
            "| candidate | picked | share |",
            "|---|---|---|",
        ]
        for name, n in data["mince_choices"].items():
            lines.append(f"| {name} | {n} | {n / total:.1%} |")
        lines.append("")
    lines += ["## Tasks", "", "| task | state | seconds |", "|---|---|---|"]
    for tid, t in data["tasks"].items():
        lines.append(f"| {tid} | {t['state']} | {t.get('seconds', '')} |")
    return "\n".join(lines) + "\n"


def write_report(store: Store, spec: FusionRunSpec, run_name: str, out_dir: Path, result: Any = None) -> Path:
    """Write report.md, report.json and plots into out_dir, copy them to the store; return report.md."""
    out_dir.mkdir(parents=True, exist_ok=True)
    data = collect(store, spec, out_dir.parent / Layout.LOGS)
    if result is not None:
        data["this_invocation"] = {
            "outcomes": result.outcomes,
            "seconds": {k: round(v, 2) for k, v in result.seconds.items()},
        }
    plots = {}
    for key, fn, arg in (
        ("bpb", _plot_bpb, data["metrics"]),
        ("tasks", _plot_tasks, data["metrics"] or {}),
        ("loss", _plot_loss, data["loss_curves"]),
        ("choices", _plot_choices, data["mince_choices"]),
        ("alignment", _plot_alignment, data["alignment"]),
    ):
        if fn(arg, out_dir / f"{key}.png"):
            plots[key] = f"{key}.png"
    (out_dir / "report.json").write_text(json.dumps(data, indent=1, sort_keys=True, default=str))
    md = out_dir / "report.md"
    md.write_text(render_markdown(run_name, data, plots))
    for p in out_dir.iterdir():
        if p.is_file():
            store.upload(p, f"{Layout.REPORT}/{p.name}")
    return md
