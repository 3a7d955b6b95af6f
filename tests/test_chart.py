"""The Helm chart (charts/fusionrun), with a real helm 3.17.2 (tests/harness/helm.py).

Offline: `helm lint --strict`; `helm template` for several value sets, every rendered object validated
with kubernetes-validate (strict) for two current Kubernetes versions; what each value set must render
(RBAC modes, identities, GPU defaults, hardening); the chart's ConfigMap read by the operator's own
config parser and turned into Jobs by the operator's own manifest code; RBAC derived from the operator's
source; values documented and in sync with the schema and README.

On the local real API server (@pytest.mark.k8s): `helm install`, then the operator runs in a subprocess
with the chart's ConfigMap as its environment and a token of the chart's ServiceAccount, and reconciles an
example FusionRun under exactly the chart's RBAC; then `helm uninstall` leaves only the CRD. Also there:
the API server's own validation (`kubectl apply --dry-run=server`) of every file in examples/.
"""

from __future__ import annotations

import ast
import inspect
import json
import re
import signal
import socket
import subprocess
import sys
import urllib.request
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml
from kubernetes import client

from jobs.plan import build_dag
from jobs.spec import StageResources, parse_fusionrun, parse_spec
from tests.harness.helm import Helm, helm_fixture  # noqa: F401
from tests.harness.k8s import ControlPlane, k8s_fixture, k8s_namespace_fixture, wait_until  # noqa: F401

ROOT = Path(__file__).resolve().parents[1]
CHART = ROOT / "charts" / "fusionrun"
RELEASE = "fr"
NAMESPACE = "fusionrun"
K8S_VERSIONS = ("1.30.0", "1.33.0")
FULLNAME = "fr-fusionrun"

VALUE_SETS: dict[str, dict[str, Any]] = {
    "default": {},
    "namespaced": {"watch": {"clusterWide": False, "namespaces": ["team-a", "team-b"]}},
    "cluster-wide": {"watch": {"clusterWide": True}, "jobServiceAccount": {"extraNamespaces": ["team-c"]}},
    "gpu-nodes": {
        "stageDefaults": {
            stage: {
                "gpus": gpus,
                "nodeSelector": {"nvidia.com/gpu.product": "NVIDIA-H100-80GB-HBM3"},
                "tolerations": [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}],
            }
            for stage, gpus in (("extract", 1), ("train", 8), ("evaluate", 1))
        }
        | {"prepare": {"cpu": "4", "memory": "16Gi"}},
    },
    "s3-secret": {
        "store": {
            "uri": "s3://fusion-artifacts/runs",
            "endpoint": "https://minio.storage.svc:9000",
            "region": "eu-west-1",
            "credentialsSecret": "fusionrun-s3",
        },
        "rbac": {"secretNames": ["fusionrun-s3"]},
    },
    "irsa": {
        "serviceAccount": {
            "annotations": {"eks.amazonaws.com/role-arn": "arn:aws:iam::123456789012:role/op"}
        },
        "jobServiceAccount": {
            "annotations": {"eks.amazonaws.com/role-arn": "arn:aws:iam::123456789012:role/jobs"}
        },
        "store": {"uri": "s3://fusion-artifacts/runs", "region": "us-east-1"},
        "rbac": {"readSecrets": False},
    },
    "bring-your-own": {
        "rbac": {"create": False, "aggregateRoles": False},
        "serviceAccount": {"create": False, "name": "platform-operator"},
        "jobServiceAccount": {"create": False},
    },
    "metrics": {
        "metrics": {
            "port": 9095,
            "service": {"annotations": {"prometheus.io/scrape": "true"}},
            "serviceMonitor": {"enabled": True, "interval": "15s", "labels": {"release": "kube-prometheus"}},
        },
        "operator": {"jobShape": "per-task", "memoizeStore": False},
    },
    "no-metrics": {"metrics": {"enabled": False}, "networkPolicy": {"enabled": True}},
    "hardened-extras": {
        "image": {"digest": "sha256:" + "ab" * 32},
        "imagePullSecrets": ["ghcr-pull"],
        "podDisruptionBudget": {"enabled": True},
        "networkPolicy": {"enabled": True},
        "operator": {"verbose": True},
    },
}


def render(helm: Helm, values: dict[str, Any], tmp_path: Path, *extra: str) -> list[dict[str, Any]]:
    vf = tmp_path / "values.yaml"
    vf.write_text(yaml.safe_dump(values))
    out = helm.run("template", RELEASE, str(CHART), "--namespace", NAMESPACE, "-f", str(vf), *extra).stdout
    return [d for d in yaml.safe_load_all(out) if d]


def find(objs: list[dict[str, Any]], kind: str, name: str | None = None, ns: str | None = None) -> list[dict]:
    return [
        o
        for o in objs
        if o["kind"] == kind
        and (name is None or o["metadata"]["name"] == name)
        and (ns is None or o["metadata"].get("namespace") == ns)
    ]


def one(objs: list[dict[str, Any]], kind: str, name: str | None = None, ns: str | None = None) -> dict:
    found = find(objs, kind, name, ns)
    assert len(found) == 1, f"expected one {kind} {name or ''} in {ns or 'any namespace'}, got {len(found)}"
    return found[0]


def rule_set(role: dict[str, Any]) -> set[tuple[str, str, str]]:
    return {
        (g, r, v)
        for rule in role["rules"]
        for g in rule["apiGroups"]
        for r in rule["resources"]
        for v in rule["verbs"]
    }


# The operator's namespaced API use (fusionrun_operator.kube + kopf), as test_rbac_matches_operator_code
# derives it from the source: keep the two in step.
OPERATOR_RULES = {
    ("fusionrun.dev", "fusionruns", "get"),
    ("fusionrun.dev", "fusionruns", "list"),
    ("fusionrun.dev", "fusionruns", "watch"),
    ("fusionrun.dev", "fusionruns", "patch"),
    ("fusionrun.dev", "fusionruns/status", "patch"),
    ("batch", "jobs", "list"),
    ("batch", "jobs", "watch"),
    ("batch", "jobs", "create"),
    ("batch", "jobs", "delete"),
    ("", "services", "create"),
    ("", "pods", "list"),
    ("", "events", "create"),
    ("", "secrets", "get"),
}
CRD_READ = {("apiextensions.k8s.io", "customresourcedefinitions", v) for v in ("list", "watch")}
NAMESPACE_READ = {("", "namespaces", v) for v in ("list", "watch")}


@pytest.fixture(scope="module")
def rendered(helm: Helm, tmp_path_factory: pytest.TempPathFactory) -> dict[str, list[dict[str, Any]]]:
    return {
        name: render(helm, values, tmp_path_factory.mktemp(name), "--include-crds")
        for name, values in VALUE_SETS.items()
    }


# --------------------------------------------------------------------------------------------------
# lint and schema


