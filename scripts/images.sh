#!/usr/bin/env bash
# Builds FusionRun's two images from the one Dockerfile with podman (no Docker engine needed), on bases
# made locally from Debian's packages when no container registry can be reached.
#
#   scripts/images.sh build        the local base (once), then the operator and the CPU job image
#   scripts/images.sh base         only the local base: Debian bookworm minbase + python3 (debootstrap)
#   scripts/images.sh save DIR     write both images as OCI archives into DIR (for `ctr images import`)
#   scripts/images.sh names        print the image names this script builds
#
# Names: $IMAGE_PREFIX/fusionrun-operator:$VERSION and $IMAGE_PREFIX/fusionrun-job:$VERSION-cpu
# (IMAGE_PREFIX defaults to localhost; VERSION to pyproject.toml's). The CPU job image is the Dockerfile's
# `job` target with JOB_BASE_IMAGE/JOB_PYTHON/TORCH_INDEX_URL set for a CPU base; the CUDA image stays the
# published flavour (`docker build --target job .` with the Dockerfile's defaults).
#
# Bases: with USE_PUBLIC_BASES=1 the Dockerfile's own public bases are used (python:3.11-slim, debian);
# otherwise one local base image is made with debootstrap from Debian's packages (~2 min, once) and passed
# to the build arguments. pip inside the build uses this machine's own package-index settings (pip config,
# local wheel folders, CA bundle), mounted read-only for the build only: nothing of this machine enters a
# layer or the repository.
#
# Sandboxes: podman's runtime is runc when installed (crun refuses hybrid cgroup layouts), and containers get
# rlimits no higher than this shell's (raising them needs CAP_SYS_RESOURCE, which sandboxes often drop).
set -euo pipefail
cd "$(dirname "$0")/.."

VERSION=${VERSION:-$(sed -nE 's/^version = "([^"]+)"/\1/p' pyproject.toml | head -1)}
IMAGE_PREFIX=${IMAGE_PREFIX:-localhost}
OPERATOR_IMAGE=$IMAGE_PREFIX/fusionrun-operator:$VERSION
JOB_IMAGE=$IMAGE_PREFIX/fusionrun-job:$VERSION-cpu
# Debian 12 (bookworm): python3 is 3.11, the Python the project is tested with.
LOCAL_BASE=${LOCAL_BASE:-localhost/fusionrun-base:bookworm-python3.11}
DEBIAN_MIRROR=${DEBIAN_MIRROR:-http://deb.debian.org/debian}
PUBLIC_CPU_BASE=debian:12.12-slim

die() { echo "images: $*" >&2; exit 1; }
log() { echo "images: $*" >&2; }

podman_() {
  local rt=()
  command -v runc >/dev/null && rt=(--runtime "$(command -v runc)")
  podman "${rt[@]}" "$@"
}
ulimits() { echo "--ulimit=nofile=$(ulimit -Sn):$(ulimit -Hn) --ulimit=nproc=1000:1000"; }

# podman (+ runc, and debootstrap for local bases): installed from Debian's packages when missing and root.
need() {
  local pkgs=(podman runc debootstrap uidmap)
  command -v podman >/dev/null && command -v debootstrap >/dev/null && return 0
  [[ $(id -u) == 0 ]] && command -v apt-get >/dev/null \
    || die "podman or debootstrap not found: apt-get install ${pkgs[*]} (Debian/Ubuntu)"
  log "installing ${pkgs[*]} (Debian packages)"
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${pkgs[@]}" >/dev/null \
    || { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${pkgs[@]}" >/dev/null; }
}

