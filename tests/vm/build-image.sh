#!/usr/bin/env bash
# Build the disk image of socklab's test VMs from Debian packages, once per set
# of inputs: Debian's stock kernel (linux-image-amd64) with a tiny initramfs,
# docker.io with Compose v2 (trixie's .deb, as .ci/prepare-host.sh installs it),
# python3 with the orchestrator's requirements, iproute2, iptables, iperf3, and
# the lab's base image preloaded into the guest's Docker, and git (lab.py records the revision).
#
#   tests/vm/build-image.sh            prints the image directory (vmlinuz, initrd.img, disk.raw)
#
# The image lives under $SOCKLAB_HOST_STATE/vm/<key>, where key hashes every
# input (this script, the guest's files, requirements.txt, the base image's id,
# the Compose .deb): a second run with the same inputs only prints the path.
# No loop mounts: the root filesystem is made with `mkfs.ext4 -d`. The base
# image goes into the guest's Docker data-root on the host, by a second dockerd
# of the host's that owns nothing but that directory: loading it inside the VM
# under TCG took ~3 minutes, here it takes seconds.
# Needs root, debootstrap, e2fsprogs, dockerd and the base image on the host's
# Docker. Mirrors come from this machine's apt configuration.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
repo="$(cd "$here/../.." && pwd)"
# shellcheck source=../../.ci/apt-lib.sh
. "$repo/.ci/apt-lib.sh"

BASE_IMAGE="${BASE_IMAGE:-socklab-base:bookworm}"
STATE_DIR="${SOCKLAB_HOST_STATE:-/var/lib/socklab-host}"
PYTHON="${PYTHON:-python3}"
DISK_SIZE="${SOCKLAB_VM_DISK_SIZE:-6G}"
log() { printf '[vm-image] %s\n' "$*" >&2; }

base_id=$(docker image inspect --format '{{.Id}}' "$BASE_IMAGE" 2>/dev/null) \
    || { log "base image $BASE_IMAGE is missing: run .ci/prepare-host.sh first"; exit 3; }
compose_deb=$(compose_v2_deb "$STATE_DIR/apt-trixie")
key=$( { cat "$0" "$here/agent.py" "$here/guest/init" "$here/guest/initramfs-init" \
             "$repo/requirements.txt"; echo "$base_id $(basename "$compose_deb") $DISK_SIZE"; } \
       | sha256sum | cut -c1-16)
out="$STATE_DIR/vm/$key"
if [ -f "$out/ready" ]; then
    log "image $key present"
    echo "$out"
    exit 0
fi

work="$STATE_DIR/vm/build-$key"
loader_pid=""
# A dockerd of the host's whose data-root is the guest's /var/lib/docker and
# nothing else of the host's: its own socket, exec-root, containerd namespace,
# and a network namespace of its own (`--bridge none` deletes the docker0 it
# finds, which in the host's namespace is the host engine's bridge). Debian's docker.io on the host (as
# .ci/prepare-host.sh installs it) is the guest's version; overlay2's layout
# is the same in every release that has it.
load_base_image() {
    local data_root=$1 sock="$work/loader.sock"
    mkdir -p "$data_root"
    echo '{}' >"$work/loader.json"
    unshare --net dockerd --config-file "$work/loader.json" --data-root "$data_root" --exec-root "$work/loader-exec" \
        --pidfile "$work/loader.pid" -H "unix://$sock" --storage-driver overlay2 \
        --containerd-namespace socklab-vm-image --containerd-plugins-namespace socklab-vm-image-plugins \
        --bridge none --iptables=false --ip-masq=false >"$work/loader.log" 2>&1 &
    loader_pid=$!
    for _ in $(seq 1 150); do
        docker -H "unix://$sock" info >/dev/null 2>&1 && break
        kill -0 "$loader_pid" 2>/dev/null || { log "the loading dockerd exited:"; tail -n 20 "$work/loader.log" >&2; exit 3; }
        sleep 0.2
    done
    docker save "$BASE_IMAGE" | docker -H "unix://$sock" load -q >&2
    docker -H "unix://$sock" image inspect --format '{{.Id}}' "$BASE_IMAGE" | grep -qx "$base_id" \
        || { log "the guest's data-root does not hold $BASE_IMAGE $base_id"; exit 3; }
    stop_loader
    # The guest's dockerd makes its own networks, containers and caches.
    find "$data_root" -mindepth 1 -maxdepth 1 ! -name image ! -name overlay2 -exec rm -rf {} +
}
# shellcheck disable=SC2317  # called from the trap
stop_loader() {
    [ -n "$loader_pid" ] || return 0
    kill "$loader_pid" 2>/dev/null || true
    for _ in $(seq 1 150); do kill -0 "$loader_pid" 2>/dev/null || break; sleep 0.2; done
    kill -9 "$loader_pid" 2>/dev/null || true
    wait "$loader_pid" 2>/dev/null || true
    loader_pid=""
}
rm -rf "$work"
mkdir -p "$work"
# shellcheck disable=SC2317  # called from the trap
cleanup() {
    stop_loader
    rm -rf "$work"
}
trap cleanup EXIT
rootfs="$work/rootfs"
started=$(date +%s)

