#!/usr/bin/env bash
# Prepare a bare Debian host (the CI host) to run the lab: a Docker engine,
# Compose v2 and a local base image, since no registry is reachable there.
# Idempotent: each step is skipped when what it makes is already present.
# Mirrors are read from this machine's own apt configuration, never hard-coded.
set -euo pipefail

BASE_IMAGE="${BASE_IMAGE:-socklab-base:bookworm}"
STATE_DIR="${SOCKLAB_HOST_STATE:-/var/lib/socklab-host}"
log() { printf '[prepare-host] %s\n' "$*" >&2; }

apt_updated=0
apt_install() {
    if [ "$apt_updated" = 0 ]; then
        apt-get update -qq
        apt_updated=1
    fi
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "$@" >/dev/null
}

# The first Debian mirror URI this machine's apt uses (deb822 or one-line format).
debian_mirror() {
    local uri=""
    if compgen -G '/etc/apt/sources.list.d/*.sources' >/dev/null; then
        uri=$(awk '/^URIs:/ {for (i = 2; i <= NF; i++) if ($i !~ /security/) {print $i; exit}}' \
              /etc/apt/sources.list.d/*.sources | head -n1)
    fi
    if [ -z "$uri" ] && [ -f /etc/apt/sources.list ]; then
        uri=$(awk '$1 == "deb" && $0 !~ /security/ {for (i = 2; i <= NF; i++) if ($i ~ /^https?:/) {print $i; exit}}' \
              /etc/apt/sources.list | head -n1)
    fi
    [ -n "$uri" ] || { log "no Debian mirror found in the apt configuration"; exit 3; }
    printf '%s\n' "${uri%/}"
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

# Debian bookworm only packages Compose v1; trixie's docker-compose is v2 and needs
# nothing newer than bookworm's libc. Use a private apt state so the system's
# sources stay untouched.
ensure_compose_v2() {
    if docker compose version >/dev/null 2>&1; then
        log "Compose v2: $(docker compose version --short 2>/dev/null)"
        return
    fi
    local dir="$STATE_DIR/apt-trixie" mirror
    mirror=$(debian_mirror)
    mkdir -p "$dir/lists/partial" "$dir/archives/partial" "$dir/sources.list.d"
    printf 'deb [signed-by=/usr/share/keyrings/debian-archive-keyring.gpg] %s trixie main\n' \
        "$mirror" >"$dir/sources.list"
    local opts=(-o "Dir::Etc::SourceList=$dir/sources.list"
                -o "Dir::Etc::SourceParts=$dir/sources.list.d"
                -o "Dir::State::Lists=$dir/lists"
                -o "Dir::Cache::Archives=$dir/archives")
    log "fetching Compose v2 from trixie"
    apt-get "${opts[@]}" update -qq
    (cd "$dir" && rm -f docker-compose_*.deb && apt-get "${opts[@]}" download docker-compose -qq)
    dpkg -i "$dir"/docker-compose_*.deb >/dev/null
    docker compose version >/dev/null 2>&1 || { log "docker compose still missing after install"; exit 3; }
    log "Compose v2: $(docker compose version --short)"
}

# No registry here: build the base image from Debian packages with debootstrap.
ensure_base_image() {
    if docker image inspect "$BASE_IMAGE" >/dev/null 2>&1; then
        log "base image $BASE_IMAGE present"
        return
    fi
    command -v debootstrap >/dev/null 2>&1 || apt_install debootstrap
    local rootfs="$STATE_DIR/rootfs" mirror
    mirror=$(debian_mirror)
    rm -rf "$rootfs"
    log "debootstrap bookworm into $rootfs"
    debootstrap --variant=minbase --include=python3,iproute2,iptables,iperf3 \
        bookworm "$rootfs" "$mirror" >"$STATE_DIR/debootstrap.log" 2>&1 \
        || { tail -n 20 "$STATE_DIR/debootstrap.log" >&2; exit 3; }
    rm -rf "$rootfs"/var/cache/apt/archives/*.deb "$rootfs"/var/lib/apt/lists/*
    tar -C "$rootfs" -c . | docker import -c 'CMD ["python3"]' - "$BASE_IMAGE" >/dev/null
    rm -rf "$rootfs"
    log "base image $BASE_IMAGE imported"
}

ensure_python_venv() {
    python3 -c 'import venv, ensurepip' 2>/dev/null || apt_install python3-venv
}

ensure_engine
ensure_compose_v2
ensure_base_image
ensure_python_venv
