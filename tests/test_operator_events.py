"""Events posted from a reconcile pass outside kopf's handler context (the resync thread) still reach the
API server: `kubectl describe fusionrun` must show every transition, whichever thread made it."""

from __future__ import annotations

import threading

import pytest
from kubernetes import client

from tests.harness.k8s import (  # noqa: F401  (fixtures)
    ControlPlane,
    k8s_fixture,
    k8s_namespace_fixture,
    wait_until,
)

pytestmark = pytest.mark.k8s


def test_event_from_a_thread_without_kopf_context_is_posted(
    k8s: ControlPlane, k8s_namespace: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    from fusionrun_operator import kube

    api = k8s.api()  # the operator's clients, pointed at this API server
    monkeypatch.setattr(
        kube,
        "_clients",
        {
            "core": client.CoreV1Api(api),
            "batch": client.BatchV1Api(api),
            "custom": client.CustomObjectsApi(api),
        },
    )
    uid = "0a1b2c3d-0000-4000-8000-000000000001"
    fr = {
        "apiVersion": "fusionrun.dev/v1alpha1",
        "kind": "FusionRun",
        "metadata": {"name": "evrun", "namespace": k8s_namespace, "uid": uid},
    }
    # A plain thread has no kopf event queue: kopf.event raises LookupError there.
    msg = "extract-a-00000: attempt 2"
    t = threading.Thread(target=kube.post_event, args=(fr, "Normal", "TaskRetrying", msg))
    t.start()
    t.join(timeout=30)

    core = client.CoreV1Api(api)

    def posted() -> list:
        items = core.list_namespaced_event(k8s_namespace).items
        return [e for e in items if e.involved_object.name == "evrun"]

    (ev,) = wait_until(posted, timeout=20, what="the event to be listed")
    assert (ev.reason, ev.type, ev.message) == ("TaskRetrying", "Normal", msg)
    obj = ev.involved_object
    assert (obj.kind, obj.api_version, obj.uid) == ("FusionRun", "fusionrun.dev/v1alpha1", uid)
