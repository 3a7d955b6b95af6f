"""Issue 13 on the operator side, pure and in process: the memoization policy (a ready task the shared cache
already has is adopted, not run; one another run makes now waits; without a lookup it runs as before),
with exact effects, records and events; the claims registry (one writer among runs, released and
expired claims, wake-ups); the FUSIONRUN_REUSE setting. Runs use one source and two shards, as in
test_reconcile.py."""

from __future__ import annotations

import os
import threading
from dataclasses import replace
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

from fusionrun_operator import capabilities as caps
from fusionrun_operator.claims import Claims
from fusionrun_operator.config import OperatorConfig, from_env
from fusionrun_operator.effects import Adoption, Effects, Event
from fusionrun_operator.k8s_objects import RunRef
from fusionrun_operator.observations import JobObservation, Observed, SharedOutput
from fusionrun_operator.policies.compaction import compact
from fusionrun_operator.reconcile import reconcile

from jobs.registry import CacheLayout, Stage
from jobs.settings import Settings
from jobs.status import FusionRunStatus, Memoization, TaskStatus
from tests.test_reconcile import CONFIG, T0, created, ev, job, spec, states

KEY_T0, KEY_S0, KEY_P = "ab" * 32, "cd" * 32, "ef" * 32


def hit(key: str, task: str, run: str = "first") -> SharedOutput:
    return SharedOutput(f"claim-{task}", key, True, run, task)


def run(
    shared: dict[str, SharedOutput] | None = None,
    status: FusionRunStatus | None = None,
    jobs: list[JobObservation] | None = None,
    completed: set[str] = frozenset(),
    config: OperatorConfig = CONFIG,
    made_from: dict[str, SharedOutput] | None = None,
    now: datetime = T0,
    **spec_over: Any,
) -> Effects:
    obs = Observed(
        run=RunRef("demo", "ml", "uid-1", 1),
        spec=spec(**spec_over),
        status=status or FusionRunStatus(),
        jobs=jobs or [],
        now=now,
        completed=frozenset(completed),
        shared=shared or {},
        made_from=made_from or {},
    )
    return reconcile(obs, config)


# --------------------------------------------------------------------------------------------------
# the policy


def test_a_memoized_task_is_adopted_and_creates_no_job() -> None:
    shared = {
        "extract-target-00000": hit(KEY_T0, "extract-target-00000"),
        "extract-smol-00000": hit(KEY_S0, "extract-smol-00000", run="other"),
        "extract-target-00001": SharedOutput("claim-t1", "12" * 32),  # a miss: its Job as before
    }
    p = run(shared, completed={"prepare"})
    assert created(p) == ["demo-extract-target-00001-1", "demo-extract-smol-00001-1"]
    assert p.adopt == [Adoption("extract-target-00000", KEY_T0), Adoption("extract-smol-00000", KEY_S0)]
    assert p.status.task("extract-target-00000") == TaskStatus(
        id="extract-target-00000",
        stage="extract",
        state="Succeeded",
        reason="Memoized",
        message="outputs of first/extract-target-00000 (shared cache, key abababababababab)",
        completion_time="2026-11-25T01:00:00Z",
        memoized=Memoization(
            hit=True, key="abababababababab", from_run="first", from_task="extract-target-00000"
        ),
    )
    assert p.status.task("extract-smol-00000").memoized == Memoization(
        key="cdcdcdcdcdcdcdcd", from_run="other", from_task="extract-smol-00000"
    )
    ex = p.status.stages.extract
    assert (ex.succeeded, ex.running, ex.memoized, ex.shards) == (2, 2, 2, "2/4")
    assert p.status.stages.prepare.memoized is None  # none there: left out of the status
    assert [e for e in p.events if e.reason in ("TaskMemoized", "TaskStarted")] == [
        Event(
            "Normal",
            "TaskMemoized",
            "extract-target-00000: outputs of first/extract-target-00000 "
            "(shared cache, key abababababababab)",
        ),
        Event(
            "Normal",
            "TaskMemoized",
            "extract-smol-00000: outputs of other/extract-smol-00000 (shared cache, key cdcdcdcdcdcdcdcd)",
        ),
        Event("Normal", "TaskStarted", "extract-target-00001: attempt 1: demo-extract-target-00001-1"),
        Event("Normal", "TaskStarted", "extract-smol-00001: attempt 1: demo-extract-smol-00001-1"),
    ]
    assert p.requeue_after == 0.0  # the memoized tasks' dependants are looked at at once
    # as the status is written, camelCase (what `kubectl get fusionrun -o yaml` shows)
    k8s = p.status.to_k8s()
    assert k8s["tasks"][1]["memoized"] == {
        "hit": True,
        "key": "abababababababab",
        "fromRun": "first",
        "fromTask": "extract-target-00000",
    }
    assert k8s["stages"]["extract"]["memoized"] == 2 and "memoized" not in k8s["stages"]["align"]