cmd_base() {
  need
  if podman_ image exists "$LOCAL_BASE"; then log "base $LOCAL_BASE present"; return 0; fi
  command -v debootstrap >/dev/null || die "debootstrap not found: apt-get install debootstrap"
  [[ $(id -u) == 0 ]] || die "debootstrap needs root"
  local root; root=$(mktemp -d)
  # shellcheck disable=SC2064
  trap "rm -rf '$root'" RETURN
  log "making $LOCAL_BASE from Debian bookworm (debootstrap minbase, ~2 min, once)"
  local t0=$SECONDS
  debootstrap --variant=minbase --include=python3,python3-venv,python-is-python3,ca-certificates \
    bookworm "$root" "$DEBIAN_MIRROR" >"$root.log" 2>&1 || { tail -20 "$root.log" >&2; die "debootstrap failed"; }
  rm -rf "$root"/var/cache/apt/archives/*.deb "$root"/var/lib/apt/lists/* "$root.log"
  tar -C "$root" -c . | podman_ import \
    --change 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
    --change 'CMD ["/bin/bash"]' - "$LOCAL_BASE" >/dev/null
  log "base $LOCAL_BASE made in $((SECONDS - t0)) s"
}

# This machine's pip settings, for RUN steps only: a pip.conf naming the same index, extra indexes, wheel
# folders and CA bundle, plus read-only mounts of the local folders it names.
pip_mounts() {
  local conf=$1 line key value
  : >"$conf"
  echo "[global]" >>"$conf"
  local mounts=()
  while IFS= read -r line; do
    key=${line%%=*}; key=${key#*.}; value=${line#*=}; value=${value#\'}; value=${value%\'}
    case $key in
      index-url | extra-index-url | find-links | trusted-host | timeout | default-timeout)
        echo "$key = $value" >>"$conf"
        local v
        for v in $value; do
          v=${v#file://}
          # A local index's pages link to files beside it (../../files/...): mount the index's parent.
          [[ $key == *index-url ]] && v=$(dirname "$v")
          [[ $v == /* && -e $v ]] && mounts+=("-v=$v:$v:ro")
        done ;;
      cert)
        [[ -f $value ]] && { mounts+=("-v=$value:/run/fusionrun-build/ca.crt:ro"); echo "cert = /run/fusionrun-build/ca.crt" >>"$conf"; } ;;
    esac
  done < <(python3 -m pip config list 2>/dev/null | sed -E 's/^:env:\./global./' | sort -u)
  mounts+=("-v=$conf:/etc/pip.conf:ro")
  printf '%s\n' "${mounts[@]}"
}

# torch's CPU wheels live on PyTorch's own index; a machine that cannot reach it gets torch through its own
# pip settings (its index and wheel folders), which is how a CPU wheel reaches a build on a closed network.
torch_index() {
  if [[ -n ${TORCH_INDEX_URL:-} ]]; then echo "$TORCH_INDEX_URL"; return; fi
  local cpu=https://download.pytorch.org/whl/cpu
  if curl -sf -m 10 -o /dev/null "$cpu/torch/"; then echo "$cpu"; return; fi
  log "$cpu unreachable: torch comes from this machine's pip settings (index and wheel folders)"
  echo "${PIP_INDEX_URL:-https://pypi.org/simple}"
}

cmd_build() {
  need
  local base_args=()
  if [[ ${USE_PUBLIC_BASES:-0} == 1 ]]; then
    base_args=(--build-arg "JOB_BASE_IMAGE=$PUBLIC_CPU_BASE")
  else
    cmd_base
    base_args=(--build-arg "PYTHON_IMAGE=$LOCAL_BASE" --build-arg "JOB_BASE_IMAGE=$LOCAL_BASE")
  fi
  local tmp; tmp=$(mktemp -d)
  # shellcheck disable=SC2064
  trap "rm -rf '$tmp'" RETURN
  local mounts; mapfile -t mounts < <(pip_mounts "$tmp/pip.conf")
  local revision; revision=$(git rev-parse --short HEAD 2>/dev/null || echo unknown)
  # shellcheck disable=SC2046
  local common=(build --network host $(ulimits) --layers "${mounts[@]}"
    --build-arg "VERSION=$VERSION" --build-arg "REVISION=$revision" "${base_args[@]}" -f Dockerfile .)
  local t0=$SECONDS
  local job_args=(--build-arg JOB_PYTHON=python3.11 --build-arg "TORCH_INDEX_URL=$(torch_index)")
  podman_ "${common[@]}" --target operator -t "$OPERATOR_IMAGE"
  local t_operator=$((SECONDS - t0)); t0=$SECONDS
  podman_ "${common[@]}" --target job -t "$JOB_IMAGE" "${job_args[@]}"
  local t_job=$((SECONDS - t0))
  log "built $OPERATOR_IMAGE in $t_operator s, $JOB_IMAGE in $t_job s"
  # The build stages of this build (layer-cache hits now): kept, they are the next build's cache.
  podman_ "${common[@]}" -q --target operator-build --iidfile "$tmp/keep.operator" >/dev/null
  podman_ "${common[@]}" -q --target job-build --iidfile "$tmp/keep.job" "${job_args[@]}" >/dev/null
  remove_superseded "$(cat "$tmp/keep.operator")" "$(cat "$tmp/keep.job")"
  local torch; torch=$(podman_ run --rm $(ulimits) --entrypoint python "$JOB_IMAGE" -c 'import torch; print(torch.__version__)')
  [[ $torch == *+cpu ]] || log "warning: $JOB_IMAGE has torch $torch, not a CPU build (several GB larger)"
  podman_ images --format '{{.Repository}}:{{.Tag}} {{.Size}}' | grep -E "fusionrun-(operator|job)" >&2 || true
}

# Every build of changed code leaves its predecessors untagged: the old final images (2.2 GB for the job) and
# the old build stages. Left there they fill the disk of a machine that builds often (a CI runner: ~40 GB in
# a day). Removes exactly those: untagged images carrying our labels, except the build stages given (the
# current ones); their layers shared with the current images stay.
remove_superseded() {
  local keep=" $* " id ids=() label
  for label in io.fusionrun.build-stage org.opencontainers.image.title=fusionrun-operator \
    org.opencontainers.image.title=fusionrun-job; do
    while read -r id; do
      [[ -n $id && $keep != *" ${id#sha256:} "* && $keep != *" sha256:${id#sha256:} "* ]] && ids+=("$id")
    done < <(podman_ images --no-trunc --filter dangling=true --filter "label=$label" --format '{{.ID}}')
  done
  ((${#ids[@]})) || return 0
  podman_ rmi "${ids[@]}" >/dev/null 2>&1 || log "some superseded images are in use: left"
  log "removed ${#ids[@]} superseded image(s) of earlier builds"
}

cmd_save() {
  local dir=${1:?usage: images.sh save DIR}
  mkdir -p "$dir"
  podman_ save --format oci-archive -o "$dir/operator.tar" "$OPERATOR_IMAGE"
  podman_ save --format oci-archive -o "$dir/job.tar" "$JOB_IMAGE"
}

case ${1:-} in
  base) cmd_base ;;
  build) cmd_build ;;
  save) shift; cmd_save "$@" ;;
  names) echo "$OPERATOR_IMAGE"; echo "$JOB_IMAGE" ;;
  *) echo "usage: $0 build | base | save DIR | names" >&2; exit 2 ;;
esac