@pytest.mark.parametrize("name", list(VALUE_SETS))
def test_helm_lint_strict(helm, tmp_path, name):
    vf = tmp_path / "values.yaml"
    vf.write_text(yaml.safe_dump(VALUE_SETS[name]))
    out = helm.run("lint", "--strict", str(CHART), "-f", str(vf)).stdout
    assert "1 chart(s) linted, 0 chart(s) failed" in out


@pytest.mark.parametrize(
    ("values", "message"),
    [
        (
            {"watch": {"clusterWide": "yes"}},
            "watch.clusterWide: Invalid type. Expected: boolean, given: string",
        ),
        (
            {"stageDefaults": {"train": {"gpu": 8}}},
            "stageDefaults.train: Additional property gpu is not allowed",
        ),
        (
            {"stageDefaults": {"train": {"memory": "lots"}}},
            "stageDefaults.train.memory: Does not match pattern",
        ),
        ({"image": {"pullPolicy": "Sometimes"}}, "image.pullPolicy: image.pullPolicy must be one of"),
        ({"store": {"uri": "gs://bucket"}}, "store.uri: Does not match pattern"),
        ({"storeUri": "s3://x"}, "Additional property storeUri is not allowed"),
        (
            {"serviceAccount": {"create": False}},
            "serviceAccount.name is required when serviceAccount.create is false",
        ),
        (
            {"podDisruptionBudget": {"enabled": True, "minAvailable": 1, "maxUnavailable": 1}},
            "podDisruptionBudget: set minAvailable or maxUnavailable, not both",
        ),
    ],
)
def test_bad_values_fail_with_a_clear_message(helm, tmp_path, values, message):
    vf = tmp_path / "values.yaml"
    vf.write_text(yaml.safe_dump(values))
    proc = helm.run("template", RELEASE, str(CHART), "-f", str(vf), check=False)
    assert proc.returncode != 0
    assert message in proc.stderr, proc.stderr


# --------------------------------------------------------------------------------------------------
# every rendered object is valid Kubernetes


@pytest.mark.parametrize("version", K8S_VERSIONS)
@pytest.mark.parametrize("name", list(VALUE_SETS))
def test_rendered_objects_validate(rendered, name, version):
    objs = rendered[name]
    assert objs
    for obj in objs:
        if obj["apiVersion"].startswith("monitoring.coreos.com/"):
            continue  # a Prometheus Operator CRD kubernetes-validate does not know: test_metrics checks it
        kubernetes_validate.validate(obj, version, strict=True)


def test_validation_can_fail(rendered):
    """kubernetes-validate rejects what the chart must never render (a typo'd field, a bad type)."""
    deployment = json.loads(json.dumps(one(rendered["default"], "Deployment")))
    deployment["spec"]["template"]["spec"]["containers"][0]["securityContxt"] = {}
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(deployment, "1.33.0", strict=True)
    deployment = json.loads(json.dumps(one(rendered["default"], "Deployment")))
    deployment["spec"]["replicas"] = "one"
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(deployment, "1.33.0", strict=True)


# --------------------------------------------------------------------------------------------------
# what each value set renders


