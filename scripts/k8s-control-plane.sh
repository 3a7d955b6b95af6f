#!/usr/bin/env bash
# A real Kubernetes control plane for FusionRun's integration tests: etcd + kube-apiserver +
# kube-controller-manager v1.20.2 on loopback, no kubelet, no scheduler (tests run pods with the
# stand-in kubelet in tests/harness/kubelet.py).
#
#   scripts/k8s-control-plane.sh build            build the two binaries once (cached), install etcd;
#                                                 also kubectl when the machine has none
#   scripts/k8s-control-plane.sh build-node       the same plus kube-scheduler and kubelet (scripts/k8s-cluster.sh)
#   scripts/k8s-control-plane.sh start STATE_DIR  start all three; writes STATE_DIR/kubeconfig, ports.env
#   scripts/k8s-control-plane.sh stop STATE_DIR   stop what `start` started there (by pid files)
#   scripts/k8s-control-plane.sh bin-dir          print where the binaries are (or will be)
#
# Why build: no release binaries can be downloaded here (package registries only), but Debian bookworm
# ships the Kubernetes 1.20.2 source package; building kube-apiserver + kube-controller-manager from it
# takes ~6 minutes on 2 cores, once. `build` is idempotent and returns at once when the cache is there.
# Cache: $K8S_BIN_DIR, default ~/.cache/k8s-control-plane/1.20.2-fusionrun1 (the suffix names our two
# patches for building 1.20 with a newer Go, see cmd_build). Needs root (apt-get) only when build
# dependencies are missing.
#
# Ports: API_PORT, ETCD_PORT, ETCD_PEER_PORT from the environment, else free ports picked at start, so
# that several control planes (parallel test sessions) never collide. They are written to ports.env.
set -euo pipefail

K8S_VERSION=1.20.2
# Bump the suffix whenever the patches applied below change, so that an old cache is not reused.
BUILD_ID=$K8S_VERSION-fusionrun1
BIN_DIR=${K8S_BIN_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/k8s-control-plane/$BUILD_ID}
# The Debian source tarball we build from, pinned by checksum: a different upload must be looked at first.
ORIG_TARBALL=kubernetes_1.20.5+really1.20.2.orig.tar.gz
ORIG_SHA256=b83c0780efb182d928dc63d46488a847f161f04e40a94b96bf5247dd671ecdfc
BUILD_DEPS=(golang-go etcd-server etcd-client rsync jq dpkg-dev openssl curl
  golang-github-modern-go-reflect2-dev)

die() { echo "k8s-control-plane: $*" >&2; exit 1; }

have_binaries() {
  [[ -x $BIN_DIR/kube-apiserver && -x $BIN_DIR/kube-controller-manager ]] \
    && "$BIN_DIR/kube-apiserver" --version 2>/dev/null | grep -q "v$K8S_VERSION"
}

install_deps() {
  dpkg -s "${BUILD_DEPS[@]}" >/dev/null 2>&1 && return 0
  [[ $(id -u) == 0 ]] || die "missing Debian packages (${BUILD_DEPS[*]}): run this as root or apt-get install them"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "${BUILD_DEPS[@]}" >/dev/null
}

