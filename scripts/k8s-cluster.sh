#!/usr/bin/env bash
# A one-node Kubernetes v1.20.2 cluster with a REAL kubelet, for FusionRun's end-to-end tests: the control
# plane of scripts/k8s-control-plane.sh (etcd + kube-apiserver + kube-controller-manager on loopback) plus
# kube-scheduler, a private containerd (runc) and a kubelet, with pods on a CNI bridge of their own.
#
#   scripts/k8s-cluster.sh build                      binaries (k8s-control-plane.sh build-node), the Debian
#                                                     packages below, the local pause and busybox images
#   scripts/k8s-cluster.sh start STATE_DIR            start it all, wait for the Node to be Ready; prints
#                                                     KUBECONFIG=... and writes STATE_DIR/cluster.env
#   scripts/k8s-cluster.sh load-image STATE_DIR IMG.. podman save IMG | ctr import, into this cluster's containerd
#   scripts/k8s-cluster.sh stop STATE_DIR             stop everything, undo every host change, check nothing is left
#   scripts/k8s-cluster.sh status STATE_DIR           what is running (exit 0 when the node is up)
#
# Needs root; STATE_DIR must not contain spaces. `start` after a partial start or a crash first cleans up
# (it runs `stop`), and a failed start undoes itself; `start` on a running cluster just prints KUBECONFIG.
# `stop` is safe to repeat and works from pid files and recorded state, also after a crash (kubelet,
# containerd or API server killed: containers are killed through runc, leftover shims by their socket).
# Measured on 2 busy cores: start to Node Ready 23-45 s, stop 11-17 s (7 of them the control plane's),
# load-image 55 s for a 2.2 GB image. STATE_DIR/containerd keeps the loaded images across stop/start of the
# same STATE_DIR (~5 GB with the operator and job images); a new STATE_DIR must load them again.
# One cluster per machine as configured by default; a second one at the same time would need its own
# CLUSTER_BRIDGE, CLUSTER_POD_NET and CLUSTER_NODE_NAME (untested; the kubelet's sysctls are host-wide).
#
# What the pods get (all in STATE_DIR/cluster.env):
#   - a pod network POD_SUBNET (default 10.244.77.0/24; CLUSTER_POD_NET=a.b.c picks another /24) on bridge
#     BRIDGE (default cni-fusionrun0, CLUSTER_BRIDGE); its gateway GATEWAY_IP (a.b.c.1) is this machine:
#     a server the tests run on the host is reachable from pods at GATEWAY_IP (bind it there or to 0.0.0.0).
#     The Node's InternalIP, hence every pod's status.hostIP, is GATEWAY_IP too.
#   - pod-to-pod traffic by pod IP. NO kube-proxy and NO cluster DNS: ClusterIP Services do not route and
#     Service names (headless ones included) do not resolve. Use pod IPs (status.podIP, the Endpoints of a
#     headless Service) or host aliases. Pods' resolv.conf names GATEWAY_IP, where nothing answers: lookups
#     fail at once instead of leaving the machine.
#   - the API server from inside pods: the ServiceAccount admission plugin is on, so pods get the token
#     volume, and the in-cluster config works unchanged: 10.0.0.1:443 (KUBERNETES_SERVICE_HOST/PORT of the
#     `kubernetes` Service, injected by the kubelet) is DNAT'ed to GATEWAY_IP:API_PORT, where a socat relay
#     forwards to the API server on 127.0.0.1. The API server's self-signed certificate is valid for
#     127.0.0.1, 10.0.0.1 and GATEWAY_IP (--advertise-address=GATEWAY_IP; the `kubernetes` Endpoints say
#     GATEWAY_IP:API_PORT, also reachable). KUBERNETES_SERVICE_HOST=GATEWAY_IP works as well.
#   - images: nothing can be pulled. Pods must use images loaded with `load-image` (imagePullPolicy
#     IfNotPresent or Never). Built here: PAUSE_IMAGE (sandbox) and BUSYBOX_IMAGE (static busybox, for tests).
#     Pulls of anything else go to 127.0.0.1:1 (containerd's hosts.toml `_default`): ErrImagePull at once.
#
# Workarounds, and why each is needed in this sandbox (Debian 12 VM/container, cgroup v1 hybrid layout,
# no CAP_SYS_RESOURCE, no registry access, a podman already using 10.88.0.0/16):
#   - Pause image: none can be pulled. scripts/cluster/pause.c (gcc -static) is imported as
#     localhost/fusionrun-pause:1.0 and named in containerd's sandbox_image.
#   - containerd rlimits: CAP_SYS_RESOURCE is dropped, so no container may raise an rlimit above the host's
#     ("setrlimit ... operation not permitted"). A CRI base_runtime_spec (`ctr oci spec` with rlimits
#     NOFILE and NPROC set to this shell's soft limits) keeps them within the host's.
#   - oom_score_adj: lowering it needs CAP_SYS_RESOURCE. containerd: restrict_oom_score_adj = true (never
#     below its own); kubelet: oomScoreAdj 0 instead of -999 for itself. (The kubelet still logs, harmlessly,
#     "Failed to set rlimit on max file handles: operation not permitted": it tries 1048576 for itself.)
#   - Private containerd: its own root, state, socket, runc root (STATE_DIR/runc) and netns mounts under
#     its state dir (netns_mounts_under_state_dir), so it never meets a system containerd. crun refuses
#     the hybrid cgroup layout: runc, cgroupfs driver (SystemdCgroup = false; there is no systemd).
#   - One private mount namespace (a holder process made with `unshare -m --propagation slave`) for
#     containerd, its shims and the kubelet: every mount they make (overlay rootfs, shm, netns, secret
#     tmpfs, the kubelet's rshared bind of its root dir) exists only there and disappears with the last
#     process. In it, paths the kubelet/containerd hard-code are redirected into STATE_DIR: /var/log
#     (pod logs: /var/log/pods, /var/log/containers), /var/lib/cni (CNI result cache), /run/containerd
#     (shim sockets; a tmpfs) and /var/lib/kubelet (STATE_DIR/kubelet, the kubelet's --root-dir: the 1.20
#     kubelet puts its device-plugin socket in /var/lib/kubelet/device-plugins and its serving certificate
#     in /var/lib/kubelet/pki whatever --root-dir says). The host's directories are untouched (a missing
#     mount point, e.g. /run/containerd or /var/lib/kubelet, is created empty and removed at stop).
#   - kubelet: failSwapOn false (no swap here today; harmless); cgroupDriver cgroupfs with cgroupRoot
#     /fusionrun-node (created by this script in every v1 hierarchy, cpuset filled in, removed at stop) so
#     that the kubepods tree stays apart; makeIPTablesUtilChains false (no KUBE-* chains in the host's
#     iptables); volumePluginDir under STATE_DIR (it would create /usr/libexec/kubernetes/...); image GC
#     off (imageGCHighThresholdPercent 100: images cannot be pulled back) and low eviction thresholds.
#     The kubelet sets vm.overcommit_memory=1, kernel.panic=10, kernel.panic_on_oops=1 (it must; 1.20
#     has no flag to skip that, --protect-kernel-defaults=true only makes it refuse to start): the old
#     values are saved in STATE_DIR and restored by `stop`.
#   - kubelet API (port KUBELET_PORT on GATEWAY_IP; the API server has no kubelet client certificate, so
#     the kubelet allows anonymous requests) is rejected from the pod bridge by an iptables INPUT rule.
#     The API server reaches it for logs/exec by InternalIP (--kubelet-preferred-address-types=InternalIP:
#     the node name does not resolve, and looking it up would leave the machine).
#   - No traffic leaves the machine: the bridge plugin runs with isGateway=false (so it does not set
#     ip_forward; the script puts GATEWAY_IP on the bridge) and ipMasq=false, and iptables FORWARD rules
#     drop anything routed from or to the bridge (ip_forward is 1 here whenever podman has run). Pod to
#     pod is bridged (allowed first: br_netfilter shows bridged frames to iptables), pod to host is INPUT.
#   - The 1.20 kubelet's built-in ECR credential provider asks the EC2 metadata endpoint 169.254.169.254
#     for AWS credentials at startup (seen: an established kubelet connection to 169.254.169.254:80 and
#     "aws_credentials.go:77] while getting AWS credentials NoCredentialProviders"): the kubelet runs
#     with AWS_EC2_METADATA_DISABLED=true, which makes the AWS SDK skip that endpoint.
#   - Credentials: kubelet and scheduler use the control plane's admin kubeconfig (token, system:masters):
#     this is a throwaway test cluster. NodeRestriction is not enabled.
#   - Controllers: k8s-control-plane.sh keeps the node controllers off (nodelifecycle, nodeipam, ttl,
#     attachdetach): no podCIDR is needed (host-local IPAM has its own range) and the kubelet runs with
#     enableControllerAttachDetach false. Without the nodelifecycle controller nobody would lift the
#     node.kubernetes.io/not-ready:NoSchedule taint that the TaintNodesByCondition admission plugin puts
#     on a new Node (pods stay Pending: "1 node(s) had taint {node.kubernetes.io/not-ready: }"), so that
#     plugin is disabled (--disable-admission-plugins=TaintNodesByCondition).
#
# Edits needed in scripts/k8s-control-plane.sh (done): SERVICE_ACCOUNT_ADMISSION=1 drops its
# --disable-admission-plugins=ServiceAccount; APISERVER_EXTRA_ARGS appends kube-apiserver flags.
set -euo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
CP=$HERE/k8s-control-plane.sh
BIN_DIR=$(bash "$CP" bin-dir)
BRIDGE=${CLUSTER_BRIDGE:-cni-fusionrun0}
POD_NET=${CLUSTER_POD_NET:-10.244.77}
POD_SUBNET=$POD_NET.0/24
GATEWAY=$POD_NET.1
NODE_NAME=${CLUSTER_NODE_NAME:-fusionrun-node}
CGROUP_NAME=$NODE_NAME   # the kubelet's cgroupRoot: /$CGROUP_NAME in every hierarchy
SERVICE_IP=10.0.0.1   # first address of k8s-control-plane.sh's --service-cluster-ip-range=10.0.0.0/24
PAUSE_IMAGE=localhost/fusionrun-pause:1.0
BUSYBOX_IMAGE=localhost/fusionrun-busybox:1.0
PACKAGES=(containerd runc containernetworking-plugins podman iptables socat busybox-static gcc libc6-dev
  util-linux iproute2 kmod python3)