def test_default_deployment(rendered):
    objs = rendered["default"]
    dep = one(objs, "Deployment", FULLNAME, NAMESPACE)
    assert dep["spec"]["replicas"] == 1 and dep["spec"]["strategy"] == {"type": "Recreate"}
    pod = dep["spec"]["template"]["spec"]
    assert pod["serviceAccountName"] == FULLNAME
    assert pod["securityContext"] == {
        "runAsNonRoot": True,
        "runAsUser": 10001,
        "runAsGroup": 10001,
        "fsGroup": 10001,
        "seccompProfile": {"type": "RuntimeDefault"},
    }
    (c,) = pod["containers"]
    assert c["image"] == "ghcr.io/fusionrun/fusionrun-operator:0.1.0"
    assert c["command"] == ["fusionrun-operator"] and "args" not in c
    assert c["securityContext"] == {
        "allowPrivilegeEscalation": False,
        "readOnlyRootFilesystem": True,
        "runAsNonRoot": True,
        "capabilities": {"drop": ["ALL"]},
        "seccompProfile": {"type": "RuntimeDefault"},
    }
    assert c["ports"] == [
        {"name": "liveness", "containerPort": 8080, "protocol": "TCP"},
        {"name": "metrics", "containerPort": 8081, "protocol": "TCP"},
    ]
    assert c["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "liveness"}
    assert c["envFrom"] == [{"configMapRef": {"name": FULLNAME}}]
    assert c["volumeMounts"] == [{"name": "tmp", "mountPath": "/tmp"}]
    assert pod["volumes"] == [{"name": "tmp", "emptyDir": {"sizeLimit": "64Mi"}}]
    assert c["resources"]["limits"] == {"memory": "512Mi"}
    # The pod rolls when its settings change.
    assert re.fullmatch(
        r"[0-9a-f]{64}", dep["spec"]["template"]["metadata"]["annotations"]["checksum/config"]
    )
    assert not find(objs, "PodDisruptionBudget") and not find(objs, "NetworkPolicy")


def test_default_is_cluster_wide_with_exact_rbac(rendered):
    objs = rendered["default"]
    role = one(objs, "ClusterRole", FULLNAME)
    assert rule_set(role) == OPERATOR_RULES | CRD_READ
    binding = one(objs, "ClusterRoleBinding", FULLNAME)
    assert binding["roleRef"] == {
        "apiGroup": "rbac.authorization.k8s.io",
        "kind": "ClusterRole",
        "name": FULLNAME,
    }
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": FULLNAME, "namespace": NAMESPACE}]
    assert not find(objs, "Role") and not find(objs, "RoleBinding")
    # The stage jobs' account: in the release namespace, no token, bound to nothing.
    job_sa = one(objs, "ServiceAccount", f"{FULLNAME}-job")
    assert job_sa["metadata"]["namespace"] == NAMESPACE and job_sa["automountServiceAccountToken"] is False
    bound = {
        s["name"] for b in find(objs, "ClusterRoleBinding") + find(objs, "RoleBinding") for s in b["subjects"]
    }
    assert bound == {FULLNAME}


def test_aggregated_editor_and_viewer_roles(rendered):
    objs = rendered["default"]
    editor, viewer = (
        one(objs, "ClusterRole", f"{FULLNAME}-editor"),
        one(objs, "ClusterRole", f"{FULLNAME}-viewer"),
    )
    assert editor["metadata"]["labels"]["rbac.authorization.k8s.io/aggregate-to-edit"] == "true"
    assert editor["metadata"]["labels"]["rbac.authorization.k8s.io/aggregate-to-admin"] == "true"
    assert viewer["metadata"]["labels"]["rbac.authorization.k8s.io/aggregate-to-view"] == "true"
    assert {v for _, r, v in rule_set(editor) if r == "fusionruns"} == {
        "get",
        "list",
        "watch",
        "create",
        "update",
        "patch",
        "delete",
        "deletecollection",
    }
    assert ("fusionrun.dev", "fusionruns/status", "update") not in rule_set(
        editor
    )  # status is the operator's
    assert rule_set(viewer) == {
        ("fusionrun.dev", r, v) for r in ("fusionruns", "fusionruns/status") for v in ("get", "list", "watch")
    }


def test_namespaced_mode(rendered):
    objs = rendered["namespaced"]
    for ns in ("team-a", "team-b"):
        role = one(objs, "Role", FULLNAME, ns)
        assert rule_set(role) == OPERATOR_RULES
        binding = one(objs, "RoleBinding", FULLNAME, ns)
        assert binding["roleRef"]["kind"] == "Role"
        assert binding["subjects"] == [{"kind": "ServiceAccount", "name": FULLNAME, "namespace": NAMESPACE}]
    assert not find(objs, "Role", ns=NAMESPACE)  # the release namespace is not watched here
    # Nothing cluster-wide but read-only discovery.
    assert not find(objs, "ClusterRole", FULLNAME)
    assert rule_set(one(objs, "ClusterRole", f"{FULLNAME}-cluster-reads")) == CRD_READ | NAMESPACE_READ
    assert {sa["metadata"]["namespace"] for sa in find(objs, "ServiceAccount", f"{FULLNAME}-job")} == {
        NAMESPACE,
        "team-a",
        "team-b",
    }
    assert one(objs, "ConfigMap", FULLNAME)["data"]["FUSIONRUN_NAMESPACES"] == "team-a,team-b"


def test_cluster_wide_mode_job_accounts(rendered):
    objs = rendered["cluster-wide"]
    assert {sa["metadata"]["namespace"] for sa in find(objs, "ServiceAccount", f"{FULLNAME}-job")} == {
        NAMESPACE,
        "team-c",
    }
    assert one(objs, "ConfigMap", FULLNAME)["data"]["FUSIONRUN_NAMESPACES"] == ""


def test_irsa_annotations_and_no_secret_access(rendered):
    objs = rendered["irsa"]
    op_sa, job_sa = one(objs, "ServiceAccount", FULLNAME), one(objs, "ServiceAccount", f"{FULLNAME}-job")
    assert op_sa["metadata"]["annotations"] == {
        "eks.amazonaws.com/role-arn": "arn:aws:iam::123456789012:role/op"
    }
    assert job_sa["metadata"]["annotations"] == {
        "eks.amazonaws.com/role-arn": "arn:aws:iam::123456789012:role/jobs"
    }
    assert (
        rule_set(one(objs, "ClusterRole", FULLNAME)) == (OPERATOR_RULES - {("", "secrets", "get")}) | CRD_READ
    )


def secret_rule(role: dict[str, Any]) -> dict[str, Any]:
    (rule,) = [r for r in role["rules"] if "secrets" in r["resources"]]
    return rule


def test_secret_access_limited_to_named_secrets(rendered, helm, tmp_path):
    """get on Secrets by name only, by default too (issue 15: no cluster-wide unrestricted secrets get);
    the chart's store.credentialsSecret is added to rbac.secretNames."""
    expected = {
        "apiGroups": [""],
        "resources": ["secrets"],
        "verbs": ["get"],
        "resourceNames": ["fusionrun-s3"],
    }
    assert secret_rule(one(rendered["s3-secret"], "ClusterRole", FULLNAME)) == expected
    assert secret_rule(one(rendered["default"], "ClusterRole", FULLNAME)) == expected
    assert secret_rule(one(rendered["namespaced"], "Role", FULLNAME, "team-a")) == expected
    values = {"store": {"credentialsSecret": "team-keys"}, "rbac": {"secretNames": ["fusionrun-s3", "more"]}}
    role = one(render(helm, values, tmp_path), "ClusterRole", FULLNAME)
    assert secret_rule(role)["resourceNames"] == ["fusionrun-s3", "more", "team-keys"]
    # Only an explicitly emptied list (and no store.credentialsSecret) grants get on every Secret.
    role = one(render(helm, {"rbac": {"secretNames": []}}, tmp_path), "ClusterRole", FULLNAME)
    assert "resourceNames" not in secret_rule(role)


def test_bring_your_own_identity_and_rbac(rendered):
    objs = rendered["bring-your-own"]
    assert not [
        o
        for o in objs
        if o["kind"] in ("ServiceAccount", "Role", "RoleBinding", "ClusterRole", "ClusterRoleBinding")
    ]
    assert one(objs, "Deployment")["spec"]["template"]["spec"]["serviceAccountName"] == "platform-operator"
    cfg = operator_config(objs)
    assert cfg.job_service_account is None  # stage pods run as their namespace's default account
    assert "serviceAccountName" not in _jobs_for(MINIMAL_SPEC, cfg)["prepare"]["spec"]["template"]["spec"]


def test_hardened_extras(rendered):
    objs = rendered["hardened-extras"]
    pod = one(objs, "Deployment")["spec"]["template"]["spec"]
    assert pod["containers"][0]["image"] == "ghcr.io/fusionrun/fusionrun-operator@sha256:" + "ab" * 32
    assert pod["containers"][0]["args"] == ["--verbose"]
    assert pod["imagePullSecrets"] == [{"name": "ghcr-pull"}]
    assert one(objs, "ServiceAccount", f"{FULLNAME}-job")["imagePullSecrets"] == [{"name": "ghcr-pull"}]
    pdb = one(objs, "PodDisruptionBudget")
    assert pdb["apiVersion"] == "policy/v1" and pdb["spec"]["minAvailable"] == 1
    assert (
        pdb["spec"]["selector"]["matchLabels"] == one(objs, "Deployment")["spec"]["selector"]["matchLabels"]
    )
    netpol = one(objs, "NetworkPolicy")
    assert netpol["spec"]["policyTypes"] == ["Ingress", "Egress"]
    assert netpol["spec"]["ingress"] == [
        {"ports": [{"port": "liveness", "protocol": "TCP"}, {"port": "metrics", "protocol": "TCP"}]}
    ]
    egress_ports = sorted(
        (p["port"], p["protocol"]) for rule in netpol["spec"]["egress"] for p in rule["ports"]
    )
    assert egress_ports == [(53, "TCP"), (53, "UDP"), (443, "TCP"), (6443, "TCP")]


def test_metrics_service_and_service_monitor(rendered):
    """/metrics: the container port, a Service selecting the operator pod, and (opt-in) a ServiceMonitor
    scraping that Service; metrics.enabled false renders none of them and turns the endpoint off."""
    default = rendered["default"]
    svc = one(default, "Service", f"{FULLNAME}-metrics", NAMESPACE)
    dep = one(default, "Deployment")
    assert svc["spec"]["selector"] == dep["spec"]["selector"]["matchLabels"]
    assert svc["spec"]["ports"] == [
        {"name": "metrics", "port": 8081, "targetPort": "metrics", "protocol": "TCP"}
    ]
    assert not find(default, "ServiceMonitor")
    objs = rendered["metrics"]
    svc = one(objs, "Service", f"{FULLNAME}-metrics")
    assert svc["metadata"]["annotations"] == {"prometheus.io/scrape": "true"}
    assert svc["spec"]["ports"][0]["port"] == 9095
    pod = one(objs, "Deployment")["spec"]["template"]["spec"]
    assert {"name": "metrics", "containerPort": 9095, "protocol": "TCP"} in pod["containers"][0]["ports"]
    sm = one(objs, "ServiceMonitor", FULLNAME, NAMESPACE)
    assert sm["apiVersion"] == "monitoring.coreos.com/v1"
    assert sm["metadata"]["labels"]["release"] == "kube-prometheus"
    assert sm["spec"]["selector"]["matchLabels"].items() <= svc["metadata"]["labels"].items()
    assert sm["spec"]["namespaceSelector"] == {"matchNames": [NAMESPACE]}
    assert sm["spec"]["endpoints"] == [{"port": "metrics", "path": "/metrics", "interval": "15s"}]
    cfg = operator_config(objs)
    assert (cfg.metrics_port, cfg.job_shape, cfg.store_memo) == (9095, "per-task", False)
    off = rendered["no-metrics"]
    assert not find(off, "Service") and not find(off, "ServiceMonitor")
    assert operator_config(off).metrics_port is None
    assert [
        p["name"] for p in one(off, "Deployment")["spec"]["template"]["spec"]["containers"][0]["ports"]
    ] == ["liveness"]
    assert one(off, "NetworkPolicy")["spec"]["ingress"] == [
        {"ports": [{"port": "liveness", "protocol": "TCP"}]}
    ]


def test_crds_installed_by_the_chart_are_the_generated_ones(rendered):
    assert (CHART / "crds" / "fusionrun.yaml").read_bytes() == (ROOT / "crds" / "fusionrun.yaml").read_bytes()
    crd = one(rendered["default"], "CustomResourceDefinition")
    assert crd == yaml.safe_load((ROOT / "crds" / "fusionrun.yaml").read_text())


# --------------------------------------------------------------------------------------------------
# the chart's settings, read by the operator's own code


def operator_config(objs: list[dict[str, Any]]) -> Any:
    from fusionrun_operator.config import from_env

    return from_env(one(objs, "ConfigMap", FULLNAME)["data"])


def test_configmap_sets_exactly_what_the_operator_reads(rendered):
    source = (ROOT / "operator" / "fusionrun_operator" / "config.py").read_text()
    read = set(re.findall(r'"(FUSIONRUN_[A-Z_]+)"', source))
    for name, objs in rendered.items():
        assert set(one(objs, "ConfigMap", FULLNAME)["data"]) == read, name


def test_default_settings_reach_the_operator(rendered):
    cfg = operator_config(rendered["default"])
    assert cfg.clusterwide and cfg.namespaces == ()
    assert cfg.job_image == "ghcr.io/fusionrun/fusionrun-job:0.1.0"
    assert cfg.job_service_account == f"{FULLNAME}-job"
    assert cfg.run_as_user == 10001  # the job image's USER
    assert cfg.liveness == "http://0.0.0.0:8080/healthz"
    assert (cfg.resync_seconds, cfg.server_timeout, cfg.client_timeout) == (30.0, 300, 330)
    assert cfg.read_store and cfg.default_store_uri is None
    assert (cfg.store_memo, cfg.job_shape, cfg.metrics_port) == (True, "auto", 8081)
    assert set(cfg.stage_defaults) == {"prepare", "extract", "align", "fuse", "train", "evaluate"}
    assert all(d == StageResources() for d in cfg.stage_defaults.values())  # empty: runs keep their own
    assert operator_config(rendered["namespaced"]).namespaces == ("team-a", "team-b")


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        ("[]", "FUSIONRUN_STAGE_DEFAULTS: expected a JSON object {stage: resources}, got list"),
        ('{"trian": {}}', "FUSIONRUN_STAGE_DEFAULTS.trian: unknown field; did you mean train?"),
        (
            '{"train": {"gpus": -1}}',
            "FUSIONRUN_STAGE_DEFAULTS.train.gpus: Input should be greater than or equal to 0",
        ),
        ("{train: 8}", "FUSIONRUN_STAGE_DEFAULTS: not valid JSON"),
    ],
)
def test_operator_names_a_bad_stage_defaults_setting(raw, message):
    """Settings that bypass the chart's schema (set by hand) still fail at start, naming the variable."""
    from fusionrun_operator.config import ConfigError, from_env

    with pytest.raises(ConfigError) as err:
        from_env({"FUSIONRUN_STAGE_DEFAULTS": raw})
    assert message in str(err.value)


