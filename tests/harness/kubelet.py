"""A stand-in kubelet: runs the Pods of one namespace as local processes and reports back like a kubelet.

The test control plane has no nodes, no kubelet and no scheduler, so the Pods that the job controller
creates stay Pending forever. This stand-in watches them (polling the real API server), runs the first
container's command as a local process, and writes the outcome through the Pod's status subresource:
phase Running, then Succeeded or Failed with `containerStatuses[].state.terminated.exitCode`. The real
job controller in kube-controller-manager then counts the Pod and completes or fails the Job.

What maps to what:
- the container's `python`/`python3` (any path) runs as this test's interpreter (the venv's); other
  commands found in the interpreter's bin/ folder (`fusionrun`, `deepspeed`) run from there;
- cwd is the repository root (the image's workdir holds the same code);
- emptyDir volumes are fresh folders per pod: env values and arguments under a mountPath are rewritten to
  them; a TMPDIR that names no folder becomes a folder of the pod's own (Python would fall back to the
  container's private /tmp);
- env comes from the Pod spec: plain values, `valueFrom.secretKeyRef` / `configMapKeyRef` read from the
  real objects through the API, `fieldRef` (metadata.name/namespace/uid/labels/annotations, status.podIP,
  spec.nodeName), `envFrom`, and `$(VAR)` expansion as Kubernetes does it;
- cluster DNS: a value that is (or is a URL of) `<name>.<svc>.<ns>.svc[.cluster.local]` becomes 127.0.0.1,
  which makes rank 0's headless-Service name (MASTER_ADDR) reachable for multi-node training;
- the container's terminationMessagePath (default /dev/termination-log) is a file of the pod's own (an env
  value naming that path is rewritten to it); what the process wrote there becomes the terminated state's
  `message`, else, for a failure under terminationMessagePolicy FallbackToLogsOnError, the log's tail
  (the last 80 lines, at most 2048 bytes), as a kubelet does;
- a process killed by a signal exits with 128 + the signal's number (137 for SIGKILL), as in a container.

The Pods are never bound to a node: unbound Pods are deleted at once by the API server, so deleting a Job
(or its garbage collection) really removes its Pods, and the stand-in then kills their processes.

Fault injection for tests: `fail(selector, exit_code, times)` fails the next matching Pods with that exit
code without running them (a crash before doing any work); `hold(selector)` keeps matching Pods Running
without starting them until released (to observe a run mid-flight, kill the operator, suspend, delete);
`kill(selector)` SIGKILLs the processes of the matching running Pods (an OOM kill, a node gone).
"""

from __future__ import annotations

import base64
import contextlib
import json
import logging
import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from kubernetes import client
from kubernetes.client.rest import ApiException

log = logging.getLogger("stand-in-kubelet")

REPO_ROOT = Path(__file__).resolve().parents[2]
NODE_NAME = "stand-in-kubelet"
POD_IP = "127.0.0.1"

Pod = dict[str, Any]
Selector = Callable[[Pod], bool] | Mapping[str, str]

# <pod>.<service>.<namespace>.svc[.cluster.local] (optionally in a URL, with a port): cluster DNS names.
_SVC_HOST = re.compile(
    r"^(?P<pre>[a-z][a-z0-9+.-]*://)?(?P<host>[a-z0-9]([-a-z0-9.]*[a-z0-9])?\.svc"
    r"(\.cluster\.local)?)(?P<post>(:\d+)?(/.*)?)$"
)
_VAR_REF = re.compile(r"\$\(([A-Za-z_][A-Za-z0-9_.-]*)\)|\$\$")
_PYTHONS = re.compile(r"^(.*/)?python(3(\.\d+)?)?$")
# Host environment a pod process inherits: enough to run, nothing that would hide a missing pod env var.
_HOST_ENV = ("PATH", "HOME", "LANG", "LC_ALL", "TZ")


def now_rfc3339() -> str:
    return datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def matches(selector: Selector, pod: Pod) -> bool:
    if callable(selector):
        return bool(selector(pod))
    labels = pod["metadata"].get("labels") or {}
    return all(labels.get(k) == v for k, v in selector.items())


def job_name_startswith(prefix: str) -> Callable[[Pod], bool]:
    """Selector for the Pods of Jobs whose name starts with `prefix` (the job controller's job-name label)."""
    return lambda pod: (pod["metadata"].get("labels") or {}).get("job-name", "").startswith(prefix)