def test_an_adoption_alone_starts_no_deadline_clock_and_repeats_nothing() -> None:
    p = run({"prepare": hit(KEY_P, "prepare")}, activeDeadlineSeconds=600)
    assert created(p) == [] and p.adopt == [Adoption("prepare", KEY_P)]
    assert states(p)["prepare"] == "Succeeded" and p.status.task("prepare").attempts == 0
    assert (p.status.phase, p.status.start_time, p.status.active_since) == ("Running", None, None)
    assert ev(p) == [
        ("Normal", "TaskMemoized"),
        ("Normal", "JobShape"),
        ("Normal", "Prepared"),  # the stage is done in the same pass
        ("Normal", "RunStarted"),
    ]
    # the next pass finds prepare complete in the store (its manifest points at the entry): no change
    made = {"prepare": hit(KEY_P, "prepare")}
    again = run(status=p.status, completed={"prepare"}, made_from=made, activeDeadlineSeconds=600)
    assert again.adopt == [] and again.status.task("prepare") == p.status.task("prepare")
    assert created(again) == [
        "demo-extract-target-00000-1",
        "demo-extract-target-00001-1",
        "demo-extract-smol-00000-1",
        "demo-extract-smol-00001-1",
    ]
    assert again.status.start_time == "2026-11-25T01:00:00Z"  # the first Job starts the clock
    assert [e.reason for e in again.events].count("TaskSucceeded") == 0


def test_a_task_another_run_makes_waits_then_adopts() -> None:
    producer = SharedOutput("claim-p", None, producer="run first (task prepare)")
    p = run({"prepare": producer})
    assert created(p) == [] and p.adopt == []
    msg = "waiting for run first (task prepare), which makes the same outputs (shared cache)"
    assert p.status.task("prepare") == TaskStatus(
        id="prepare", stage="prepare", state="Pending", reason="WaitingForSharedOutput", message=msg
    )
    assert p.events[0] == Event("Normal", "WaitingForSharedOutput", f"prepare: {msg}")
    assert p.requeue_after == 10.0
    assert (p.status.phase, p.status.message) == (
        "Pending",
        "prepare: 0/1 tasks done, 0 running; 1 waiting for other runs making the same outputs",
    )
    # still waiting: said once
    still = run({"prepare": producer}, status=p.status, now=T0 + timedelta(seconds=10))
    assert still.status.task("prepare") == p.status.task("prepare")
    assert "WaitingForSharedOutput" not in [e.reason for e in still.events]
    # the other run made it: adopted
    done = run({"prepare": hit(KEY_P, "prepare")}, status=still.status, now=T0 + timedelta(seconds=20))
    assert done.adopt == [Adoption("prepare", KEY_P)] and created(done) == []
    t = done.status.task("prepare")
    assert (t.state, t.reason, t.completion_time) == ("Succeeded", "Memoized", "2026-11-25T01:00:20Z")
    # or it gave up (its claim released without an entry): this run makes it, the message cleared
    mine = run({"prepare": SharedOutput("claim-p", None)}, status=still.status)
    assert created(mine) == ["demo-prepare-1"]
    t = mine.status.task("prepare")
    assert (t.state, t.reason, t.message) == ("Running", None, None)


def test_without_a_lookup_or_on_a_miss_the_job_runs_as_before() -> None:
    before = run(completed={"prepare"})
    unknown = {  # an identity no Job recorded yet: a key cannot be made, only the claim
        t: SharedOutput(f"claim-{t}")
        for t in ("extract-target-00000", "extract-target-00001", "extract-smol-00000", "extract-smol-00001")
    }
    assert run(unknown, completed={"prepare"}) == before
    missed = {t: replace(found, key="12" * 32) for t, found in unknown.items()}
    assert run(missed, completed={"prepare"}) == before
    assert created(before) == [
        "demo-extract-target-00000-1",
        "demo-extract-target-00001-1",
        "demo-extract-smol-00000-1",
        "demo-extract-smol-00001-1",
    ]