def _jobs_for(spec: dict[str, Any], cfg: Any) -> dict[str, dict[str, Any]]:
    from fusionrun_operator.k8s_objects import RunRef, effective_spec, task_manifests

    run = RunRef(name="r1", namespace="team-a", uid="00000000-0000-4000-8000-000000000001")
    eff = effective_spec(parse_spec(spec), cfg)
    out = {}
    for task in build_dag(eff):
        for obj in task_manifests(run, eff, task, 1, cfg):
            if obj["kind"] == "Job":
                out[task.id] = obj
    return out


MINIMAL_SPEC = {
    "target": {"name": "t", "uri": "s3://models/t"},
    "sources": [{"name": "s", "uri": "s3://models/s"}],
    "corpus": {"uri": "s3://data/corpus.jsonl"},
    "training": {"procsPerNode": 8},
}


def test_gpu_stage_defaults_reach_the_jobs(rendered):
    """stageDefaults -> ConfigMap -> from_env -> the operator's Jobs: GPUs, node pool and taint tolerations
    where the run says nothing; what the run does say wins."""
    cfg = operator_config(rendered["gpu-nodes"])
    spec = {**MINIMAL_SPEC, "store": {"uri": "s3://artifacts/runs"}, "resources": {"extract": {"gpus": 2}}}
    jobs = _jobs_for(spec, cfg)
    pod = {tid: j["spec"]["template"]["spec"] for tid, j in jobs.items()}
    toleration = [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}]
    for tid in ("train", "evaluate", "extract-t-00000"):
        assert pod[tid]["nodeSelector"] == {"nvidia.com/gpu.product": "NVIDIA-H100-80GB-HBM3"}, tid
        assert pod[tid]["tolerations"] == toleration, tid
    limits = {tid: p["containers"][0]["resources"].get("limits", {}) for tid, p in pod.items()}
    assert limits["train"]["nvidia.com/gpu"] == "8"
    assert limits["evaluate"]["nvidia.com/gpu"] == "1"
    assert limits["extract-t-00000"]["nvidia.com/gpu"] == "2"  # the run's own value
    assert pod["prepare"]["containers"][0]["resources"] == {
        "requests": {"cpu": "4", "memory": "16Gi"},
        "limits": {"memory": "16Gi"},
    }
    assert "nodeSelector" not in pod["fuse-00000"] and "nvidia.com/gpu" not in limits["fuse-00000"]
    assert all(p["serviceAccountName"] == f"{FULLNAME}-job" for p in pod.values())
    assert all(p["securityContext"]["runAsUser"] == 10001 for p in pod.values())