# The sysctls the 1.20 kubelet sets (setupKernelTunables): saved at start, restored at stop.
SYSCTLS=(vm.overcommit_memory vm.panic_on_oom kernel.panic kernel.panic_on_oops kernel.keys.root_maxkeys
  kernel.keys.root_maxbytes)

STOPPED_PIDS=()
OWNED=0
log() { echo "k8s-cluster: $*" >&2; }
die() { log "$*"; exit 1; }

wait_for() {  # wait_for SECONDS CMD...: retry CMD every 0.25 s
  local deadline=$((SECONDS + $1)); shift
  until "$@" >/dev/null 2>&1; do
    ((SECONDS < deadline)) || return 1
    sleep 0.25
  done
}

alive() { [[ -f $1 ]] && kill -0 "$(cat "$1")" 2>/dev/null; }

gone() {  # gone PID SECONDS: wait (polling every 0.1 s, no subprocess) until PID has exited
  local deadline=$((SECONDS + $2))
  while kill -0 "$1" 2>/dev/null; do
    ((SECONDS < deadline)) || return 1
    sleep 0.1
  done
}

stop_pid() {  # stop_pid PIDFILE [SECONDS]: TERM, then KILL; removes the pid file
  local f=$1 t=${2:-10} pid
  [[ -f $f ]] || return 0
  pid=$(cat "$f")
  STOPPED_PIDS+=("$pid")
  if kill "$pid" 2>/dev/null; then
    gone "$pid" "$t" || { kill -9 "$pid" 2>/dev/null || true; gone "$pid" 5 || true; }
  fi
  rm -f "$f"
}