def test_only_due_tasks_are_adopted() -> None:
    # align's inputs are not complete: a hit there (which the store view would not even look up) waits
    p = run({"align-smol-00000": hit(KEY_P, "align-smol-00000")}, completed={"prepare"})
    assert p.adopt == [] and states(p)["align-smol-00000"] == "Pending"
    # a running task is not due either
    first = run(completed={"prepare"})
    jobs = [job(t, 1) for t in ("extract-target-00000", "extract-target-00001", "extract-smol-00000")]
    jobs.append(job("extract-smol-00001", 1))
    busy = run({"extract-smol-00000": hit(KEY_S0, "extract-smol-00000")}, first.status, jobs, {"prepare"})
    assert busy.adopt == [] and states(busy)["extract-smol-00000"] == "Running"


def test_a_task_whose_job_adopted_inside_is_memoized_too() -> None:
    first = run()
    made = {"prepare": hit(KEY_P, "prepare", run="lam9")}
    p = run(status=first.status, jobs=[job("prepare", 1, "Succeeded")], completed={"prepare"}, made_from=made)
    t = p.status.task("prepare")
    assert (t.state, t.reason, t.attempts, t.job_names) == ("Succeeded", "Memoized", 1, ["demo-prepare-1"])
    assert t.memoized == Memoization(key="efefefefefefefef", from_run="lam9", from_task="prepare")
    assert p.events[0] == Event(
        "Normal", "TaskSucceeded", "prepare: outputs of lam9/prepare (shared cache, key efefefefefefefef)"
    )
    assert p.adopt == []


def test_many_memoized_shards_make_one_event_per_stage_and_an_indexed_group_leaves_them_out() -> None:
    indexed = replace(OperatorConfig(job_image="img:1"), server=caps.from_server((1, 30), None))
    ids = [f"extract-{m}-{s:05d}" for m in ("target", "smol") for s in range(8)]
    shared = {t: hit(f"{i:02d}" * 32, t, run=("a", "b", "c", "d")[i % 4]) for i, t in enumerate(ids)}
    del shared["extract-target-00003"]  # not in the cache: it runs
    p = run(shared, completed={"prepare"}, config=indexed, extraction={"shards": 8})
    assert created(p) == ["demo-extract-target-s3-1"]
    members = p.create[0]["metadata"]["annotations"]["fusionrun.dev/members"]
    assert members == '[["extract-target-00003",1]]' and p.create[0]["spec"]["completions"] == 1
    assert [e for e in p.events if e.reason == "TaskMemoized"] == [
        Event(
            "Normal", "TaskMemoized", "extract: 15 tasks memoized (shared cache), made by a, b, c and 1 more"
        )
    ]
    assert len(p.adopt) == 15 and p.status.stages.extract.memoized == 15


def test_a_big_status_keeps_the_reasons_later_passes_read() -> None:
    memo = TaskStatus(
        id="a",
        stage="extract",
        state="Succeeded",
        reason="Memoized",
        message="outputs of x/a (shared cache, key 0000000000000000)",
        memoized=Memoization(key="0" * 16, from_run="x", from_task="a"),
        completion_time="2026-11-25T01:00:00Z",
    )
    wait = TaskStatus(id="b", stage="extract", reason="WaitingForSharedOutput", message="waiting for ...")
    done = TaskStatus(id="c", stage="extract", state="Succeeded", reason="Completed", message="m")
    slim = compact([memo, wait, done] * 100)
    assert slim[0] == TaskStatus(id="a", stage="extract", state="Succeeded", reason="Memoized")
    assert slim[1] == TaskStatus(id="b", stage="extract", reason="WaitingForSharedOutput")
    assert slim[2] == TaskStatus(id="c", stage="extract", state="Succeeded", message="m")  # as before


# --------------------------------------------------------------------------------------------------
# claims (claims.py)


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_one_run_claims_the_others_wait_and_are_woken_when_it_is_released() -> None:
    clock = Clock()
    claims = Claims(ttl=900, clock=clock)
    a, b = ("ml", "a"), ("ml", "b")
    assert claims.take("k", a, "prepare") is None
    assert claims.take("k", a, "prepare") is None  # its own claim: still its
    held = claims.take("k", b, "prepare")
    assert held is not None and held.describe("ml") == "run a (task prepare)"
    assert held.describe("other") == "run ml/a (task prepare)"
    again = claims.recheck(b)
    assert again("k", clock.now) and not claims.recheck(a)("k", clock.now)  # claimed by another / by itself
    clock.now += 5
    assert claims.settle(a, {"prepare"}) == set()  # still Running: kept (refreshed)
    assert claims.held()["k"].refreshed == 1005.0
    clock.now += 5
    assert claims.settle(a, set()) == {b}  # it succeeded: released, b is woken
    assert claims.held() == {}
    assert again("k", 1009.0) and not again("k", 1011.0)  # released at 1010: a miss remembered before
    assert claims.take("k", b, "prepare") is None
    clock.now += 5
    assert claims.settle(b, set()) == set()  # b's own claim, let go (its task did not start after all)
    assert not again("k", 1012.0)  # changes nothing for b: its remembered miss stands
    assert claims.recheck(a)("k", 1012.0)  # but a looks again