def test_default_store_and_secret_reach_the_jobs(rendered):
    cfg = operator_config(rendered["s3-secret"])
    jobs = _jobs_for(MINIMAL_SPEC, cfg)  # the run leaves spec.store at its local default
    env = {e["name"]: e for e in jobs["prepare"]["spec"]["template"]["spec"]["containers"][0]["env"]}
    store = json.loads(env["FUSIONRUN_SPEC"]["value"])["store"]
    assert store == {
        "uri": "s3://fusion-artifacts/runs",
        "endpoint": "https://minio.storage.svc:9000",
        "region": "eu-west-1",
        "insecure": False,
        "credentialsSecret": {
            "name": "fusionrun-s3",
            "accessKeyKey": "AWS_ACCESS_KEY_ID",
            "secretKeyKey": "AWS_SECRET_ACCESS_KEY",
        },
    }
    assert env["AWS_ACCESS_KEY_ID"]["valueFrom"] == {
        "secretKeyRef": {"name": "fusionrun-s3", "key": "AWS_ACCESS_KEY_ID"}
    }
    # With IRSA: no keys anywhere; the job ServiceAccount carries the identity.
    irsa = _jobs_for(MINIMAL_SPEC, operator_config(rendered["irsa"]))["prepare"]["spec"]["template"]["spec"]
    assert not any(e["name"].startswith("AWS_") for e in irsa["containers"][0]["env"])
    assert irsa["serviceAccountName"] == f"{FULLNAME}-job"


# --------------------------------------------------------------------------------------------------
# RBAC derived from the operator's code

# Kubernetes client methods the operator calls -> the permission each needs (None: a non-resource URL that
# every authenticated client may GET through the built-in system:public-info-viewer role, like /version).
CLIENT_METHOD_RBAC = {
    "get_code": None,
    "read_namespaced_secret": ("", "secrets", "get"),
    "get_namespaced_custom_object": ("fusionrun.dev", "fusionruns", "get"),
    "patch_namespaced_custom_object_status": ("fusionrun.dev", "fusionruns/status", "patch"),
    "list_namespaced_job": ("batch", "jobs", "list"),
    "create_namespaced_job": ("batch", "jobs", "create"),
    "delete_namespaced_job": ("batch", "jobs", "delete"),
    "list_namespaced_pod": ("", "pods", "list"),
    "create_namespaced_service": ("", "services", "create"),
    "create_namespaced_event": ("", "events", "create"),
}


def operator_api_use() -> set[tuple[str, str, str]]:
    """(group, resource, verb) the operator needs, read from fusionrun_operator's source: every
    `_api(...).method` it calls, every resource a kopf handler watches (list, watch; handlers other than
    on.event also patch: kopf's annotations and finalizers), and kopf.event (create events)."""
    needed: set[tuple[str, str, str]] = set()
    constants = {"API_GROUP": "fusionrun.dev", "PLURAL": "fusionruns"}
    for path in sorted((ROOT / "operator" / "fusionrun_operator").glob("*.py")):
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            if (
                isinstance(node, ast.Attribute)
                and isinstance(node.value, ast.Call)
                and getattr(node.value.func, "id", None) == "_api"
            ):
                assert node.attr in CLIENT_METHOD_RBAC, (
                    f"{path.name} calls {node.attr}: add its permission to CLIENT_METHOD_RBAC and the chart"
                )
                if CLIENT_METHOD_RBAC[node.attr] is not None:
                    needed.add(CLIENT_METHOD_RBAC[node.attr])
            if isinstance(node, ast.Call) and ast.unparse(node.func) == "kopf.event":
                needed.add(("", "events", "create"))
            if isinstance(node, ast.Call) and re.fullmatch(
                r"kopf\.on\.(create|update|resume|delete|event)", ast.unparse(node.func)
            ):
                kind = ast.unparse(node.func).rsplit(".", 1)[1]
                args = [constants.get(a.id, a.id) if isinstance(a, ast.Name) else a.value for a in node.args]
                group, resource = args[0], args[2]
                needed |= {(group, resource, "list"), (group, resource, "watch")}
                if kind != "event":
                    needed.add((group, resource, "patch"))
    return needed


def test_rbac_matches_operator_code(rendered):
    assert operator_api_use() == OPERATOR_RULES
    # ... and the chart grants exactly that (plus kopf's cluster-scoped discovery), in both modes.
    assert rule_set(one(rendered["default"], "ClusterRole", FULLNAME)) - CRD_READ == operator_api_use()
    assert rule_set(one(rendered["namespaced"], "Role", FULLNAME, "team-a")) == operator_api_use()


def readme_permissions(text: str, section: str) -> set[tuple[str, str, str]]:
    """(group, resource, verb) of every row of the RBAC table under `section` in a README: the operator's
    (`| group | resource | verbs | why |`) or the chart's (`| resource.group | verbs | why |`)."""
    body = text.split(section, 1)[1].split("\n## ", 1)[0]
    out = set()
    for row in re.findall(r"^\| `([^`]*)`(?: \(cluster\))? \|(.*)$", body, flags=re.M):
        first, rest = row
        cells = [c.strip() for c in rest.split("|")]
        if first in ('""', "fusionrun.dev", "batch", "apiextensions.k8s.io"):  # the operator's table
            group, resource, verbs = first.strip('"'), cells[0].strip("`"), cells[1]
        else:  # the chart's: resource[.group]
            resource, _, group = first.partition(".")
            group = {"fusionrun": "fusionrun.dev"}.get(group.split(".")[0], group) if group else ""
            if resource.startswith("fusionruns"):
                group = "fusionrun.dev"
            if resource == "customresourcedefinitions":
                group = "apiextensions.k8s.io"
            verbs = cells[0]
        out |= {(group, resource, v) for v in re.findall(r"\b(get|list|watch|create|delete|patch)\b", verbs)}
    return out