# `apt-get source` needs deb-src entries; a stock bookworm image has only deb ones: add their twins.
enable_deb_src() {
  grep -rqsE '^(Types:.*deb-src|deb-src )' /etc/apt/sources.list /etc/apt/sources.list.d/ && return 0
  [[ $(id -u) == 0 ]] || die "no deb-src entries in /etc/apt: run as root to add them"
  local f
  for f in /etc/apt/sources.list.d/*.sources; do
    [[ -f $f ]] || continue
    sed -E 's/^Types:[[:space:]]*deb$/Types: deb-src/' "$f" >"${f%.sources}-fusionrun-src.sources"
  done
  if [[ -f /etc/apt/sources.list ]]; then
    sed -n 's/^deb /deb-src /p' /etc/apt/sources.list >/etc/apt/sources.list.d/fusionrun-src.list
  fi
  apt-get update -qq
}

have_kubectl() { command -v kubectl >/dev/null || [[ -x $BIN_DIR/kubectl ]]; }

# What is missing: the two control plane binaries, and kubectl when the machine has none (the tests drive
# the API server with it; a kubectl built from the same source matches the server's version).
missing_targets() {
  have_binaries || echo "cmd/kube-apiserver cmd/kube-controller-manager"
  have_kubectl || echo "cmd/kubectl"
  [[ ${WITH_NODE:-0} == 1 ]] && ! have_node_binaries && echo "cmd/kube-scheduler cmd/kubelet"
  return 0
}

# The node half (scheduler + kubelet), for scripts/k8s-cluster.sh: built only when asked (`build-node`).
have_node_binaries() {
  [[ -x $BIN_DIR/kube-scheduler && -x $BIN_DIR/kubelet ]] && "$BIN_DIR/kubelet" --version 2>/dev/null | grep -q "v$K8S_VERSION"
}

cmd_build() {
  if [[ -z $(missing_targets) ]] && command -v etcd >/dev/null; then
    echo "k8s-control-plane: v$K8S_VERSION ready in $BIN_DIR"; return 0
  fi
  # One build at a time (parallel test sessions, make targets): the others wait, then find the cache.
  mkdir -p "$(dirname "$BIN_DIR")"
  exec 9>"$BIN_DIR.lock"
  flock 9
  install_deps
  local targets; targets=$(missing_targets | tr '\n' ' ')
  if [[ -z ${targets// /} ]]; then echo "k8s-control-plane: v$K8S_VERSION ready in $BIN_DIR"; return 0; fi
  enable_deb_src
  local work; work=$(mktemp -d)
  # shellcheck disable=SC2064  # expand now: $work is local
  trap "rm -rf '$work'" EXIT
  echo "k8s-control-plane: building $targets(v$K8S_VERSION, ~6 min for all, once)"
  (cd "$work" && apt-get source --download-only -qq kubernetes >/dev/null 2>&1) \
    || (cd "$work" && apt-get source --download-only kubernetes)
  [[ -f $work/$ORIG_TARBALL ]] || die "Debian's kubernetes source is not $ORIG_TARBALL: found $(ls "$work")"
  echo "$ORIG_SHA256  $work/$ORIG_TARBALL" | sha256sum -c --quiet - || die "$ORIG_TARBALL checksum mismatch"
  tar -xzf "$work/$ORIG_TARBALL" -C "$work"
  local src=$work/kubernetes-$K8S_VERSION
  # reflect2 1.0.1 (vendored) segfaults when encoding maps under Go >= 1.18; Debian's 1.0.2 is fixed.
  local r=$src/vendor/github.com/modern-go/reflect2 sys=/usr/share/gocode/src/github.com/modern-go/reflect2
  rm -rf "${r:?}"/*
  cp "$sys"/*.go "$sys"/*.s "$r"/
  rm -f "$r"/*_test.go
  # go-openapi/validate treats a value as JSON null when reflect.DeepEqual(reflect.Zero(T), ValueOf(v)):
  # with Go >= 1.18 that holds for every zero value ("" , 0, false), so the API server would reject
  # `message: ""` in a custom resource as 'must be of type string: "null"'. Only a real nil is null.
  local tv=$src/vendor/github.com/go-openapi/validate/type.go
  grep -q 'data == nil || reflect.DeepEqual(reflect.Zero(reflect.TypeOf(data)), reflect.ValueOf(data))' "$tv" \
    || die "unexpected $tv: the zero-value patch no longer applies"
  sed -i 's/data == nil || reflect.DeepEqual(reflect.Zero(reflect.TypeOf(data)), reflect.ValueOf(data))/data == nil/' "$tv"
  # The build expects the tree at $GOPATH/src/k8s.io/kubernetes; everything is vendored, so no network.
  mkdir -p "$src/.gopath/src/k8s.io"
  ln -sfn "$src" "$src/.gopath/src/k8s.io/kubernetes"
  if ! (cd "$src" && GOPATH=$src/.gopath CGO_ENABLED=0 GOPROXY=off GOFLAGS= \
        make WHAT="${targets% }" >"$work/build.log" 2>&1); then
    tail -40 "$work/build.log" >&2; die "build failed (log above)"
  fi
  mkdir -p "$BIN_DIR"
  # Copy then rename: an interrupted copy never looks like a finished cache.
  local t b
  for t in $targets; do
    b=${t#cmd/}
    cp "$src/_output/bin/$b" "$BIN_DIR/.$b.tmp" && mv -f "$BIN_DIR/.$b.tmp" "$BIN_DIR/$b"
  done
  echo "k8s-control-plane: built into $BIN_DIR"
}

free_port() {
  python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}

wait_for() {  # wait_for SECONDS CMD...: retry CMD every 0.25 s
  local deadline=$((SECONDS + $1)); shift
  until "$@" >/dev/null 2>&1; do
    ((SECONDS < deadline)) || return 1
    sleep 0.25
  done
}

cmd_start() {
  local d=${1:?usage: k8s-control-plane.sh start STATE_DIR}
  have_binaries || die "no control plane binaries in $BIN_DIR: run 'scripts/k8s-control-plane.sh build' first"
  command -v etcd >/dev/null || die "etcd not found: run 'scripts/k8s-control-plane.sh build' (installs etcd-server)"
  mkdir -p "$d/pki" "$d/logs"
  d=$(cd "$d" && pwd)
  [[ -f $d/apiserver.pid ]] && kill -0 "$(cat "$d/apiserver.pid")" 2>/dev/null \
    && die "a control plane is already running from $d: stop it first"
  local api=${API_PORT:-$(free_port)} etcd_port=${ETCD_PORT:-$(free_port)} peer=${ETCD_PEER_PORT:-$(free_port)}
  printf 'API_PORT=%s\nETCD_PORT=%s\nETCD_PEER_PORT=%s\n' "$api" "$etcd_port" "$peer" >"$d/ports.env"
  # Service-account token signing key (the token controller and the API server share it).
  if [[ ! -f $d/pki/sa.key ]]; then
    openssl genrsa -out "$d/pki/sa.key" 2048 2>/dev/null
    openssl rsa -in "$d/pki/sa.key" -pubout -out "$d/pki/sa.pub" 2>/dev/null
  fi
  local token; token=$(openssl rand -hex 24)
  echo "$token,admin,admin,system:masters" >"$d/pki/tokens.csv"
  chmod 600 "$d/pki/tokens.csv"

  # setsid: each component in its own session, so that a test runner's Ctrl-C reaches `stop`, not them.
  setsid etcd --name fusionrun-test --data-dir "$d/etcd" --unsafe-no-fsync \
    --listen-client-urls "http://127.0.0.1:$etcd_port" --advertise-client-urls "http://127.0.0.1:$etcd_port" \
    --listen-peer-urls "http://127.0.0.1:$peer" --initial-advertise-peer-urls "http://127.0.0.1:$peer" \
    --initial-cluster "fusionrun-test=http://127.0.0.1:$peer" >"$d/logs/etcd.log" 2>&1 </dev/null &
  echo $! >"$d/etcd.pid"

  # Token auth + RBAC as on a real cluster; the ServiceAccount admission plugin is off because no token
  # volumes can be mounted without a kubelet. scripts/k8s-cluster.sh (a real kubelet) turns it back on with
  # SERVICE_ACCOUNT_ADMISSION=1 and adds flags with APISERVER_EXTRA_ARGS (space-separated, after ours).
  local sa_admission=(--disable-admission-plugins=ServiceAccount) extra_args=()
  [[ ${SERVICE_ACCOUNT_ADMISSION:-0} == 1 ]] && sa_admission=()
  read -ra extra_args <<<"${APISERVER_EXTRA_ARGS:-}"
  setsid "$BIN_DIR/kube-apiserver" --etcd-servers="http://127.0.0.1:$etcd_port" \
    --bind-address=127.0.0.1 --advertise-address=127.0.0.1 --secure-port="$api" --insecure-port=0 \
    --cert-dir="$d/pki" --token-auth-file="$d/pki/tokens.csv" --authorization-mode=RBAC \
    --service-account-issuer=https://kubernetes.default.svc --service-account-key-file="$d/pki/sa.pub" \
    --service-account-signing-key-file="$d/pki/sa.key" --service-cluster-ip-range=10.0.0.0/24 \
    "${sa_admission[@]}" "${extra_args[@]}" >"$d/logs/apiserver.log" 2>&1 </dev/null &
  echo $! >"$d/apiserver.pid"

  cat >"$d/kubeconfig" <<EOF
apiVersion: v1
kind: Config
clusters:
- name: fusionrun-test
  cluster: {server: "https://127.0.0.1:$api", certificate-authority: "$d/pki/apiserver.crt"}
users:
- name: admin
  user: {token: "$token"}
contexts:
- name: fusionrun-test
  context: {cluster: fusionrun-test, user: admin, namespace: default}
current-context: fusionrun-test
EOF
  chmod 600 "$d/kubeconfig"
  # TLS is verified: the API server's self-signed certificate (written at its start) is the CA.
  local ready=(curl -sfk -H "Authorization: Bearer $token" "https://127.0.0.1:$api/readyz")
  if ! wait_for 60 "${ready[@]}"; then
    tail -20 "$d/logs/apiserver.log" >&2; tail -5 "$d/logs/etcd.log" >&2
    cmd_stop "$d"; die "kube-apiserver not ready after 60 s (logs in $d/logs)"
  fi

  # Controllers: jobs, garbage collector (ownerReferences), namespaces, service accounts. Node, volume
  # and cloud controllers are off: there are no nodes. Serving ports off: nothing scrapes them here.
  setsid "$BIN_DIR/kube-controller-manager" --kubeconfig="$d/kubeconfig" --leader-elect=false \
    --bind-address=127.0.0.1 --port=0 --secure-port=0 \
    --service-account-private-key-file="$d/pki/sa.key" --root-ca-file="$d/pki/apiserver.crt" \
    --controllers='*,-nodeipam,-nodelifecycle,-cloud-node-lifecycle,-service,-route,-attachdetach,-persistentvolume-binder,-persistentvolume-expander,-pvc-protection,-pv-protection,-ttl' \
    >"$d/logs/controller-manager.log" 2>&1 </dev/null &
  echo $! >"$d/controller-manager.pid"
  # The controller manager is up once its service-account controller has filled in `default`.
  local sa=(curl -sfk -H "Authorization: Bearer $token" \
    "https://127.0.0.1:$api/api/v1/namespaces/default/serviceaccounts/default")
  if ! wait_for 60 "${sa[@]}"; then
    tail -20 "$d/logs/controller-manager.log" >&2
    cmd_stop "$d"; die "kube-controller-manager not working after 60 s (logs in $d/logs)"
  fi
  echo "k8s-control-plane: up, KUBECONFIG=$d/kubeconfig (API on 127.0.0.1:$api)"
}

cmd_stop() {
  local d=${1:?usage: k8s-control-plane.sh stop STATE_DIR} p pid
  for p in controller-manager apiserver etcd; do
    [[ -f $d/$p.pid ]] || continue
    pid=$(cat "$d/$p.pid")
    if kill "$pid" 2>/dev/null; then
      wait_for 10 bash -c "! kill -0 $pid" || kill -9 "$pid" 2>/dev/null || true
    fi
    rm -f "$d/$p.pid"
  done
}

case ${1:-} in
  build) cmd_build ;;
  build-node) WITH_NODE=1 cmd_build ;;
  start) shift; cmd_start "$@" ;;
  stop) shift; cmd_stop "$@" ;;
  bin-dir) echo "$BIN_DIR" ;;
  *) echo "usage: $0 build | build-node | start STATE_DIR | stop STATE_DIR | bin-dir" >&2; exit 2 ;;
esac