free_port() {
  python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}

kubectl_bin() { command -v kubectl || echo "$BIN_DIR/kubectl"; }
kubectl_() { "$(kubectl_bin)" --kubeconfig "$D/kubeconfig" --cache-dir "$D/kube-cache" "$@"; }

# ------------------------------------------------------------------------------------------------ build

build_images() {
  local work
  if ! podman image exists "$PAUSE_IMAGE"; then
    work=$(mktemp -d)
    mkdir -p "$work/root"
    gcc -static -Os -Wall -Wextra -o "$work/root/pause" "$HERE/cluster/pause.c"
    strip "$work/root/pause"
    tar -C "$work/root" --owner=0 --group=0 -cf "$work/pause.tar" pause
    podman import -q --change 'ENTRYPOINT ["/pause"]' "$work/pause.tar" "$PAUSE_IMAGE" >/dev/null
    rm -rf "$work"
    log "built $PAUSE_IMAGE"
  fi
  if ! podman image exists "$BUSYBOX_IMAGE"; then
    work=$(mktemp -d)
    mkdir -p "$work/root/bin" "$work/root/tmp" "$work/root/etc"
    cp /bin/busybox "$work/root/bin/busybox"
    local a
    for a in $(/bin/busybox --list); do
      [[ $a == busybox ]] || ln -s busybox "$work/root/bin/$a"
    done
    chmod 1777 "$work/root/tmp"
    printf 'root:x:0:0:root:/:/bin/sh\nnobody:x:65534:65534:nobody:/:/bin/sh\n' >"$work/root/etc/passwd"
    printf 'root:x:0:\nnogroup:x:65534:\n' >"$work/root/etc/group"
    tar -C "$work/root" --owner=0 --group=0 -cf "$work/busybox.tar" .
    podman import -q --change 'CMD ["/bin/sh"]' --change 'ENV PATH=/bin' "$work/busybox.tar" "$BUSYBOX_IMAGE" >/dev/null
    rm -rf "$work"
    log "built $BUSYBOX_IMAGE"
  fi
}

cmd_build() {
  [[ $(id -u) == 0 ]] || die "needs root"
  bash "$CP" build-node
  if ! dpkg -s "${PACKAGES[@]}" >/dev/null 2>&1; then
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends "${PACKAGES[@]}" >/dev/null
  fi
  build_images
  log "ready: $BIN_DIR, $PAUSE_IMAGE, $BUSYBOX_IMAGE"
}

# ------------------------------------------------------------------------------------------------ start

ctr_() { ctr --address "$D/containerd.sock" -n k8s.io "$@"; }

import_image() {  # import_image IMAGE: podman save | ctr import (docker-archive keeps the name)
  local img=$1
  podman image exists "$img" || die "no podman image $img (build it first)"
  podman save --format docker-archive "$img" 2>/dev/null | ctr_ images import - >/dev/null \
    || die "importing $img into containerd failed"
}