log "debootstrap bookworm (kernel, docker.io, python3, network tools)"
debootstrap --variant=minbase \
    --include=linux-image-amd64,docker.io,python3,git,iproute2,iptables,iperf3,iputils-ping,procps,kmod,busybox-static,cpio,ca-certificates \
    bookworm "$rootfs" "$(debian_mirror)" >"$work/debootstrap.log" 2>&1 \
    || { tail -n 30 "$work/debootstrap.log" >&2; exit 3; }

log "Compose v2 and the orchestrator's requirements"
cp "$compose_deb" "$rootfs/tmp/compose.deb"
chroot "$rootfs" dpkg -i /tmp/compose.deb >/dev/null
rm -f "$rootfs/tmp/compose.deb"
# The guest's python3 is bookworm's 3.11: wheels for it, whatever runs this script.
"$PYTHON" -m pip install --quiet --disable-pip-version-check --no-compile --target "$rootfs/opt/socklab-py" \
    --only-binary=:all: --implementation cp --python-version 3.11 \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    -r "$repo/requirements.txt"
echo /opt/socklab-py >"$rootfs/usr/lib/python3/dist-packages/socklab-py.pth"

log "guest init, agent, initramfs"
install -m 0755 "$here/guest/init" "$rootfs/sbin/socklab-init"
install -m 0755 "$here/agent.py" "$rootfs/usr/local/sbin/socklab-agent"
echo socklab-vm >"$rootfs/etc/hostname"
printf '127.0.0.1 localhost\n' >"$rootfs/etc/hosts"
kver=$(basename "$(ls -d "$rootfs"/lib/modules/*)")
initramfs="$rootfs/tmp/initramfs"
mkdir -p "$initramfs/bin" "$initramfs/modules"
cp "$rootfs/bin/busybox" "$initramfs/bin/busybox"
install -m 0755 "$here/guest/initramfs-init" "$initramfs/init"
# Module files in dependency order, each once.
chroot "$rootfs" modprobe -S "$kver" --show-depends -a virtio_pci virtio_blk ext4 \
    | awk '$1 == "insmod" && !seen[$2]++ {print $2}' >"$work/modules"
: >"$initramfs/modules.order"
while read -r module; do
    cp "$rootfs$module" "$initramfs/modules/"
    basename "$module" >>"$initramfs/modules.order"
done <"$work/modules"
chroot "$rootfs" sh -c 'cd /tmp/initramfs && find . | cpio -o -H newc --quiet' | gzip -1 >"$work/initrd.img"
rm -rf "$initramfs"
cp "$rootfs/boot/vmlinuz-$kver" "$work/vmlinuz"

log "base image $BASE_IMAGE into the guest's data-root"
load_base_image "$rootfs/var/lib/docker"
rm -rf "$rootfs"/var/cache/apt/archives/*.deb "$rootfs"/var/lib/apt/lists/* "$rootfs"/boot/initrd.img-*

log "mkfs.ext4 -d ($DISK_SIZE, sparse)"
mkfs.ext4 -q -F -L socklab-root -d "$rootfs" "$work/disk.raw" "$DISK_SIZE"
rm -rf "$rootfs"

mkdir -p "$out"
mv "$work/vmlinuz" "$work/initrd.img" "$work/disk.raw" "$out/"
echo "$BASE_IMAGE $base_id" >"$out/base-image"
touch "$out/ready"
# Older images (other keys) are not needed any more.
find "$STATE_DIR/vm" -mindepth 1 -maxdepth 1 -type d ! -name "$key" -exec rm -rf {} +
log "image $key built in $(( $(date +%s) - started )) s"
echo "$out"
