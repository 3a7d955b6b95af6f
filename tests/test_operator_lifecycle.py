"""The operator against a real API server, with its stage pods really run (stand-in kubelet, real S3):
retries, permanent failures, operator crashes, suspend/resume, deletion.

Each test stops its run early (held pods) so that only the first stages do work: the whole DAG runs in
test_operator_e2e.py. Task ids come from jobs.plan, Job names are `<run>-<task>-<attempt>`.
"""

from __future__ import annotations

import time

import pytest

from tests.harness.fusionrun_k8s import (  # noqa: F401  (fixtures)
    RunEnv,
    StatusRecorder,
    condition,
    fusionrun_env_fixture,
    pod_task,
    task_selector,
)
from tests.harness.k8s import k8s_fixture, k8s_namespace_fixture, kubelet_fixture, wait_until  # noqa: F401

pytestmark = [pytest.mark.k8s, pytest.mark.s3]

EXTRACTS = ("extract-target-00000", "extract-qwen-00000")


def succeeded(env: RunEnv, run: str, task_id: str) -> dict | None:
    """The task's status once it is Succeeded (else None): for wait_until."""
    t = env.task(run, task_id)
    return t if t.get("state") == "Succeeded" else None


def is_extract(pod: dict) -> bool:
    return pod_task(pod).startswith("extract-")


def test_failed_pod_is_retried_then_succeeds(fusionrun_env: RunEnv) -> None:
    env = fusionrun_env
    fault = env.kubelet.fail(task_selector("prepare"), exit_code=1, times=1, message="node lost")
    env.kubelet.hold(is_extract)  # the run goes no further than prepare
    with StatusRecorder(env.k8s, env.ns, "retry") as rec:
        assert env.apply("retry", env.spec()) == "fusionrun.fusionrun.dev/retry created"
        prepare = wait_until(
            lambda: succeeded(env, "retry", "prepare"), 120, "prepare to succeed after one retry"
        )
    assert (prepare["attempts"], prepare["failures"]) == (2, 1)
    assert fault.hits == 1
    # Exact transitions (Pending may pass unseen: the first pass already starts prepare).
    assert rec.tasks["prepare"] in (
        ["Pending", "Running", "Retrying", "Running", "Succeeded"],
        ["Running", "Retrying", "Running", "Succeeded"],
    )
    # The task counts as done once its outputs are in the store; its Job completes right after. The failed
    # attempt's Job was deleted before the retry: on this 1.20 server a failed Job can start its pod again
    # (capabilities.failed_jobs_final), which would run beside the retry.
    expected = {"retry-prepare-2": "Complete"}
    wait_until(
        lambda: {n: o for n, o in env.outcomes("retry").items() if "prepare" in n} == expected,
        30,
        f"the prepare Jobs to end as {expected}",
    )
    # Retrying one task does not fail the run, and prepare's outputs are in the store.
    assert env.status("retry")["phase"] == "Running"
    assert "runs/retry/prepare/manifest.json" in env.keys("runs/retry/prepare/")


def test_permanent_failure_fails_fast_with_the_reason(fusionrun_env: RunEnv) -> None:
    env = fusionrun_env
    # Exit code 2 is how stage jobs report bad input: retrying cannot help.
    env.kubelet.fail(task_selector("prepare"), exit_code=2, times=None, message="bad corpus")
    started = time.monotonic()
    with StatusRecorder(env.k8s, env.ns, "broken") as rec:
        env.apply("broken", env.spec())
        st = env.wait_phase("broken", "Failed", 60)
    elapsed = time.monotonic() - started
    assert rec.tasks["prepare"] in (["Running", "Failed"], ["Pending", "Running", "Failed"])
    assert rec.phases in (["Running", "Failed"], ["Pending", "Running", "Failed"])

    failed = condition(st, "Failed")
    assert failed is not None and failed["status"] == "True"
    assert failed["reason"] == "InvalidInput"
    assert "attempt 1 exited with code 2 (bad input: retrying cannot help" in failed["message"]
    assert condition(st, "Succeeded")["status"] == "False"
    prepare = env.task("broken", "prepare")
    assert (prepare["state"], prepare["attempts"], prepare["failures"]) == ("Failed", 1, 1)
    # No retry, no later stage: exactly one Job, failed.
    assert env.outcomes("broken") == {"broken-prepare-1": "Failed"}
    assert elapsed < 30, f"a permanent failure took {elapsed:.0f} s to fail the run"
    assert len(env.kubelet.runs) == 1