def rewrite_cluster_dns(value: str) -> str:
    """`rank0.svc-name.ns.svc.cluster.local` (or a URL of it) -> 127.0.0.1: every 'node' is this machine."""
    m = _SVC_HOST.match(value)
    if not m:
        return value
    return f"{m.group('pre') or ''}{POD_IP}{m.group('post')}"


def rewrite_mount_paths(value: str, mounts: Mapping[str, str]) -> str:
    """A path inside a mounted volume (`/scratch/tmp` under mount /scratch) -> the same path in the local
    folder that stands in for that volume."""
    for mount, local in mounts.items():
        if value == mount or value.startswith(mount + "/"):
            return local + value[len(mount) :]
    return value


def expand_var_refs(value: str, env: Mapping[str, str]) -> str:
    """Kubernetes' $(VAR) expansion: defined names are replaced, unknown ones kept verbatim, $$ escapes $."""

    def sub(m: re.Match[str]) -> str:
        if m.group(0) == "$$":
            return "$"
        return env.get(m.group(1), m.group(0))

    return _VAR_REF.sub(sub, value)


def resolve_executable(cmd0: str, python: str) -> str:
    """The local program for the container's first word: its python is ours; console scripts from our venv."""
    if _PYTHONS.match(cmd0):
        return python
    local = Path(python).parent / Path(cmd0).name
    if local.exists():
        return str(local)
    return cmd0


