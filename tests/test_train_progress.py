"""The training records in the store (jobs.progress) and their writer (jobs.stages.train.StoreRecorder):
the progress record's round trip and old keys, the operator's view of it, the history across preemption
and resume, and the report's loss curves from the store."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from fusion.train.reporting import StepMetrics
from jobs.progress import (
    LEGACY_PROGRESS_KEYS,
    AttemptRow,
    ProgressRecord,
    StepRow,
    TrainingHistory,
    history_key,
    parse_progress,
    progress_key,
    read_history,
    read_progress,
)
from jobs.stages.train import StoreRecorder
from jobs.store import LocalStore

# progress.json as the trainer wrote it before ProgressRecord (fusion/train/loop.py _write_progress)
OLD_FILE = {
    "step": 3,
    "total_steps": 8,
    "loss": 4.25,
    "clm_loss": 4.5,
    "fusion_loss": 2.0,
    "tokens_per_s": 512.0,
    "lr": 0.001,
    "eta_seconds": 10.5,
    "updated_at": "2026-11-02T10:00:00Z",
}


# ------------------------------------------------------------------------------------------------
# progress record


def test_record_round_trips_and_still_writes_the_old_keys():
    rec = ProgressRecord(3, 8, 4.25, 4.5, None, 512.0, 0.001, 10.5, "2026-11-02T10:00:00Z", "running")
    doc = json.loads(rec.to_bytes())
    assert doc["tokens_per_second"] == doc["tokens_per_s"] == 512.0
    assert doc["learning_rate"] == doc["lr"] == 0.001  # an operator of the previous release reads these
    assert doc["fusion_loss"] is None and doc["state"] == "running"
    assert ProgressRecord.from_json(doc) == rec
    assert parse_progress(rec.to_bytes()) == rec == parse_progress(rec.to_bytes().decode())
    assert rec.percent == 37.5


def test_files_with_the_old_keys_are_read():
    rec = parse_progress(json.dumps(OLD_FILE).encode())
    assert rec == ProgressRecord(3, 8, 4.25, 4.5, 2.0, 512.0, 0.001, 10.5, "2026-11-02T10:00:00Z", None)
    # both spellings present: the new one wins
    assert parse_progress({**OLD_FILE, "learning_rate": 0.002}).learning_rate == 0.002


def test_unusable_figures_and_files():
    rec = parse_progress({"step": 2, "total_steps": 0, "loss": math.nan, "lr": "fast", "state": "odd"})
    assert (rec.loss, rec.learning_rate, rec.state, rec.percent) == (None, None, None, 0.0)
    for bad in (b"{not json", b"[1, 2]", {"step": "three", "total_steps": 8}, {"step": None}, None):
        assert parse_progress(bad) is None


@pytest.mark.parametrize(
    "raw",
    [
        OLD_FILE,
        {"step": 8, "total_steps": 8, "loss": 1.0, "tokens_per_s": math.inf},
        ProgressRecord(5, 8, 2.0, 2.5, 1.0, 300.0, 1e-4, 3.0, "2026-11-02T10:00:05Z", "preempted").to_json(),
    ],
)
def test_operator_status_entry_is_what_reconcile_builds_today(raw):
    """The operator's status entry is parse_progress(raw).to_status(v): one reading of progress.json."""
    from fusionrun_operator.policies.progress import parse_progress as operator_entry

    assert parse_progress(raw).to_status("fused") == operator_entry("fused", raw)


# ------------------------------------------------------------------------------------------------
# history


def row(step: int, loss: float | None = None) -> StepRow:
    return StepRow(step, loss if loss is not None else 10.0 - step, clm_loss=11.0 - step)


def test_history_round_trip_skips_unreadable_lines_and_gives_curves():
    h = TrainingHistory()
    h.start_attempt(0, 8, 2, "t0")
    h.add_step(row(1))
    h.add_step(StepRow(2, None))  # a step without a loss figure has no point on the curve
    text = h.to_jsonl() + "garbage\n" + '{"kind": "step"}\n' + '{"kind": "other", "step": 9}\n'
    back = TrainingHistory.from_jsonl(text)
    assert back == h
    assert back.rows[0] == AttemptRow(1, 0, 8, 2, "t0")
    assert back.curve("loss") == [(1, 9.0)] and back.curve("clm_loss") == [(1, 10.0)]


def test_a_resume_drops_what_came_after_its_checkpoint_and_a_new_training_starts_over():
    h = TrainingHistory()
    h.start_attempt(0, 8, 2, "t0")
    for s in range(1, 7):
        h.add_step(row(s))
    h.start_attempt(4, 8, 2, "t1")  # steps 5 and 6 were never checkpointed: they are redone
    assert [r.step for r in h.steps()] == [1, 2, 3, 4]
    assert [(a.attempt, a.start_step) for a in h.attempts()] == [(1, 0), (2, 4)]
    h.add_step(row(5, loss=0.5))
    h.add_step(row(5, loss=0.25))  # the same step reported twice replaces, never doubles
    assert h.curve("loss") == [(1, 9.0), (2, 8.0), (3, 7.0), (4, 6.0), (5, 0.25)]
    h.start_attempt(0, 20, 1, "t2")  # from step 0: --force or changed settings, another training
    assert h.rows == [AttemptRow(1, 0, 20, 1, "t2")]


