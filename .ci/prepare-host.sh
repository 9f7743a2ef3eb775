#!/usr/bin/env bash
# Prepare a bare Debian host (the CI host) to run the lab: a Docker engine,
# Compose v2 and a local base image, since no registry is reachable there, and
# QEMU with the tools that build the VM tier's image.
# Idempotent: each step is skipped when what it makes is already present.
# Mirrors are read from this machine's own apt configuration, never hard-coded.
set -euo pipefail

BASE_IMAGE="${BASE_IMAGE:-socklab-base:bookworm}"
STATE_DIR="${SOCKLAB_HOST_STATE:-/var/lib/socklab-host}"
# shellcheck source=.ci/apt-lib.sh
. "$(dirname "$0")/apt-lib.sh"
log() { printf '[prepare-host] %s\n' "$*" >&2; }

apt_updated=0
apt_install() {
    if [ "$apt_updated" = 0 ]; then
        apt-get update -qq
        apt_updated=1
    fi
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "$@" >/dev/null
}

ensure_engine() {
    if docker info >/dev/null 2>&1; then
        log "Docker engine answers"
        return
    fi
    if ! command -v dockerd >/dev/null 2>&1; then
        log "installing docker.io"
        apt_install docker.io
    fi
    log "starting dockerd"
    mkdir -p "$STATE_DIR"
    nohup dockerd >"$STATE_DIR/dockerd.log" 2>&1 &
    for _ in $(seq 1 120); do
        docker info >/dev/null 2>&1 && { log "Docker engine answers"; return; }
        sleep 0.5
    done
    log "dockerd did not answer within 60 s; its log:"
    tail -n 30 "$STATE_DIR/dockerd.log" >&2
    exit 3
}

ensure_compose_v2() {
    if docker compose version >/dev/null 2>&1; then
        log "Compose v2: $(docker compose version --short 2>/dev/null)"
        return
    fi
    log "fetching Compose v2 from trixie"
    dpkg -i "$(compose_v2_deb "$STATE_DIR/apt-trixie")" >/dev/null
    docker compose version >/dev/null 2>&1 || { log "docker compose still missing after install"; exit 3; }
    log "Compose v2: $(docker compose version --short)"
}

# No registry here: build the base image from Debian packages with debootstrap.
# The packages the base carries, also its label: a base made with fewer (an older
# prepare) is made again, since the image then lacks a tool the lab uses.
BASE_PACKAGES=python3,iproute2,iptables,iperf3,strace,tcpdump
ensure_base_image() {
    if [ "$(docker image inspect -f '{{index .Config.Labels "io.socklab.base-packages"}}' "$BASE_IMAGE" 2>/dev/null)" \
            = "$BASE_PACKAGES" ]; then
        log "base image $BASE_IMAGE present"
        return
    fi
    command -v debootstrap >/dev/null 2>&1 || apt_install debootstrap
    local rootfs="$STATE_DIR/rootfs" mirror
    mirror=$(debian_mirror)
    rm -rf "$rootfs"
    log "debootstrap bookworm into $rootfs"
    debootstrap --variant=minbase --include="$BASE_PACKAGES" \
        bookworm "$rootfs" "$mirror" >"$STATE_DIR/debootstrap.log" 2>&1 \
        || { tail -n 20 "$STATE_DIR/debootstrap.log" >&2; exit 3; }
    rm -rf "$rootfs"/var/cache/apt/archives/*.deb "$rootfs"/var/lib/apt/lists/*
    tar -C "$rootfs" -c . | docker import -c 'CMD ["python3"]' \
        -c "LABEL io.socklab.base-packages=$BASE_PACKAGES" - "$BASE_IMAGE" >/dev/null
    rm -rf "$rootfs"
    log "base image $BASE_IMAGE imported"
}

# The VM test tier (tests/vm) boots Debian's stock kernel, which has netem, under
# QEMU; it builds its disk image (tests/vm/build-image.sh, cached under
# $STATE_DIR/vm) with debootstrap and mkfs.ext4 -d. The kernel and everything
# else inside the VMs come from Debian packages at image build time.
ensure_vm_tools() {
    local missing=() pair
    for pair in qemu-system-x86_64:qemu-system-x86 qemu-img:qemu-utils debootstrap:debootstrap mkfs.ext4:e2fsprogs; do
        command -v "${pair%%:*}" >/dev/null 2>&1 || missing+=("${pair#*:}")
    done
    if [ "${#missing[@]}" -eq 0 ]; then
        log "VM tools present"
        return
    fi
    log "installing ${missing[*]} for the VM tier"
    apt_install "${missing[@]}"
}

ensure_python_venv() {
    python3 -c 'import venv, ensurepip' 2>/dev/null || apt_install python3-venv
}

ensure_engine
ensure_compose_v2
ensure_base_image
ensure_vm_tools
ensure_python_venv