class PodConfigError(Exception):
    """The pod cannot start (a missing Secret key, say): a kubelet keeps it Pending with this reason."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


@dataclass
class Fault:
    selector: Selector
    exit_code: int
    times: int | None  # None: every matching pod
    message: str
    hits: int = 0

    def take(self, pod: Pod) -> bool:
        if (self.times is not None and self.hits >= self.times) or not matches(self.selector, pod):
            return False
        self.hits += 1
        return True


@dataclass
class Hold:
    """Pods matching `selector` stay Running, without a process, until `release()`."""

    selector: Selector
    released: threading.Event = field(default_factory=threading.Event)
    held: list[str] = field(default_factory=list)  # pod names that reached the hold

    def release(self) -> None:
        self.released.set()


@dataclass
class PodRun:
    """What the stand-in did with one pod: the record tests assert on."""

    name: str
    labels: dict[str, str]
    command: list[str]
    env: dict[str, str] = field(default_factory=dict)
    exit_code: int | None = None
    injected: bool = False  # failed by a Fault, never ran
    killed: bool = False  # its pod was deleted while it ran
    started: float = field(default_factory=time.monotonic)
    finished: float | None = None
    log_path: Path | None = None


class StandInKubelet:
    """Runs the Pods of `namespace`; use as a context manager (a background thread, stopped on exit)."""

    def __init__(
        self,
        api: client.ApiClient,
        namespace: str,
        log_dir: Path,
        *,
        python: str = sys.executable,
        cwd: Path = REPO_ROOT,
        extra_env: Mapping[str, str] | None = None,
        max_running: int = 4,
        poll_seconds: float = 0.2,
        pod_timeout_seconds: float = 600.0,
    ) -> None:
        self.core = client.CoreV1Api(api)
        self.namespace = namespace
        self.log_dir = Path(log_dir)
        self.python = python
        self.cwd = cwd
        # Defaults a pod can override: one BLAS thread per process (2 shared cores), no hub access.
        self.extra_env = {
            "OMP_NUM_THREADS": "1",
            "MKL_NUM_THREADS": "1",
            "HF_HUB_OFFLINE": "1",
            "TOKENIZERS_PARALLELISM": "false",
            **(extra_env or {}),
        }
        self.max_running = max_running
        self.poll_seconds = poll_seconds
        self.pod_timeout_seconds = pod_timeout_seconds
        self.runs: dict[str, PodRun] = {}  # by pod uid
        self.errors: list[str] = []  # unexpected errors of the stand-in itself: a test should see none
        self._faults: list[Fault] = []
        self._holds: list[Hold] = []
        self._procs: dict[str, subprocess.Popen[bytes]] = {}
        self._claimed: set[str] = set()
        self._waiting_reason: dict[str, str] = {}
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self._loop: threading.Thread | None = None

    # ---------------------------------------------------------------------------------------------
    # test controls

    def fail(
        self, selector: Selector, exit_code: int = 1, times: int | None = 1, message: str = "injected failure"
    ) -> Fault:
        """Fail the next `times` matching pods (None: all of them) with `exit_code`, without running them."""
        fault = Fault(selector, exit_code, times, message)
        with self._lock:
            self._faults.append(fault)
        return fault

    def hold(self, selector: Selector) -> Hold:
        h = Hold(selector)
        with self._lock:
            self._holds.append(h)
        return h

    def kill(self, selector: Selector, sig: int = signal.SIGKILL) -> list[str]:
        """Send `sig` to the process groups of the running pods matching `selector`; their names."""
        with self._lock:
            targets = [
                (self.runs[uid].name, proc)
                for uid, proc in self._procs.items()
                if matches(
                    selector, {"metadata": {"labels": self.runs[uid].labels, "name": self.runs[uid].name}}
                )
            ]
        for _, proc in targets:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, sig)
        return [name for name, _ in targets]

    def runs_matching(self, selector: Selector) -> list[PodRun]:
        with self._lock:
            runs = list(self.runs.values())
        return [r for r in runs if matches(selector, {"metadata": {"labels": r.labels, "name": r.name}})]

    def log_of(self, pod_name: str) -> str:
        path = self.log_dir / f"{pod_name}.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def all_logs(self, tail: int = 4000) -> str:
        """Every pod's log tail: what a failing test prints to explain itself."""
        parts = []
        for p in sorted(self.log_dir.glob("*.log"), key=lambda p: p.stat().st_mtime):
            parts.append(f"----- {p.stem}\n{p.read_text(errors='replace')[-tail:]}")
        return "\n".join(parts)

    # ---------------------------------------------------------------------------------------------
    # lifecycle

    def __enter__(self) -> StandInKubelet:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def start(self) -> None:
        self.log_dir.mkdir(parents=True, exist_ok=True)
        self._loop = threading.Thread(target=self._run_loop, name=f"kubelet-{self.namespace}", daemon=True)
        self._loop.start()

    def stop(self, timeout: float = 20.0) -> None:
        self._stop.set()
        with self._lock:
            for h in self._holds:
                h.release()
            procs = list(self._procs.values())
        for p in procs:
            _terminate(p)
        if self._loop:
            self._loop.join(timeout)
        for t in list(self._threads):
            t.join(timeout)

    # ---------------------------------------------------------------------------------------------
    # the loop: claim Pending pods, notice deleted ones

    def _run_loop(self) -> None:
        while not self._stop.is_set():
            try:
                self._sync_once()
            except Exception as err:  # keep serving: a test asserts on .errors
                if not self._stop.is_set():
                    self.errors.append(f"sync: {err!r}")
                    log.exception("stand-in kubelet sync failed")
            self._stop.wait(self.poll_seconds)

    def _sync_once(self) -> None:
        resp = self.core.list_namespaced_pod(self.namespace, _preload_content=False)
        pods: list[Pod] = json.loads(resp.data)["items"]
        live = {p["metadata"]["uid"]: p for p in pods}
        with self._lock:
            # Pods deleted (or being deleted) while running: stop their processes, like a kubelet would.
            for uid, proc in list(self._procs.items()):
                pod = live.get(uid)
                if (pod is None or pod["metadata"].get("deletionTimestamp")) and not self.runs[uid].killed:
                    self.runs[uid].killed = True
                    threading.Thread(target=_terminate, args=(proc,), daemon=True).start()
            for uid, run in self.runs.items():  # held pods have no process yet
                if uid not in live and run.finished is None:
                    run.killed = True
            running = sum(
                1 for uid in self._claimed if self.runs.get(uid) is None or self.runs[uid].finished is None
            )
        for pod in sorted(pods, key=lambda p: p["metadata"]["creationTimestamp"]):
            uid = pod["metadata"]["uid"]
            if (
                uid in self._claimed
                or pod["metadata"].get("deletionTimestamp")
                or (pod.get("status") or {}).get("phase", "Pending") != "Pending"
            ):
                continue
            if running >= self.max_running:
                break
            try:
                cmd, env = self._command_and_env(pod)
            except PodConfigError as err:
                self._report_waiting(pod, err)
                continue
            self._claimed.add(uid)
            running += 1
            t = threading.Thread(
                target=self._run_pod, args=(pod, cmd, env), daemon=True, name=f"pod-{pod['metadata']['name']}"
            )
            self._threads.append(t)
            t.start()

    # ---------------------------------------------------------------------------------------------
    # one pod

    def _run_pod(self, pod: Pod, cmd: list[str], env: dict[str, str]) -> None:
        meta = pod["metadata"]
        uid, name = meta["uid"], meta["name"]
        container = pod["spec"]["containers"][0]
        run = PodRun(
            name=name,
            labels=dict(meta.get("labels") or {}),
            command=cmd,
            env=env,
            log_path=self.log_dir / f"{name}.log",
        )
        with self._lock:
            self.runs[uid] = run
            fault = next((f for f in self._faults if f.take(pod)), None)
            hold = next((h for h in self._holds if matches(h.selector, pod)), None)
        started_at = now_rfc3339()
        if not self._patch_status(name, _running_status(container, started_at)):
            run.finished = time.monotonic()  # deleted before it started
            return
        if fault is not None:
            run.injected = True
            run.log_path.write_text(f"stand-in kubelet: {fault.message} (exit code {fault.exit_code})\n")
            self._finish(run, container, started_at, fault.exit_code, fault.message)
            return
        if hold is not None:
            hold.held.append(name)
            while not hold.released.wait(0.1):
                if self._stop.is_set() or run.killed:
                    break
            if self._stop.is_set() or run.killed:
                run.killed = True
                run.finished = time.monotonic()
                return
        deadline = pod["spec"].get("activeDeadlineSeconds") or self.pod_timeout_seconds
        with open(run.log_path, "ab") as out:
            try:
                proc = subprocess.Popen(
                    cmd,
                    cwd=self.cwd,
                    env=env,
                    stdout=out,
                    stderr=subprocess.STDOUT,
                    stdin=subprocess.DEVNULL,
                    start_new_session=True,
                )
            except OSError as err:  # like a container whose entrypoint is missing
                out.write(f"stand-in kubelet: cannot start {cmd[0]!r}: {err}\n".encode())
                self._finish(run, container, started_at, 127, f"cannot start {cmd[0]!r}: {err}")
                return
            with self._lock:
                self._procs[uid] = proc
            try:
                code = proc.wait(timeout=deadline)
                code = 128 - code if code < 0 else code  # killed by a signal: 128 + its number
                message = termination_message(container, self._termination_file(pod), code, run.log_path)
            except subprocess.TimeoutExpired:
                _terminate(proc)
                code, message = 137, f"ran past its deadline of {deadline} s: killed by the stand-in kubelet"
            finally:
                with self._lock:
                    self._procs.pop(uid, None)
        if run.killed or self._stop.is_set():
            run.killed = True
            run.exit_code = code
            run.finished = time.monotonic()
            return  # the pod is gone (or the test is over): nothing to report to
        self._finish(run, container, started_at, code, message)

    def _finish(
        self, run: PodRun, container: dict[str, Any], started_at: str, code: int, message: str
    ) -> None:
        run.exit_code = code
        run.finished = time.monotonic()
        self._patch_status(run.name, _terminated_status(container, started_at, code, message))

    def _patch_status(self, name: str, status: dict[str, Any]) -> bool:
        """Write the pod's status through the status subresource; False if the pod no longer exists."""
        try:
            self.core.patch_namespaced_pod_status(name, self.namespace, {"status": status})
            return True
        except ApiException as err:
            if err.status in (404, 409):
                return False
            self.errors.append(f"patch status of {name}: {err.status} {err.reason}")
            return False

    def _report_waiting(self, pod: Pod, err: PodConfigError) -> None:
        uid, name = pod["metadata"]["uid"], pod["metadata"]["name"]
        if self._waiting_reason.get(uid) == str(err):
            return
        self._waiting_reason[uid] = str(err)
        container = pod["spec"]["containers"][0]
        self._patch_status(
            name,
            {
                "phase": "Pending",
                "containerStatuses": [
                    {
                        "name": container["name"],
                        "image": container.get("image", ""),
                        "imageID": "",
                        "ready": False,
                        "restartCount": 0,
                        "state": {"waiting": {"reason": err.reason, "message": str(err)}},
                    }
                ],
            },
        )

    # ---------------------------------------------------------------------------------------------
    # command and environment from the pod spec

    def _command_and_env(self, pod: Pod) -> tuple[list[str], dict[str, str]]:
        spec, meta = pod["spec"], pod["metadata"]
        c = spec["containers"][0]
        env: dict[str, str] = {k: os.environ[k] for k in _HOST_ENV if k in os.environ}
        env["PATH"] = f"{Path(self.python).parent}:{env.get('PATH', '/usr/bin:/bin')}"
        env["HOSTNAME"] = spec.get("hostname") or meta["name"]
        env.update(self.extra_env)
        mounts = self._volume_dirs(pod)
        for src in c.get("envFrom") or []:
            prefix = src.get("prefix", "")
            if "secretRef" in src:
                data = self._secret_data(src["secretRef"]["name"], src["secretRef"].get("optional", False))
            else:
                data = self._configmap_data(
                    src["configMapRef"]["name"], src["configMapRef"].get("optional", False)
                )
            env.update({prefix + k: v for k, v in (data or {}).items()})
        mounts[c.get("terminationMessagePath") or DEFAULT_TERMINATION_PATH] = str(self._termination_file(pod))
        for var in c.get("env") or []:
            value = self._env_value(pod, var, env)
            if value is not None:
                env[var["name"]] = rewrite_mount_paths(rewrite_cluster_dns(value), mounts)
        # Every container has its own /tmp, and Python falls back to it when TMPDIR names no folder:
        # scratch files of one pod must never leak into another's.
        if not Path(env.get("TMPDIR", "/nonexistent")).is_dir():
            env["TMPDIR"] = str(self._pod_dir(pod) / "tmp")
            Path(env["TMPDIR"]).mkdir(parents=True, exist_ok=True)
        words = [*(c.get("command") or []), *(c.get("args") or [])]
        if not c.get("command"):
            raise PodConfigError(
                "CreateContainerError",
                f"container {c['name']!r} has no command: the stand-in kubelet knows "
                "no image entrypoints, so Job manifests must set command",
            )
        words = [rewrite_mount_paths(expand_var_refs(w, env), mounts) for w in words]
        return [resolve_executable(words[0], self.python), *words[1:]], env

    def _pod_dir(self, pod: Pod) -> Path:
        return self.log_dir.parent / "pods" / pod["metadata"]["name"]

    def _termination_file(self, pod: Pod) -> Path:
        """The pod's own file behind its container's terminationMessagePath."""
        path = self._pod_dir(pod) / "termination-log"
        path.parent.mkdir(parents=True, exist_ok=True)
        return path

    def _volume_dirs(self, pod: Pod) -> dict[str, str]:
        """{mountPath: local folder} for the container's emptyDir mounts: a fresh, empty folder per pod.
        /dev/shm stays the machine's own (it exists here; a memory-backed emptyDir is the same thing)."""
        kinds = {v["name"]: v for v in pod["spec"].get("volumes") or []}
        out = {}
        for m in pod["spec"]["containers"][0].get("volumeMounts") or []:
            vol = kinds.get(m["name"], {})
            if "emptyDir" not in vol or m["mountPath"] == "/dev/shm":
                continue
            local = self._pod_dir(pod) / "volumes" / m["name"]
            local.mkdir(parents=True, exist_ok=True)
            out[m["mountPath"].rstrip("/")] = str(local)
        return out

    def _env_value(self, pod: Pod, var: dict[str, Any], env: Mapping[str, str]) -> str | None:
        if "value" in var:
            return expand_var_refs(str(var["value"]), env)
        src = var.get("valueFrom")
        if not src:
            return ""
        if "secretKeyRef" in src:
            ref = src["secretKeyRef"]
            data = self._secret_data(ref["name"], ref.get("optional", False))
            return self._key(data, ref, "secret", var["name"])
        if "configMapKeyRef" in src:
            ref = src["configMapKeyRef"]
            data = self._configmap_data(ref["name"], ref.get("optional", False))
            return self._key(data, ref, "configmap", var["name"])
        if "fieldRef" in src:
            return field_ref(pod, src["fieldRef"]["fieldPath"])
        if "resourceFieldRef" in src:
            return "1"  # no resource accounting here
        raise PodConfigError("CreateContainerConfigError", f"env {var['name']}: unsupported valueFrom {src}")

    @staticmethod
    def _key(data: dict[str, str] | None, ref: dict[str, Any], kind: str, var: str) -> str | None:
        if data is None:
            return None  # optional and missing
        if ref["key"] not in data:
            if ref.get("optional"):
                return None
            raise PodConfigError(
                "CreateContainerConfigError",
                f"couldn't find key {ref['key']} in {kind} {ref['name']} (env {var})",
            )
        return data[ref["key"]]

    def _secret_data(self, name: str, optional: bool) -> dict[str, str] | None:
        try:
            secret = self.core.read_namespaced_secret(name, self.namespace)
        except ApiException as err:
            if err.status == 404:
                if optional:
                    return None
                raise PodConfigError("CreateContainerConfigError", f'secret "{name}" not found') from None
            raise
        return {k: base64.b64decode(v).decode() for k, v in (secret.data or {}).items()}

    def _configmap_data(self, name: str, optional: bool) -> dict[str, str] | None:
        try:
            cm = self.core.read_namespaced_config_map(name, self.namespace)
        except ApiException as err:
            if err.status == 404:
                if optional:
                    return None
                raise PodConfigError("CreateContainerConfigError", f'configmap "{name}" not found') from None
            raise
        return dict(cm.data or {})