def test_readmes_list_every_permission_and_when(rendered):
    """Both READMEs name exactly what the chart grants (issue 15: they disagreed on Namespaces), and
    kopf reads Namespaces only when it watches a list of them (kopf's namespace_observer)."""
    granted = OPERATOR_RULES | CRD_READ | NAMESPACE_READ
    operator_readme = (ROOT / "operator" / "fusionrun_operator" / "README.md").read_text()
    chart_readme = (CHART / "README.md").read_text()
    assert readme_permissions(operator_readme, "## Every Kubernetes API call") == granted
    assert readme_permissions(chart_readme, "## RBAC: exactly what the operator calls") == granted
    namespaces_rows = [
        ln
        for t in (operator_readme, chart_readme)
        for ln in t.splitlines()
        if re.match(r'^\| `(""` \| `)?namespaces`', ln)
    ]
    assert len(namespaces_rows) == 2 and all("namespaced mode only" in ln for ln in namespaces_rows)
    assert not rule_set(one(rendered["default"], "ClusterRole", FULLNAME)) & NAMESPACE_READ  # cluster-wide
    reads = one(rendered["namespaced"], "ClusterRole", f"{FULLNAME}-cluster-reads")
    assert rule_set(reads) == NAMESPACE_READ | CRD_READ
    import kopf._core.reactor.observation as observation

    source = inspect.getsource(observation.namespace_observer)
    assert "if not settings.scanning.disabled and not clusterwide:" in source  # the kopf this is about


def test_kopf_runs_standalone():
    """No peering RBAC is granted, so the operator must not use kopf peering."""
    main = (ROOT / "operator" / "fusionrun_operator" / "main.py").read_text()
    assert "standalone=True" in main


# --------------------------------------------------------------------------------------------------
# documentation, metadata, and agreement with the Dockerfile


def documented_values(text: str) -> list[tuple[str, str, Any]]:
    """(dotted key, description, default) for every key preceded by a `# --` comment in values.yaml."""
    data = yaml.safe_load(text)
    out = []
    stack: list[tuple[int, str]] = []
    doc: list[str] | None = None
    for line in text.splitlines():
        stripped = line.strip()
        if stripped.startswith("# --"):
            doc = [stripped[4:].strip()]
            continue
        if stripped.startswith("#"):
            if doc is not None:
                doc.append(stripped[1:].strip())
            continue
        m = re.match(r"^( *)([A-Za-z][\w-]*):", line)
        if not m:
            continue
        indent, key = len(m.group(1)), m.group(2)
        while stack and stack[-1][0] >= indent:
            stack.pop()
        path = [k for _, k in stack] + [key]
        stack.append((indent, key))
        if doc is not None:
            value: Any = data
            for k in path:
                value = value[k]
            out.append((".".join(path), " ".join(doc), value))
        doc = None
    return out


def values_table(text: str) -> str:
    rows = ["| Key | Default | Description |", "|---|---|---|"]
    for key, desc, value in documented_values(text):
        rows.append(f"| `{key}` | `{json.dumps(value)}` | {desc.replace('|', '/')} |")
    return "\n".join(rows)


def leaves(node: Any, prefix: str = "") -> list[str]:
    if isinstance(node, dict) and node:
        return [leaf for k, v in node.items() for leaf in leaves(v, f"{prefix}{k}.")]
    return [prefix.rstrip(".")]


def test_every_value_is_documented():
    text = (CHART / "values.yaml").read_text()
    documented = {k for k, _, _ in documented_values(text)}
    undocumented = [
        leaf
        for leaf in leaves(yaml.safe_load(text))
        if not any(leaf == d or leaf.startswith(d + ".") for d in documented)
    ]
    assert undocumented == []


def test_readme_values_table_is_in_sync():
    readme = (CHART / "README.md").read_text()
    table = re.search(r"<!-- values:start -->\n(.*)\n<!-- values:end -->", readme, re.S)
    assert table, "README.md lacks the <!-- values:start --> ... <!-- values:end --> block"
    assert table.group(1) == values_table((CHART / "values.yaml").read_text()), (
        "README values table is stale: regenerate it with tests.test_chart.values_table"
    )


def test_schema_covers_every_value():
    schema = json.loads((CHART / "values.schema.json").read_text())
    values = yaml.safe_load((CHART / "values.yaml").read_text())

    def walk(s: dict[str, Any], v: dict[str, Any], path: str) -> None:
        if s.get("additionalProperties") is False:
            assert set(v) <= set(s["properties"]), (
                f"{path}: values not in the schema: {set(v) - set(s['properties'])}"
            )
            assert set(s["properties"]) <= set(v) or path.startswith("stageDefaults"), path
        for k, sub in s.get("properties", {}).items():
            if isinstance(v.get(k), dict) and sub.get("type") == "object" and "properties" in sub:
                walk(sub, v[k], f"{path}{k}.")

    walk(schema, values, "")


def test_stage_defaults_schema_is_the_spec_shape():
    """stageDefaults.<stage> takes exactly the fields of the spec's StageResources (camelCase)."""
    schema = json.loads((CHART / "values.schema.json").read_text())
    stages = schema["properties"]["stageDefaults"]["properties"]
    spec_fields = set(StageResources.model_json_schema(by_alias=True)["properties"])
    assert set(stages) == {"prepare", "extract", "align", "fuse", "train", "evaluate"}
    assert all(set(s["properties"]) == spec_fields for s in stages.values())


def test_chart_metadata_for_artifact_hub():
    chart = yaml.safe_load((CHART / "Chart.yaml").read_text())
    assert chart["apiVersion"] == "v2" and chart["type"] == "application"
    ann = chart["annotations"]
    assert ann["artifacthub.io/operator"] == "true" and ann["artifacthub.io/license"] == "Apache-2.0"
    images = yaml.safe_load(ann["artifacthub.io/images"])
    values = yaml.safe_load((CHART / "values.yaml").read_text())
    assert {i["image"] for i in images} == {
        f"{values['image']['repository']}:{chart['appVersion']}",
        f"{values['jobImage']['repository']}:{chart['appVersion']}",
    }
    (crd,) = yaml.safe_load(ann["artifacthub.io/crds"])
    assert (crd["kind"], crd["version"], crd["name"]) == ("FusionRun", "v1alpha1", "fusionruns.fusionrun.dev")
    for example in yaml.safe_load(ann["artifacthub.io/crdsExamples"]):
        parse_fusionrun(example)  # the example shown on Artifact Hub is a valid FusionRun
    assert {link["name"] for link in yaml.safe_load(ann["artifacthub.io/links"])} >= {"Design"}


def test_chart_agrees_with_the_dockerfile():
    """The pods' numeric users and the liveness port are those of the images."""
    from tests.test_dockerfile import DOCKERFILE, parse_dockerfile

    _, stages = parse_dockerfile(DOCKERFILE.read_text())
    users = {s.name: s.all("USER")[-1].args for s in stages if s.all("USER")}
    values = yaml.safe_load((CHART / "values.yaml").read_text())
    assert (
        users["operator"]
        == f"{values['podSecurityContext']['runAsUser']}:{values['podSecurityContext']['runAsGroup']}"
    )
    assert users["job"].split(":")[0] == str(values["jobPods"]["runAsUser"])
    operator_stage = next(s for s in stages if s.name == "operator")
    assert operator_stage.all("EXPOSE")[-1].args == str(values["operator"]["livenessPort"])