cgroup_dirs() {  # every v1 hierarchy's copy of our cgroup root, and the unified one
  local m
  for m in /sys/fs/cgroup/*/; do
    [[ -f $m/cgroup.procs ]] && echo "${m%/}/$CGROUP_NAME"
  done
}

iptables_rules() {  # the rules we add: TABLE CHAIN SPEC...
  local api_port=$1 kubelet_port=$2
  echo "filter FORWARD -i $BRIDGE -o $BRIDGE -j ACCEPT"
  echo "filter FORWARD -i $BRIDGE -j DROP"
  echo "filter FORWARD -o $BRIDGE -j DROP"
  echo "filter INPUT -i $BRIDGE -p tcp --dport $kubelet_port -j REJECT"
  echo "nat PREROUTING -i $BRIDGE -d $SERVICE_IP/32 -p tcp --dport 443 -j DNAT --to-destination $GATEWAY:$api_port"
}

add_iptables() {
  local table chain spec n=1
  # Insert in order at the top, so that the ACCEPT of pod-to-pod comes before the DROPs.
  while read -r table chain spec; do
    # shellcheck disable=SC2086
    iptables -t "$table" -C "$chain" $spec -m comment --comment "fusionrun:$BRIDGE" 2>/dev/null && continue
    # shellcheck disable=SC2086
    if [[ $table == filter && $chain == FORWARD ]]; then
      iptables -t "$table" -I "$chain" "$n" $spec -m comment --comment "fusionrun:$BRIDGE"; n=$((n + 1))
    else
      iptables -t "$table" -I "$chain" 1 $spec -m comment --comment "fusionrun:$BRIDGE"
    fi
  done < <(iptables_rules "$@")
}

del_iptables() {  # every rule carrying our comment, whatever ports it names (works without saved state)
  local table line
  for table in filter nat; do
    while read -r line; do
      # shellcheck disable=SC2086
      eval "iptables -t $table ${line/-A /-D }" || true
    done < <(iptables -t "$table" -S 2>/dev/null | grep -F "fusionrun:$BRIDGE" || true)
  done
}

write_containerd_config() {
  local nofile nproc
  nofile=$(ulimit -Sn); nproc=$(ulimit -Su)
  [[ $nofile == unlimited ]] && nofile=1048576
  [[ $nproc == unlimited ]] && nproc=65536
  mkdir -p "$D/containerd/certs.d/_default"
  ctr oci spec | python3 -c '
import json, sys
spec = json.load(sys.stdin)
nofile, nproc = int(sys.argv[1]), int(sys.argv[2])
spec["process"]["rlimits"] = [
    {"type": "RLIMIT_NOFILE", "hard": nofile, "soft": nofile},
    {"type": "RLIMIT_NPROC", "hard": nproc, "soft": nproc},
]
json.dump(spec, sys.stdout, indent=1)
' "$nofile" "$nproc" >"$D/containerd/base-spec.json"
  cat >"$D/containerd/certs.d/_default/hosts.toml" <<'EOF'
# No registry is reachable from here: every pull goes to a closed local port and fails at once.
server = "http://127.0.0.1:1"
EOF
  cat >"$D/containerd/config.toml" <<EOF
version = 2
root = "$D/containerd/root"
state = "$D/containerd/state"
oom_score = 0
disabled_plugins = ["io.containerd.snapshotter.v1.btrfs", "io.containerd.snapshotter.v1.zfs",
  "io.containerd.snapshotter.v1.aufs", "io.containerd.snapshotter.v1.devmapper", "io.containerd.tracing.processor.v1.otlp"]

[grpc]
  address = "$D/containerd.sock"
[ttrpc]
  address = "$D/containerd.sock.ttrpc"
[debug]
  address = ""
[metrics]
  address = ""

[plugins]
  [plugins."io.containerd.internal.v1.opt"]
    path = "$D/containerd/opt"
  [plugins."io.containerd.grpc.v1.cri"]
    sandbox_image = "$PAUSE_IMAGE"
    restrict_oom_score_adj = true
    disable_apparmor = true
    netns_mounts_under_state_dir = true
    stream_server_address = "127.0.0.1"
    stream_server_port = "0"
    enable_selinux = false
    [plugins."io.containerd.grpc.v1.cri".containerd]
      snapshotter = "overlayfs"
      default_runtime_name = "runc"
      [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc]
        runtime_type = "io.containerd.runc.v2"
        base_runtime_spec = "$D/containerd/base-spec.json"
        [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc.options]
          BinaryName = "$(command -v runc)"
          Root = "$D/runc"
          SystemdCgroup = false
    [plugins."io.containerd.grpc.v1.cri".cni]
      bin_dir = "/usr/lib/cni"
      conf_dir = "$D/cni/net.d"
      max_conf_num = 1
    [plugins."io.containerd.grpc.v1.cri".registry]
      config_path = "$D/containerd/certs.d"
EOF
}

write_cni_config() {
  mkdir -p "$D/cni/net.d" "$D/cni/ipam"
  cat >"$D/cni/net.d/10-fusionrun.conflist" <<EOF
{
  "cniVersion": "0.4.0",
  "name": "fusionrun",
  "plugins": [
    {
      "type": "bridge",
      "bridge": "$BRIDGE",
      "isGateway": false,
      "ipMasq": false,
      "hairpinMode": false,
      "ipam": {
        "type": "host-local",
        "ranges": [[{"subnet": "$POD_SUBNET", "rangeStart": "$POD_NET.10", "rangeEnd": "$POD_NET.250", "gateway": "$GATEWAY"}]],
        "routes": [{"dst": "0.0.0.0/0", "gw": "$GATEWAY"}],
        "dataDir": "$D/cni/ipam"
      }
    }
  ]
}
EOF
}

write_kubelet_config() {
  local port=$1
  printf 'nameserver %s\noptions timeout:1 attempts:1\n' "$GATEWAY" >"$D/resolv.conf"
  cat >"$D/kubelet-config.yaml" <<EOF
apiVersion: kubelet.config.k8s.io/v1beta1
kind: KubeletConfiguration
address: $GATEWAY
port: $port
readOnlyPort: 0
healthzPort: 0
authentication:
  anonymous: {enabled: true}
  webhook: {enabled: false}
authorization: {mode: AlwaysAllow}
cgroupDriver: cgroupfs
cgroupsPerQOS: true
cgroupRoot: /$CGROUP_NAME
enforceNodeAllocatable: ["pods"]
failSwapOn: false
protectKernelDefaults: false
makeIPTablesUtilChains: false
oomScoreAdj: 0
resolvConf: $D/resolv.conf
clusterDomain: cluster.local
hairpinMode: none
volumePluginDir: $D/kubelet-volume-plugins
enableControllerAttachDetach: false
serializeImagePulls: false
imageGCHighThresholdPercent: 100
imageGCLowThresholdPercent: 99
evictionHard: {memory.available: "50Mi", nodefs.available: "1%", nodefs.inodesFree: "1%", imagefs.available: "1%"}
rotateCertificates: false
runtimeRequestTimeout: 5m
containerLogMaxSize: 50Mi
EOF
}

node_ready() {
  [[ $(kubectl_ get node "$NODE_NAME" \
    -o 'jsonpath={.status.conditions[?(@.type=="Ready")].status}' 2>/dev/null) == True ]]
}

sa_token_ready() {  # sa_token_ready NAMESPACE: its `default` ServiceAccount has its token secret
  [[ -n $(kubectl_ -n "$1" get serviceaccount default \
    -o 'jsonpath={.secrets[0].name}' 2>/dev/null) ]]
}

in_ns() { nsenter --mount="/proc/$(cat "$D/mountns.pid")/ns/mnt" -- "$@"; }

cmd_start() {
  D=${1:?usage: k8s-cluster.sh start STATE_DIR}
  [[ $(id -u) == 0 ]] || die "needs root"
  mkdir -p "$D/logs"
  D=$(cd "$D" && pwd)
  [[ -x $BIN_DIR/kubelet && -x $BIN_DIR/kube-scheduler ]] || die "no kubelet in $BIN_DIR: run '$0 build' first"
  if ! podman image exists "$PAUSE_IMAGE" || ! podman image exists "$BUSYBOX_IMAGE"; then
    die "no $PAUSE_IMAGE or $BUSYBOX_IMAGE in podman: run '$0 build' first"
  fi
  if alive "$D/kubelet.pid" && alive "$D/apiserver.pid" && node_ready; then
    log "already up"; echo "KUBECONFIG=$D/kubeconfig"; return 0
  fi
  # A previous run (partial start, crash): clean up first.
  if [[ -f $D/cluster.env ]] || compgen -G "$D/*.pid" >/dev/null; then
    cmd_stop "$D" || die "could not clean up the previous run from $D (above)"
  fi
  local t0=$SECONDS
  # From here on, a failure anywhere undoes what was done (logs stay in STATE_DIR/logs).
  trap 'log "start failed: cleaning up"; cmd_stop "$D" >/dev/null 2>&1 || true' EXIT
  # Our bridge must be ours and the subnet free.
  if ip link show "$BRIDGE" >/dev/null 2>&1; then die "$BRIDGE exists and is not ours (no $D/cluster.env): remove it or set CLUSTER_BRIDGE"; fi
  local clash; clash=$(ip -4 -o route show | python3 -c '
import ipaddress, sys
net = ipaddress.ip_network(sys.argv[1])
for line in sys.stdin:
    dst = line.split()[0]
    if dst != "default" and ipaddress.ip_network(dst, strict=False).overlaps(net):
        print(line.strip())
' "$POD_SUBNET")
  [[ -z $clash ]] || die "$POD_SUBNET overlaps a route of this machine ($clash): set CLUSTER_POD_NET to a free a.b.c"

  # Network first: the API server advertises GATEWAY and socat binds it. cluster.env first: it marks the
  # bridge, rules and cgroups as this STATE_DIR's for `stop`.
  printf 'BRIDGE=%s\nPOD_SUBNET=%s\nGATEWAY_IP=%s\nNODE_NAME=%s\n' "$BRIDGE" "$POD_SUBNET" "$GATEWAY" "$NODE_NAME" >"$D/cluster.env"
  ip link add "$BRIDGE" type bridge
  ip addr add "$GATEWAY/24" dev "$BRIDGE"
  ip link set "$BRIDGE" up

  # Control plane. Its self-signed certificate is only written when absent: drop one without GATEWAY.
  if [[ -f $D/pki/apiserver.crt ]] && ! openssl x509 -in "$D/pki/apiserver.crt" -noout -text | grep -q "IP Address:$GATEWAY"; then
    rm -f "$D/pki/apiserver.crt" "$D/pki/apiserver.key"
  fi
  SERVICE_ACCOUNT_ADMISSION=1 \
    APISERVER_EXTRA_ARGS="--advertise-address=$GATEWAY --kubelet-preferred-address-types=InternalIP --disable-admission-plugins=TaintNodesByCondition" \
    bash "$CP" start "$D" >&2 || die "control plane failed to start"
  # shellcheck disable=SC1091  # API_PORT
  source "$D/ports.env"
  local kubelet_port; kubelet_port=$(free_port)
  # shellcheck disable=SC2153  # from ports.env
  printf 'API_PORT=%s\nKUBELET_PORT=%s\n' "$API_PORT" "$kubelet_port" >>"$D/cluster.env"
  add_iptables "$API_PORT" "$kubelet_port"
  # Pods reach the API server at GATEWAY:API_PORT (and 10.0.0.1:443 via the DNAT above).
  setsid socat "TCP-LISTEN:$API_PORT,bind=$GATEWAY,reuseaddr,fork" "TCP:127.0.0.1:$API_PORT" \
    >"$D/logs/socat.log" 2>&1 </dev/null &
  echo $! >"$D/socat.pid"
  wait_for 10 bash -c "exec 3<>/dev/tcp/$GATEWAY/$API_PORT" || die "the API relay on $GATEWAY:$API_PORT did not start"

  # The kubelet's sysctls: remember the host's values once (a rerun must not save the kubelet's).
  if [[ ! -f $D/sysctl.saved ]]; then
    local s; for s in "${SYSCTLS[@]}"; do echo "$s=$(sysctl -n "$s")"; done >"$D/sysctl.saved.tmp"
    mv "$D/sysctl.saved.tmp" "$D/sysctl.saved"
  fi
  # cgroup root for the kubepods tree, in every hierarchy (the kubelet checks it exists in each).
  local c
  for c in $(cgroup_dirs); do
    mkdir -p "$c"
    if [[ $c == */cpuset/* ]]; then
      [[ -n $(cat "$c/cpuset.cpus") ]] || cat /sys/fs/cgroup/cpuset/cpuset.cpus >"$c/cpuset.cpus"
      [[ -n $(cat "$c/cpuset.mems") ]] || cat /sys/fs/cgroup/cpuset/cpuset.mems >"$c/cpuset.mems"
    fi
  done

  # The private mount namespace (see the header).
  mkdir -p "$D/host/var-log" "$D/host/var-lib-cni" "$D/kubelet" "$D/kubelet-volume-plugins" "$D/runc"
  if [[ ! -d /run/containerd ]]; then mkdir -p /run/containerd; touch "$D/created-run-containerd"; fi
  if [[ ! -d /var/lib/cni ]]; then mkdir -p /var/lib/cni; touch "$D/created-var-lib-cni"; fi
  if [[ ! -d /var/lib/kubelet ]]; then mkdir -p /var/lib/kubelet; touch "$D/created-var-lib-kubelet"; fi
  setsid unshare --mount --propagation slave sleep infinity </dev/null >/dev/null 2>&1 &
  echo $! >"$D/mountns.pid"
  wait_for 10 bash -c "[[ \$(readlink /proc/$(cat "$D/mountns.pid")/ns/mnt) != \$(readlink /proc/self/ns/mnt) ]]" \
    || die "no private mount namespace"
  in_ns mount --bind "$D/host/var-log" /var/log
  in_ns mount --bind "$D/host/var-lib-cni" /var/lib/cni
  in_ns mount -t tmpfs -o mode=0711 fusionrun-run-containerd /run/containerd
  in_ns mount --bind "$D/kubelet" /var/lib/kubelet

  # containerd.
  write_containerd_config
  write_cni_config
  setsid nsenter --mount="/proc/$(cat "$D/mountns.pid")/ns/mnt" -- \
    containerd --config "$D/containerd/config.toml" >"$D/logs/containerd.log" 2>&1 </dev/null &
  echo $! >"$D/containerd.pid"
  if ! wait_for 30 ctr_ version; then
    tail -20 "$D/logs/containerd.log" >&2; die "containerd did not start"
  fi
  local img
  for img in "$PAUSE_IMAGE" "$BUSYBOX_IMAGE"; do
    ctr_ images check "name==$img" 2>/dev/null | grep -q complete || import_image "$img"
  done

  # kube-scheduler (secure and insecure serving off: nothing scrapes it).
  setsid "$BIN_DIR/kube-scheduler" --kubeconfig="$D/kubeconfig" --leader-elect=false --port=0 --secure-port=0 \
    >"$D/logs/scheduler.log" 2>&1 </dev/null &
  echo $! >"$D/scheduler.pid"

  # kubelet.
  write_kubelet_config "$kubelet_port"
  # AWS_EC2_METADATA_DISABLED: the 1.20 kubelet's ECR credential provider otherwise asks the EC2 metadata
  # endpoint (169.254.169.254) for credentials at startup: traffic off this machine.
  AWS_EC2_METADATA_DISABLED=true setsid nsenter --mount="/proc/$(cat "$D/mountns.pid")/ns/mnt" -- \
    "$BIN_DIR/kubelet" --config="$D/kubelet-config.yaml" --kubeconfig="$D/kubeconfig" \
    --container-runtime=remote --container-runtime-endpoint="unix://$D/containerd.sock" \
    --root-dir=/var/lib/kubelet --hostname-override="$NODE_NAME" --node-ip="$GATEWAY" \
    --pod-infra-container-image="$PAUSE_IMAGE" --v=2 >"$D/logs/kubelet.log" 2>&1 </dev/null &
  echo $! >"$D/kubelet.pid"
  if ! wait_for 120 node_ready; then
    alive "$D/kubelet.pid" || log "the kubelet exited"
    grep -E '^[EF][0-9]{4}' "$D/logs/kubelet.log" | tail -20 >&2 || true
    die "node $NODE_NAME not Ready after 120 s (logs in $D/logs)"
  fi
  # Pods need the `default` ServiceAccount's token secret (the admission plugin rejects pods until it exists).
  wait_for 30 sa_token_ready default || die "no token for ServiceAccount default/default after 30 s"
  printf 'KUBECONFIG=%s\nPAUSE_IMAGE=%s\nBUSYBOX_IMAGE=%s\n' "$D/kubeconfig" "$PAUSE_IMAGE" "$BUSYBOX_IMAGE" >>"$D/cluster.env"
  trap - EXIT
  log "node $NODE_NAME Ready in $((SECONDS - t0)) s; pods on $POD_SUBNET, host at $GATEWAY"
  echo "KUBECONFIG=$D/kubeconfig"
}

# ------------------------------------------------------------------------------------------- load-image

cmd_load_image() {
  D=${1:?usage: k8s-cluster.sh load-image STATE_DIR IMAGE...}; shift
  D=$(cd "$D" && pwd)
  alive "$D/containerd.pid" || die "containerd is not running from $D: start the cluster first"
  local img t0
  for img in "$@"; do
    t0=$SECONDS
    import_image "$img"
    log "loaded $img ($((SECONDS - t0)) s)"
  done
}

# ------------------------------------------------------------------------------------------------- stop

kill_containers() {
  # Every container of our containerd: SIGKILL through runc (works with or without containerd), then
  # let containerd delete tasks and containers so that its metadata is clean for a restart.
  local id pidf procs f
  if [[ -d $D/runc/k8s.io ]]; then
    for id in $(runc --root "$D/runc/k8s.io" list -q 2>/dev/null); do
      runc --root "$D/runc/k8s.io" kill --all "$id" KILL 2>/dev/null || true
    done
  fi
  if alive "$D/containerd.pid"; then
    for id in $(ctr_ tasks ls -q 2>/dev/null); do
      ctr_ tasks kill -a -s SIGKILL "$id" >/dev/null 2>&1 || true
    done
    for id in $(ctr_ tasks ls -q 2>/dev/null); do
      ctr_ tasks delete -f "$id" >/dev/null 2>&1 || true
    done
    for id in $(ctr_ containers ls -q 2>/dev/null); do
      ctr_ containers delete "$id" >/dev/null 2>&1 || true
    done
  fi
  # Shims left by a containerd that died (they keep the mount namespace, hence the pods' netns and veths,
  # alive): each names our socket in its command line (-address STATE_DIR/containerd.sock).
  # shellcheck disable=SC2013  # /proc paths: no spaces
  for pidf in $(grep -laF -- "$D/containerd.sock" /proc/[0-9]*/cmdline 2>/dev/null); do
    pidf=${pidf%/cmdline}
    if [[ $(cat "$pidf/comm" 2>/dev/null) == containerd-shim* ]] && kill -9 "${pidf#/proc/}" 2>/dev/null; then
      gone "${pidf#/proc/}" 5 || true
    fi
  done
  # Anything still in our cgroup tree (a container process whose shim is gone).
  if [[ $OWNED == 1 ]]; then
    for f in $(cgroup_dirs); do
      [[ -d $f ]] || continue
      procs=$(find "$f" -name cgroup.procs -exec cat {} + 2>/dev/null | sort -u)
      # shellcheck disable=SC2086
      if [[ -n $procs ]]; then kill -9 $procs 2>/dev/null || true; fi
    done
  fi
  for id in $(runc --root "$D/runc/k8s.io" list -q 2>/dev/null); do
    runc --root "$D/runc/k8s.io" delete --force "$id" 2>/dev/null || true
  done
  return 0
}