DEFAULT_TERMINATION_PATH = "/dev/termination-log"
LOG_TAIL_LINES, LOG_TAIL_BYTES, MESSAGE_BYTES = 80, 2048, 4096


def termination_message(container: dict[str, Any], written: Path, code: int, log_path: Path | None) -> str:
    """What a kubelet reports as the terminated container's message: the file at terminationMessagePath,
    else (FallbackToLogsOnError, and the container failed) the log's tail."""
    text = written.read_bytes()[:MESSAGE_BYTES].decode(errors="replace") if written.is_file() else ""
    if text.strip() or code == 0 or container.get("terminationMessagePolicy") != "FallbackToLogsOnError":
        return text
    if log_path is None or not log_path.is_file():
        return ""
    tail = log_path.read_bytes().decode(errors="replace").splitlines()[-LOG_TAIL_LINES:]
    return "\n".join(tail).encode()[-LOG_TAIL_BYTES:].decode(errors="replace")


def field_ref(pod: Pod, path: str) -> str:
    """The downward API: the values a kubelet would put in env for a fieldRef."""
    meta = pod["metadata"]
    simple = {
        "metadata.name": meta["name"],
        "metadata.namespace": meta["namespace"],
        "metadata.uid": meta["uid"],
        "spec.nodeName": NODE_NAME,
        "spec.serviceAccountName": pod["spec"].get("serviceAccountName", "default"),
        "status.podIP": POD_IP,
        "status.hostIP": POD_IP,
    }
    if path in simple:
        return simple[path]
    m = re.match(r"^metadata\.(labels|annotations)\['([^']+)'\]$", path)
    if m:
        return (meta.get(m.group(1)) or {}).get(m.group(2), "")
    raise PodConfigError("CreateContainerConfigError", f"unsupported fieldRef {path!r}")