def test_a_tentative_claim_goes_after_the_pass_and_a_stale_one_is_taken_over() -> None:
    clock = Clock()
    claims = Claims(ttl=900, clock=clock)
    a, b = ("ml", "a"), ("ml", "b")
    assert claims.take("k1", a, "extract-x-00000") is None and claims.take("k2", a, "extract-x-00001") is None
    assert claims.settle(a, {"extract-x-00000"}) == set()  # only one started (parallelism): k2 goes
    assert set(claims.held()) == {"k1"}
    clock.now += 901  # a is no longer reconciled: its claim is stale
    assert claims.take("k1", b, "extract-x-00000") is None and claims.held()["k1"].run == b
    assert claims.take("k3", a, "t") is None and claims.take("k3", b, "t") is not None
    assert claims.release_run(a) == {b} and claims.held().keys() == {"k1"}


def test_concurrent_claims_have_one_winner() -> None:
    claims = Claims()
    winners: list[str] = []
    start = threading.Barrier(16)

    def take(i: int) -> None:
        start.wait()
        if claims.take("k", ("ml", f"r{i}"), "prepare") is None:
            winners.append(f"r{i}")

    threads = [threading.Thread(target=take, args=(i,)) for i in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(winners) == 1 and claims.held()["k"].run == ("ml", winners[0])


# --------------------------------------------------------------------------------------------------
# FUSIONRUN_REUSE


def test_reuse_off_reaches_the_stage_pods() -> None:
    assert from_env({}).reuse is True and from_env({"FUSIONRUN_REUSE": "off"}).reuse is False

    def env(config: OperatorConfig) -> dict[str, Any]:
        (c,) = run(config=config).create[0]["spec"]["template"]["spec"]["containers"]
        return {e["name"]: e.get("value") for e in c["env"]}

    assert "FUSIONRUN_REUSE" not in env(CONFIG)
    assert env(replace(CONFIG, reuse=False))["FUSIONRUN_REUSE"] == "off"


# --------------------------------------------------------------------------------------------------
# the store view and the runtime on a real file store, with real prepare tasks (jobs.local)


def _pipeline(tmp_path: Path, **extraction: Any) -> Any:
    from fusionrun_operator.pipeline import Pipeline, parse_pipeline

    from tests.test_local_pipeline import tiny_spec

    corpus = tmp_path / "corpus.txt"
    stat = corpus.stat() if corpus.exists() else None
    doc = tiny_spec(tmp_path)
    if stat is not None:  # rewriting the corpus is an edit (a new stamp): keep its time
        os.utime(corpus, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    doc = {**doc, "evaluation": {"enabled": False}, "extraction": {**doc["extraction"], **extraction}}
    p = parse_pipeline(doc, CONFIG)
    assert isinstance(p, Pipeline), p
    return p


def _prepare(p: Any, run_name: str) -> dict[str, Any]:
    """Run the run's real prepare task (a stage process); returns its manifest."""
    from jobs.complete import read_manifest
    from jobs.local import LocalRunner
    from jobs.store import open_store

    assert LocalRunner(p.spec, run_name).run(until="prepare").outcomes == {"prepare": "ran"}
    m = read_manifest(open_store(p.spec.store, run_name, Settings()), p.by_id["prepare"])
    assert m is not None and m["entry"].startswith("prepare/")
    return m


def test_the_store_view_keys_ready_tasks_as_their_jobs_do_and_finds_entries_leases_and_claims(
    tmp_path: Path,
) -> None:
    from collections import Counter

    from fusionrun_operator.store_view import RunMemo, adopt, read_store_view

    from jobs.cache import cache_of, try_lease
    from jobs.store import open_store

    lam8 = _pipeline(tmp_path)
    fresh = read_store_view(lam8, "lam8").shared
    # no Job recorded the corpus's and tokenizers' identities yet: no key, only the claim
    assert list(fresh) == ["prepare"] and fresh["prepare"].key is None and not fresh["prepare"].hit
    assert fresh["prepare"].claim.startswith(f"file://{tmp_path}/store/_cache#")
    made = _prepare(lam8, "lam9")  # another run (same upstream settings) makes prepare
    found = read_store_view(lam8, "lam8").shared["prepare"]
    # the key from the recorded identities is the key the stage computed from the files themselves
    assert found == SharedOutput(fresh["prepare"].claim, made["cache_key"], True, "lam9", "prepare")
    # the pass adopts it: lam8's manifest points at lam9's entry; the next view sees it complete
    store8 = open_store(lam8.spec.store, "lam8", Settings())
    assert adopt(store8, lam8, "lam8", [Adoption("prepare", made["cache_key"])]) == []
    view = read_store_view(lam8, "lam8")
    assert view.completed == {"prepare"} and view.made_from["prepare"].from_run == "lam9"
    assert (tmp_path / "store" / "_cache" / made["entry"] / "users" / "lam8").is_file()
    # extract's inputs are complete now, but no Job recorded a model's identity: keys unknown, claims made
    assert sorted(view.shared) == [f"extract-{m}-{s:05d}" for m in ("mis", "tgt") for s in (0, 1)]
    assert {f.key for f in view.shared.values()} == {None}

    # another maxLength: another prepare key, a miss; another run's live lease on it: that run makes it
    m48 = _pipeline(tmp_path, maxLength=48)
    miss = read_store_view(m48, "m48").shared["prepare"]
    assert miss.key not in (None, made["cache_key"]) and not miss.hit and miss.producer is None
    cache = cache_of(open_store(m48.spec.store, "m48", Settings()))
    assert try_lease(cache, Stage.prepare, miss.key, "other/prepare@elsewhere:1") is None
    assert read_store_view(m48, "m48").shared["prepare"].producer == "run other (task prepare)"
    cache.delete(f"{CacheLayout.entry(Stage.prepare, miss.key)}/lease.json")
    assert try_lease(cache, Stage.prepare, miss.key, "m48/prepare@elsewhere:1") is None
    assert read_store_view(m48, "m48").shared["prepare"].producer is None  # its own (a Job of it gone)

    # a remembered miss is not read again, unless its claim was taken or released since
    requests: Counter[str] = Counter()
    memo = RunMemo().for_spec("s")
    recheck = {"again": False}

    def view_m48() -> SharedOutput:
        requests.clear()
        v = read_store_view(
            m48,
            "m48",
            memo=memo,
            count=lambda op: requests.update([op]),
            recheck=lambda claim, since: recheck["again"],
        )
        return v.shared["prepare"]

    # heads: prepare's manifest, train's progress, the entry; gets: 3 identity records, the lease
    assert view_m48() == miss and requests == Counter({"head": 3, "get": 4})
    assert view_m48() == miss and requests == Counter()
    recheck["again"] = True
    assert view_m48() == miss and requests == Counter({"head": 1, "get": 4})


def test_deleting_a_run_keeps_the_entries_another_run_uses(tmp_path: Path) -> None:
    from fusionrun_operator.runtime import Operator
    from fusionrun_operator.store_view import adopt, read_store_view

    from jobs.cache import cache_of, list_entries
    from jobs.store import open_store

    lam9, m48 = _pipeline(tmp_path), _pipeline(tmp_path, maxLength=48)
    shared = _prepare(lam9, "lam9")["entry"]
    own = _prepare(m48, "m48")["entry"]  # used by m48 only
    lam8 = _pipeline(tmp_path)
    key = read_store_view(lam8, "lam8").shared["prepare"].key
    assert (
        adopt(open_store(lam8.spec.store, "lam8", Settings()), lam8, "lam8", [Adoption("prepare", key)]) == []
    )
    cache = cache_of(open_store(lam9.spec.store, "lam9", Settings()))
    users = {e.prefix: sorted(e.users) for e in list_entries(cache)}
    assert users == {shared: ["lam8", "lam9"], own: ["m48"]}

    operator = Operator(OperatorConfig(job_image="img:1"))
    n, deleted = operator.delete_artifacts(lam9.spec, "ml", "lam9")
    assert n > 0 and deleted == []  # lam8 uses lam9's entry: it stays
    assert [f for f in (tmp_path / "store" / "lam9").rglob("*") if f.is_file()] == []
    assert {e.prefix: sorted(e.users) for e in list_entries(cache)} == {shared: ["lam8"], own: ["m48"]}
    assert read_store_view(lam8, "lam8").completed == {"prepare"}  # lam8 still complete through it
    _, deleted = operator.delete_artifacts(m48.spec, "ml", "m48")
    assert deleted == [own]  # nobody else used it
    assert [e.prefix for e in list_entries(cache)] == [shared]