def test_operator_killed_mid_run_creates_no_duplicate_jobs(fusionrun_env: RunEnv) -> None:
    env = fusionrun_env
    hold = env.kubelet.hold(is_extract)
    env.apply("crash", env.spec())
    wait_until(lambda: len(hold.held) == 2, 120, "both extract pods to be running")
    wait_until(lambda: env.outcomes("crash").get("crash-prepare-1") == "Complete", 30, "prepare's Job")
    before = env.outcomes("crash")
    assert before == {
        "crash-prepare-1": "Complete",
        "crash-extract-target-00000-1": "Active",
        "crash-extract-qwen-00000-1": "Active",
    }

    env.operator.kill()  # SIGKILL: no chance to tidy up
    env.operator.start()
    # A restarted operator resumes every run (kopf on.resume) and then re-reconciles it every second:
    # let it resume and make a few more passes, then check that it adopted the running Jobs.
    wait_until(
        lambda: "Handler 'on_run_changed' succeeded" in env.operator.log().split("start #2")[-1],
        30,
        "the restarted operator to resume the run",
    )
    time.sleep(4)
    assert env.operator.alive()
    assert env.outcomes("crash") == before
    for task_id in EXTRACTS:
        t = env.task("crash", task_id)
        assert (t["state"], t["attempts"]) == ("Running", 1), t

    hold.release()
    wait_until(lambda: env.task("crash", "align-qwen-00000").get("attempts"), 120, "align to start")
    jobs = set(env.jobs("crash"))
    assert jobs == {
        "crash-prepare-1",
        "crash-extract-target-00000-1",
        "crash-extract-qwen-00000-1",
        "crash-align-qwen-00000-1",
    }, jobs
    assert len(env.kubelet.runs_matching(task_selector("prepare"))) == 1


def test_suspend_deletes_running_jobs_and_resume_reruns_them(fusionrun_env: RunEnv) -> None:
    env = fusionrun_env
    hold = env.kubelet.hold(is_extract)
    with StatusRecorder(env.k8s, env.ns, "pause") as rec:
        env.apply("pause", env.spec())
        wait_until(lambda: len(hold.held) == 2, 120, "both extract pods to be running")
        # prepare's Job completes a moment after its outputs land in the store (which starts extract).
        wait_until(lambda: env.outcomes("pause").get("pause-prepare-1") == "Complete", 30, "prepare's Job")

        env.k8s.kubectl(
            "patch", "fusionrun", "pause", "--type=merge", "-p", '{"spec":{"suspend":true}}', namespace=env.ns
        )
        st = env.wait_phase("pause", "Suspended", 30)
        assert condition(st, "Suspended")["status"] == "True"
        # The extract Jobs are deleted (and with them their pods and processes); prepare's finished Job stays.
        wait_until(lambda: set(env.jobs("pause")) == {"pause-prepare-1"}, 30, "extract Jobs to be deleted")
        wait_until(
            lambda: all(r.killed for r in env.kubelet.runs_matching(is_extract)),
            30,
            "the held extract pods to be gone",
        )
        time.sleep(3)  # suspended: nothing new is created however often it reconciles
        assert set(env.jobs("pause")) == {"pause-prepare-1"}
        for task_id in EXTRACTS:
            assert env.task("pause", task_id)["state"] == "Pending"

        hold.release()
        env.kubelet.hold(lambda pod: pod_task(pod).startswith("align-"))
        env.k8s.kubectl(
            "patch",
            "fusionrun",
            "pause",
            "--type=merge",
            "-p",
            '{"spec":{"suspend":false}}',
            namespace=env.ns,
        )
        # Resumed: the interrupted tasks rerun as a new attempt that does not count as a failure.
        for task_id in EXTRACTS:
            t = wait_until(
                lambda tid=task_id: succeeded(env, "pause", tid), 120, f"{task_id} to succeed after resume"
            )
            assert (t["attempts"], t["failures"]) == (2, 0)
        st = env.status("pause")
        assert st["phase"] == "Running" and condition(st, "Suspended")["status"] == "False"
    assert rec.phases[-3:] == ["Running", "Suspended", "Running"]
    assert rec.tasks["extract-qwen-00000"][-4:] == ["Running", "Pending", "Running", "Succeeded"]
    expected = {
        "pause-prepare-1": "Complete",
        "pause-extract-target-00000-2": "Complete",
        "pause-extract-qwen-00000-2": "Complete",
    }
    wait_until(
        lambda: {n: env.outcomes("pause").get(n) for n in expected} == expected,
        30,
        f"the Jobs to end as {expected}",
    )
    outcomes = env.outcomes("pause")
    assert not {"pause-extract-target-00000-1", "pause-extract-qwen-00000-1"} & set(outcomes)


@pytest.mark.parametrize("delete_artifacts", [True, False], ids=["deleteArtifacts", "keepArtifacts"])
def test_deleting_a_run_deletes_its_jobs_and_optionally_its_artifacts(
    fusionrun_env: RunEnv, delete_artifacts: bool
) -> None:
    env = fusionrun_env
    env.kubelet.hold(is_extract)
    env.apply("gone", env.spec(deleteArtifacts=delete_artifacts))
    wait_until(lambda: len(env.jobs("gone")) == 3, 120, "prepare done and the extract Jobs created")
    prefix = "runs/gone/"
    assert "runs/gone/prepare/manifest.json" in env.keys(prefix)

    env.k8s.kubectl(
        "delete", "fusionrun", "gone", "--wait=true", "--timeout=60s", namespace=env.ns, timeout=90
    )
    # ownerReferences: kube-controller-manager's garbage collector deletes the Jobs (and their pods).
    wait_until(lambda: not env.jobs("gone"), 60, "the run's Jobs to be garbage-collected")
    wait_until(
        lambda: all(r.killed or r.finished for r in env.kubelet.runs.values()),
        30,
        "the run's pods to be gone",
    )
    keys = env.keys(prefix)
    if delete_artifacts:
        assert keys == []
    else:
        assert "runs/gone/prepare/manifest.json" in keys