def _running_status(container: dict[str, Any], started_at: str) -> dict[str, Any]:
    return {
        "phase": "Running",
        "startTime": started_at,
        "hostIP": POD_IP,
        "podIP": POD_IP,
        "podIPs": [{"ip": POD_IP}],
        "conditions": [
            {"type": t, "status": "True", "lastTransitionTime": started_at}
            for t in ("Initialized", "Ready", "ContainersReady", "PodScheduled")
        ],
        "containerStatuses": [
            {
                "name": container["name"],
                "image": container.get("image", ""),
                "imageID": "",
                "ready": True,
                "started": True,
                "restartCount": 0,
                "state": {"running": {"startedAt": started_at}},
            }
        ],
    }


def _terminated_status(container: dict[str, Any], started_at: str, code: int, message: str) -> dict[str, Any]:
    finished = now_rfc3339()
    terminated: dict[str, Any] = {
        "exitCode": code,
        "reason": "Completed" if code == 0 else "Error",
        "startedAt": started_at,
        "finishedAt": finished,
    }
    if message:
        terminated["message"] = message
    return {
        "phase": "Succeeded" if code == 0 else "Failed",
        "conditions": [
            {"type": t, "status": "False", "reason": "PodCompleted", "lastTransitionTime": finished}
            for t in ("Ready", "ContainersReady")
        ],
        "containerStatuses": [
            {
                "name": container["name"],
                "image": container.get("image", ""),
                "imageID": "",
                "ready": False,
                "started": False,
                "restartCount": 0,
                "state": {"terminated": terminated},
            }
        ],
    }


def _terminate(proc: subprocess.Popen[bytes], grace: float = 5.0) -> None:
    """SIGTERM the pod's process group (it may have children: DeepSpeed workers), SIGKILL after `grace`."""
    if proc.poll() is not None:
        return
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(grace)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(grace)