# --------------------------------------------------------------------------------------------------
# a real install on the local API server


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def service_account_kubeconfig(cp: ControlPlane, namespace: str, sa: str, path: Path) -> Path:
    """A kubeconfig that authenticates as the ServiceAccount, with a TokenRequest token (as a pod gets)."""
    token = (
        client.CoreV1Api(cp.api())
        .create_namespaced_service_account_token(
            sa,
            namespace,
            {"spec": {"audiences": ["https://kubernetes.default.svc"], "expirationSeconds": 3600}},
        )
        .status.token
    )
    server = yaml.safe_load(cp.kubeconfig.read_text())["clusters"][0]["cluster"]["server"]
    path.write_text(
        yaml.safe_dump(
            {
                "apiVersion": "v1",
                "kind": "Config",
                "clusters": [{"name": "c", "cluster": {"server": server, "insecure-skip-tls-verify": True}}],
                "users": [{"name": sa, "user": {"token": token}}],
                "contexts": [{"name": "c", "context": {"cluster": "c", "user": sa, "namespace": namespace}}],
                "current-context": "c",
            }
        )
    )
    return path


def can_i(
    cp: ControlPlane, who: str, verb: str, resource: str, namespace: str | None, name: str | None = None
) -> bool:
    """`kubectl auth can-i` (a SubjectAccessReview: the API server's own RBAC authorizer) for a user or
    ServiceAccount; `resource/sub` asks about a subresource, `name` about one object."""
    resource, _, sub = resource.partition("/")
    args = ["auth", "can-i", verb, f"{resource}/{name}" if name else resource, f"--as={who}"]
    args += [f"--subresource={sub}"] if sub else []
    args += ["-n", namespace] if namespace else ["--all-namespaces"]
    return cp.kubectl(*args, check=False).stdout.strip() == "yes"


def leftovers(cp: ControlPlane, namespaces: list[str]) -> list[str]:
    sel = f"app.kubernetes.io/instance={RELEASE_K8S}"
    kinds = "deployments,replicasets,pods,configmaps,serviceaccounts,roles,rolebindings,poddisruptionbudgets"
    out = [
        line
        for ns in namespaces
        for line in cp.kubectl("get", kinds, "-l", sel, "-o", "name", namespace=ns).stdout.split()
    ]
    out += cp.kubectl("get", "clusterroles,clusterrolebindings", "-l", sel, "-o", "name").stdout.split()
    return out


RELEASE_K8S = "frtest"
# What the operator or kopf logs when RBAC denies a call.
FORBIDDEN = re.compile(r"\b403\b|Forbidden|forbidden|Not enough permissions")


@pytest.mark.k8s
def test_helm_install_operator_reconciles_under_chart_rbac(k8s, helm, tmp_path):
    """helm install (namespaced mode) -> the operator, authenticated as the chart's ServiceAccount with the
    chart's settings, reconciles examples/k8s-tiny.yaml (Jobs created, status written, no 403) ->
    helm uninstall leaves nothing but the CRD."""
    release_ns, runs_ns, other_ns = (k8s.create_namespace(p) for p in ("fr-op", "fr-runs", "fr-other"))
    sa_full = f"{RELEASE_K8S}-fusionrun"
    operator_proc = None
    log_path = tmp_path / "operator.log"
    try:
        values = tmp_path / "values.yaml"
        values.write_text(
            yaml.safe_dump(
                {
                    "watch": {"clusterWide": False, "namespaces": [runs_ns]},
                    # examples/k8s-tiny.yaml uses the default store, as README's helm install sets it.
                    "store": {"uri": "s3://fusionrun/runs", "credentialsSecret": "fusionrun-s3"},
                }
            )
        )
        out = helm.run(
            "install", RELEASE_K8S, str(CHART), "-n", release_ns, "-f", str(values), kubeconfig=k8s.kubeconfig
        ).stdout
        assert f"It reconciles FusionRuns in: {runs_ns}." in out  # NOTES.txt
        assert f"kubectl --namespace {runs_ns} apply -f" in out
        k8s.kubectl("wait", "--for=condition=Established", "crd/fusionruns.fusionrun.dev", "--timeout=30s")

        # The chart's RBAC, as the API server's authorizer sees it.
        sa = f"system:serviceaccount:{release_ns}:{sa_full}"
        assert can_i(k8s, sa, "create", "jobs.batch", runs_ns)
        assert can_i(k8s, sa, "patch", "fusionruns.fusionrun.dev/status", runs_ns)
        assert can_i(k8s, sa, "list", "namespaces", None)  # kopf's discovery (clusterReads)
        assert not can_i(k8s, sa, "create", "jobs.batch", other_ns)  # only the watched namespace
        assert not can_i(k8s, sa, "delete", "fusionruns.fusionrun.dev", runs_ns)
        assert not can_i(k8s, sa, "list", "secrets", runs_ns)  # get by name only
        assert not can_i(k8s, f"system:serviceaccount:{runs_ns}:{sa_full}-job", "get", "pods", runs_ns)

        # The operator, as the Deployment would run it: the chart's ConfigMap as env, the SA's token.
        cm = k8s.kubectl_json("get", "configmap", sa_full, namespace=release_ns)["data"]
        port = free_port()
        env = {
            **{k: v for k, v in k8s.env.items() if not k.startswith("FUSIONRUN_")},
            **cm,
            "FUSIONRUN_LIVENESS": f"http://127.0.0.1:{port}/healthz",  # the chart's path, a free port
            "FUSIONRUN_RESYNC_SECONDS": "2",
            "KUBECONFIG": str(
                service_account_kubeconfig(k8s, release_ns, sa_full, tmp_path / "sa.kubeconfig")
            ),
            "PYTHONUNBUFFERED": "1",
        }
        with open(log_path, "w") as log:
            operator_proc = subprocess.Popen(
                [sys.executable, "-m", "fusionrun_operator.main"],
                env=env,
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        wait_until(lambda: _healthz(port), 60, "the operator's /healthz endpoint")

        def no_forbidden() -> None:  # fail at once, with the log, rather than time out waiting
            text = log_path.read_text()
            assert not FORBIDDEN.search(text), text[-4000:]

        # An example run, applied by a user.
        k8s.kubectl("apply", "-f", str(ROOT / "examples" / "s3-secret.yaml"), namespace=runs_ns)
        k8s.kubectl("apply", "-f", str(ROOT / "examples" / "k8s-tiny.yaml"), namespace=runs_ns)
        jobs = wait_until(
            lambda: (
                no_forbidden()
                or client.BatchV1Api(k8s.api())
                .list_namespaced_job(runs_ns, label_selector="fusionrun.dev/run=tiny")
                .items
            ),
            60,
            "the operator to create the run's first Job",
        )
        assert [j.metadata.labels["fusionrun.dev/task"] for j in jobs] == ["prepare"]
        pod = jobs[0].spec.template.spec
        assert pod.service_account_name == f"{sa_full}-job"  # the chart's job ServiceAccount
        assert pod.security_context.run_as_user == 10001
        assert pod.containers[0].image == "ghcr.io/fusionrun/fusionrun-job:0.1.0"
        status = wait_until(
            lambda: (k8s.kubectl_json("get", "fusionrun", "tiny", namespace=runs_ns).get("status") or {}).get(
                "phase"
            ),
            60,
            "status written by the operator",
        )
        assert status in ("Pending", "Running")
        run = k8s.kubectl_json("get", "fusionrun", "tiny", namespace=runs_ns)
        assert run["status"]["observedGeneration"] == run["metadata"]["generation"]
        k8s.kubectl("delete", "fusionrun", "tiny", "--wait=true", "--timeout=30s", namespace=runs_ns)
    finally:
        if operator_proc is not None:
            operator_proc.send_signal(signal.SIGINT)
            try:
                operator_proc.wait(20)
            except subprocess.TimeoutExpired:
                operator_proc.kill()
                operator_proc.wait(5)
        log_text = log_path.read_text() if log_path.exists() else ""
        helm.run("uninstall", RELEASE_K8S, "-n", release_ns, "--wait", kubeconfig=k8s.kubeconfig, check=False)
    assert not FORBIDDEN.search(log_text), log_text[-4000:]
    assert re.search(r"Handler '\w+' succeeded", log_text), log_text[-2000:]
    # Only the CRD stays.
    assert wait_until(
        lambda: not leftovers(k8s, [release_ns, runs_ns]), 30, "helm uninstall to remove everything"
    )
    assert k8s.kubectl("get", "crd", "fusionruns.fusionrun.dev", "-o", "name").stdout.strip()
    for ns in (release_ns, runs_ns, other_ns):
        k8s.delete_namespace(ns)


def _healthz(port: int) -> bool:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=2) as resp:
            return resp.status == 200
    except OSError:
        return False