leftovers() {  # what stop stopped, processes naming files in STATE_DIR, our bridge, cgroups, rules, mounts
  local p cmd
  for p in "${STOPPED_PIDS[@]}"; do
    kill -0 "$p" 2>/dev/null && echo "process $p: $(tr '\0' ' ' <"/proc/$p/cmdline" 2>/dev/null)"
  done
  # shellcheck disable=SC2013  # /proc paths: no spaces
  for p in $(grep -laF -- "$D/" /proc/[0-9]*/cmdline 2>/dev/null); do
    p=${p#/proc/}; p=${p%/cmdline}
    [[ $p == "$$" || $p == "$BASHPID" ]] && continue
    cmd=$(tr '\0' ' ' <"/proc/$p/cmdline" 2>/dev/null) || continue
    [[ $cmd != *k8s-cluster.sh* ]] && echo "process $p: $cmd"
  done
  if [[ $OWNED == 1 ]]; then
    ip link show "$BRIDGE" >/dev/null 2>&1 && echo "link $BRIDGE"
    local c
    for c in $(cgroup_dirs); do [[ -d $c ]] && echo "cgroup $c"; done
    iptables -S 2>/dev/null | grep -F "fusionrun:$BRIDGE" | sed 's/^/iptables /'
    iptables -t nat -S 2>/dev/null | grep -F "fusionrun:$BRIDGE" | sed 's/^/iptables -t nat /'
  fi
  grep -F " $D/" /proc/self/mountinfo | awk '{print "mount " $5}'
  return 0
}

cmd_stop() {
  D=${1:?usage: k8s-cluster.sh stop STATE_DIR}
  [[ -d $D ]] || { log "no $D: nothing to stop"; return 0; }
  D=$(cd "$D" && pwd)
  local t0=$SECONDS
  # The bridge, its iptables rules and the cgroup root are shared names: only a STATE_DIR whose start
  # created them (cluster.env, written right after the bridge) removes them, with the names it recorded.
  OWNED=0
  if [[ -f $D/cluster.env ]]; then
    OWNED=1
    BRIDGE=$(sed -n 's/^BRIDGE=//p' "$D/cluster.env")
    NODE_NAME=$(sed -n 's/^NODE_NAME=//p' "$D/cluster.env")
    CGROUP_NAME=$NODE_NAME
  fi
  stop_pid "$D/kubelet.pid" 15
  stop_pid "$D/scheduler.pid"
  kill_containers
  stop_pid "$D/containerd.pid" 15
  stop_pid "$D/mountns.pid"
  stop_pid "$D/socat.pid"
  if [[ $OWNED == 1 ]]; then
    del_iptables
    ip link del "$BRIDGE" 2>/dev/null || true
    local c
    for c in $(cgroup_dirs); do
      if [[ -d $c ]]; then find "$c" -depth -type d -exec rmdir {} + 2>/dev/null || true; fi
    done
  fi
  if [[ -f $D/sysctl.saved ]]; then
    sysctl -q -p "$D/sysctl.saved" >/dev/null && rm -f "$D/sysctl.saved"
  fi
  if [[ -f $D/created-run-containerd ]]; then rmdir /run/containerd 2>/dev/null || true; rm -f "$D/created-run-containerd"; fi
  if [[ -f $D/created-var-lib-cni ]]; then rmdir /var/lib/cni 2>/dev/null || true; rm -f "$D/created-var-lib-cni"; fi
  if [[ -f $D/created-var-lib-kubelet ]]; then rmdir /var/lib/kubelet 2>/dev/null || true; rm -f "$D/created-var-lib-kubelet"; fi
  # IP reservations of pods that were killed without a CNI DEL (their netns died with them).
  rm -rf "$D/cni/ipam"
  bash "$CP" stop "$D"
  rm -f "$D/cluster.env"
  local left; left=$(leftovers)
  if [[ -n $left ]]; then
    log "stopped in $((SECONDS - t0)) s, but these are left:"; echo "$left" >&2; return 1
  fi
  log "stopped in $((SECONDS - t0)) s; nothing left"
}

cmd_status() {
  D=${1:?usage: k8s-cluster.sh status STATE_DIR}
  D=$(cd "$D" && pwd)
  local p up=0
  for p in etcd apiserver controller-manager scheduler containerd kubelet socat mountns; do
    if alive "$D/$p.pid"; then echo "$p: running ($(cat "$D/$p.pid"))"; else echo "$p: stopped"; fi
  done
  node_ready && up=1
  echo "node $NODE_NAME ready: $([[ $up == 1 ]] && echo yes || echo no)"
  [[ $up == 1 ]]
}

case ${1:-} in
  build) cmd_build ;;
  start) shift; cmd_start "$@" ;;
  load-image) shift; cmd_load_image "$@" ;;
  stop) shift; cmd_stop "$@" ;;
  status) shift; cmd_status "$@" ;;
  *) echo "usage: $0 build | start STATE_DIR | load-image STATE_DIR IMAGE... | stop STATE_DIR | status STATE_DIR" >&2; exit 2 ;;
esac