def metrics(step: int, total: int = 8, fusion: float | None = 1.0) -> StepMetrics:
    return StepMetrics(step, total, 10.0 - step, 11.0 - step, fusion, 1e-3 * step, 64, 640.0, 0.1, 2.0, 0)


class Clock:
    def __init__(self) -> None:
        self.now = 1_800_000_000.0

    def __call__(self) -> float:
        return self.now


def test_recorder_throttles_progress_and_keeps_the_history_whole_across_a_resume(tmp_path: Path):
    store, clock = LocalStore(tmp_path), Clock()
    rec = StoreRecorder(store, "fused", interval_s=10.0, clock=clock)
    rec.attempt_started(0, 8, 2)
    assert read_history(store, "fused").attempts() == [AttemptRow(1, 0, 8, 2, "2027-01-15T08:00:00Z")]
    rec.step(metrics(1))
    clock.now += 4
    rec.step(metrics(2))  # 4 s after the last write: not rewritten
    assert read_progress(store, "fused").step == 1
    clock.now += 6
    rec.step(metrics(3))
    assert read_progress(store, "fused").step == 3
    rec.step(metrics(4))
    rec.checkpoint(4)
    rec.step(metrics(5))
    rec.step(metrics(6))
    rec.checkpoint(6)  # flushed, but suppose the process died before checkpoint 6 was marked complete
    assert [r.step for r in read_history(store, "fused").steps()] == [1, 2, 3, 4, 5, 6]

    again = StoreRecorder(store, "fused", interval_s=10.0, clock=clock)  # the next attempt resumes at 4
    again.attempt_started(4, 8, 2)
    assert [r.step for r in read_history(store, "fused").steps()] == [1, 2, 3, 4]
    for s in range(5, 9):
        again.step(metrics(s))
    assert read_progress(store, "fused").state == "running"  # the last step is always written
    again.finished(metrics(8), "finished")
    h = read_history(store, "fused")
    assert [r.step for r in h.steps()] == list(range(1, 9))
    assert [(a.attempt, a.start_step) for a in h.attempts()] == [(1, 0), (2, 4)]
    assert h.steps()[2] == StepRow(3, 7.0, 8.0, 1.0, 0.003, 640.0, 64, "2027-01-15T08:00:10Z")
    p = read_progress(store, "fused")
    assert (p.step, p.total_steps, p.state, p.learning_rate, p.tokens_per_second) == (
        8,
        8,
        "finished",
        0.008,
        640.0,
    )
    assert json.loads(store.get_bytes(progress_key("fused")))["lr"] == 0.008  # the old key too


def test_a_preempted_attempt_says_so(tmp_path: Path):
    store = LocalStore(tmp_path)
    rec = StoreRecorder(store, "clm", interval_s=0.0)
    rec.attempt_started(0, 8, 1)
    rec.step(metrics(3, fusion=None))
    rec.finished(metrics(3, fusion=None), "preempted")
    p = read_progress(store, "clm")
    assert (p.step, p.state, p.fusion_loss) == (3, "preempted", None)
    assert store.exists(history_key("clm")) and not store.exists(progress_key("fused"))


# ------------------------------------------------------------------------------------------------
# the report's curves


def test_report_curves_come_from_the_store_history_else_from_the_logs(tmp_path: Path):
    from jobs.report import loss_curves
    from jobs.spec import parse_spec

    spec = parse_spec(
        {
            "target": {"name": "t", "tokenizer": "/tok", "randomInit": {}},
            "sources": [{"name": "s", "tokenizer": "/tok", "randomInit": {}}],
            "corpus": {"uri": "/c"},
            "training": {"clmBaseline": True},
            "store": {"uri": f"file://{tmp_path}"},
        }
    )
    store, logs = LocalStore(tmp_path / "run"), tmp_path / "logs"
    logs.mkdir()
    (logs / "train-clm.log").write_text('{"event": "step", "step": 1, "loss": 5.0}\n')
    (logs / "train.log").write_text('{"event": "step", "step": 1, "loss": 99.0, "clm_loss": 98.0}\n')
    rec = StoreRecorder(store, "fused", interval_s=0.0)
    rec.attempt_started(0, 2, 1)
    rec.step(metrics(1, total=2))
    rec.step(metrics(2, total=2))
    rec.finished(metrics(2, total=2), "finished")
    curves = loss_curves(store, spec, logs)
    # fused from the store (a Kubernetes run has no local logs), the CLM-only run of before from its log
    assert curves == {"fused-clm": [(1, 10.0), (2, 9.0)], "fused": [(1, 9.0), (2, 8.0)], "clm": [(1, 5.0)]}
    assert loss_curves(store, spec, None)["clm"] == []


def test_legacy_key_table_names_record_fields():
    assert set(LEGACY_PROGRESS_KEYS.values()) <= set(ProgressRecord.__dataclass_fields__)


def test_the_operator_can_import_the_records_without_torch_or_fusion():
    import subprocess
    import sys

    code = "import sys, jobs.progress; print(sorted(m for m in ('torch', 'fusion') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