@pytest.mark.k8s
def test_helm_install_cluster_wide_rbac(k8s, helm, tmp_path):
    """Cluster-wide mode on the real authorizer: the operator may work in any namespace, but still only
    with its own verbs; uninstall removes the cluster-scoped objects."""
    release_ns, some_ns = k8s.create_namespace("fr-cw"), k8s.create_namespace("fr-any")
    release = "frcw"
    try:
        out = helm.run(
            "install",
            release,
            str(CHART),
            "-n",
            release_ns,
            "--set",
            "podDisruptionBudget.enabled=true",
            "--set",
            "networkPolicy.enabled=true",
            kubeconfig=k8s.kubeconfig,
        ).stdout
        assert "It reconciles FusionRuns in every namespace." in out
        # A 1.20 server has no policy/v1: the chart picks policy/v1beta1 there, and the server takes both.
        pdb = k8s.kubectl_json(
            "get", "poddisruptionbudgets.v1beta1.policy", f"{release}-fusionrun", namespace=release_ns
        )
        assert pdb["spec"]["minAvailable"] == 1
        assert k8s.kubectl("get", "networkpolicy", "-o", "name", namespace=release_ns).stdout.strip()
        sa = f"system:serviceaccount:{release_ns}:{release}-fusionrun"
        for verb, resource in [
            ("watch", "fusionruns.fusionrun.dev"),
            ("patch", "fusionruns.fusionrun.dev/status"),
            ("create", "jobs.batch"),
            ("delete", "jobs.batch"),
            ("list", "pods"),
            ("create", "events"),
            ("create", "services"),
        ]:
            assert can_i(k8s, sa, verb, resource, some_ns), (verb, resource)
        # Secrets by name only: the chart's default rbac.secretNames, no other one, never all of them.
        assert can_i(k8s, sa, "get", "secrets", some_ns, name="fusionrun-s3")
        assert not can_i(k8s, sa, "get", "secrets", some_ns, name="db-password")
        assert not can_i(k8s, sa, "get", "secrets", some_ns)
        assert can_i(k8s, sa, "watch", "customresourcedefinitions.apiextensions.k8s.io", None)
        for verb, resource in [
            ("create", "pods"),
            ("delete", "services"),
            ("list", "secrets"),
            ("update", "jobs.batch"),
        ]:
            assert not can_i(k8s, sa, verb, resource, some_ns), (verb, resource)
        # A namespace admin (the built-in edit role) can manage FusionRuns through the aggregated role.
        k8s.kubectl(
            "create", "rolebinding", "editor", "--clusterrole=edit", "--user=alice", namespace=some_ns
        )
        assert can_i(k8s, "alice", "create", "fusionruns.fusionrun.dev", some_ns)
        assert not can_i(k8s, "alice", "patch", "fusionruns.fusionrun.dev/status", some_ns)
    finally:
        helm.run("uninstall", release, "-n", release_ns, "--wait", kubeconfig=k8s.kubeconfig, check=False)
    sel = f"app.kubernetes.io/instance={release}"
    assert (
        k8s.kubectl("get", "clusterroles,clusterrolebindings", "-l", sel, "-o", "name").stdout.strip() == ""
    )
    kinds = "deployments,configmaps,serviceaccounts,poddisruptionbudgets,networkpolicies"
    assert k8s.kubectl("get", kinds, "-l", sel, "-o", "name", namespace=release_ns).stdout.strip() == ""
    for ns in (release_ns, some_ns):
        k8s.delete_namespace(ns)


@pytest.mark.k8s
def test_examples_accepted_by_a_real_api_server(k8s, k8s_namespace):
    """`kubectl apply --dry-run=server` of every file in examples/: the API server's own validation (the CRD
    schema, the Secret) accepts them, and rejects a bad spec with the schema's message."""
    from tests.test_examples import EXAMPLES, docs

    k8s.apply_crds()
    for path in EXAMPLES:
        out = k8s.kubectl("apply", "--dry-run=server", "-f", str(path), "-o", "name", namespace=k8s_namespace)
        kinds = sorted(line.split("/")[0] for line in out.stdout.split())
        assert kinds == sorted(
            "fusionrun.fusionrun.dev" if d["kind"] == "FusionRun" else d["kind"].lower() for d in docs(path)
        )
    # And rejects a bad one with the schema's message.
    bad = docs(ROOT / "examples" / "k8s-tiny.yaml")[0]
    bad["spec"]["extraction"]["topK"] = 0
    proc = k8s.kubectl(
        "apply",
        "--dry-run=server",
        "-f",
        "-",
        input=yaml.safe_dump(bad),
        namespace=k8s_namespace,
        check=False,
    )
    assert proc.returncode != 0 and "spec.extraction.topK" in proc.stderr, proc.stderr
