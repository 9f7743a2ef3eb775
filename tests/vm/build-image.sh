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
# No loop mounts: the root filesystem is made with `mkfs.ext4 -d`, and the base
# image is loaded by one boot of the image itself (kernel arg socklab.provision=1).
# Needs root, debootstrap, e2fsprogs, qemu-system-x86, and the base image on the
# host's Docker (only to `docker save` it). Mirrors come from this machine's apt
# configuration.
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
rm -rf "$work"
mkdir -p "$work"
trap 'rm -rf "$work"' EXIT
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

log "base image $BASE_IMAGE into the image"
mkdir -p "$rootfs/opt/socklab"
docker save "$BASE_IMAGE" >"$rootfs/opt/socklab/base.tar"
rm -rf "$rootfs"/var/cache/apt/archives/*.deb "$rootfs"/var/lib/apt/lists/* "$rootfs"/boot/initrd.img-*

log "mkfs.ext4 -d ($DISK_SIZE, sparse)"
mkfs.ext4 -q -F -L socklab-root -d "$rootfs" "$work/disk.raw" "$DISK_SIZE"
rm -rf "$rootfs"

log "provisioning boot: docker load of the base image"
timeout 600 qemu-system-x86_64 -M pc -accel tcg,thread=multi,tb-size=256 -cpu max -smp 1 -m 1024 \
    -nodefaults -nic none -display none -no-reboot -serial "file:$work/provision.log" \
    -kernel "$work/vmlinuz" -initrd "$work/initrd.img" \
    -append "console=ttyS0 quiet panic=-1 socklab.provision=1" \
    -drive "file=$work/disk.raw,if=virtio,format=raw,cache=writeback,discard=unmap" \
    || { log "provisioning boot failed"; tail -n 30 "$work/provision.log" >&2; exit 3; }
grep -q 'socklab-provision: ok' "$work/provision.log" \
    || { log "provisioning did not load the base image:"; tail -n 30 "$work/provision.log" >&2; exit 3; }

mkdir -p "$out"
mv "$work/vmlinuz" "$work/initrd.img" "$work/disk.raw" "$work/provision.log" "$out/"
echo "$BASE_IMAGE $base_id" >"$out/base-image"
touch "$out/ready"
# Older images (other keys) are not needed any more.
find "$STATE_DIR/vm" -mindepth 1 -maxdepth 1 -type d ! -name "$key" -exec rm -rf {} +
log "image $key built in $(( $(date +%s) - started )) s"
echo "$out"
