"""The payload a client sends: ``pattern`` repeated to a size, as one read-only buffer.

A blocking send() of the whole payload makes the kernel copy every byte of it
into socket buffers. From a payload-sized buffer (GiBs, at the load-generation
benchmark's veth speeds) that copy reads memory rather than the cache, and it
bounds the sender below the link (iperf3 sends one 128 KiB buffer again and
again). So a large payload is made of one small memory file holding whole
patterns over whole pages (a tile), mapped again and again side by side: still
one contiguous buffer, sent with one send() as the tutorial does, but its
physical pages are the tile's, so the kernel's copy reads from the cache.
"""

from __future__ import annotations

import ctypes
import math
import mmap
import os
from typing import Callable

from .workloads import make_payload

# A tile is at least this long: fewer mappings (each is a syscall and a kernel
# VMA), while it still fits a core's L2 cache.
MIN_TILE_BYTES = 256 * 1024
# Past this a tile would no longer sit in the cache, which is all it is for; a
# long pattern of odd length (whole patterns over whole pages) can get there.
MAX_TILE_BYTES = 8 * 1024 * 1024
# A quarter of vm.max_map_count's default (65530): the rest stays for the
# interpreter, its libraries and thread stacks. Tiles grow to keep under it.
MAX_MAPPINGS = 16384
# Linux's mmap(2) flag on every architecture the lab image runs on; the mmap
# module does not export it (it never maps at a fixed address itself).
_MAP_FIXED = 0x10


def tile_bytes(pattern_bytes: int, payload_bytes: int, page_bytes: int = mmap.PAGESIZE) -> int | None:
    """The length of the tile a payload of ``payload_bytes`` is mapped from, or None for plain bytes.

    A tile holds whole patterns and whole pages (a multiple of their lcm), so
    tiles mapped side by side continue the pattern. It is at least
    MIN_TILE_BYTES and long enough for at most MAX_MAPPINGS of them; None when
    that passes MAX_TILE_BYTES, or when the payload fits in one tile anyway.
    """
    period = math.lcm(pattern_bytes, page_bytes)
    wanted = max(MIN_TILE_BYTES, -(-payload_bytes // MAX_MAPPINGS))
    tile = -(-wanted // period) * period
    if tile > MAX_TILE_BYTES or payload_bytes <= tile:
        return None
    return tile


class Payload:
    """``pattern`` repeated and cut to exactly ``nbytes``, as the read-only buffer ``view``.

    Tiled (see the module's docstring) when :func:`tile_bytes` gives a tile and
    the mapping can be made; otherwise (no memfd_create, the map count limit
    reached, too long a pattern) the plain bytes of ``make_payload``, the same
    bytes either way. ``tiled`` says which.

    The mapped region belongs to a Python mmap object, which never unmaps it
    while a slice of ``view`` is alive (a send() may be reading it): close()
    (or leaving the ``with`` block) unmaps it at once if none is left, or else
    when the last one goes.
    """

    def __init__(self, nbytes: int, pattern: bytes) -> None:
        self._region: mmap.mmap | None = None
        tile = tile_bytes(len(pattern), nbytes)
        if tile is not None:
            try:
                self._region = _map_tiles(pattern * (tile // len(pattern)), -(-nbytes // tile))
            except (OSError, AttributeError):  # AttributeError: a libc without mmap (or no os.memfd_create)
                self._region = None
        if self._region is not None:
            self.view = memoryview(self._region)[:nbytes].toreadonly()
        else:
            self.view = memoryview(make_payload(nbytes, pattern))

    @property
    def tiled(self) -> bool:
        """Whether ``view`` is the mapped tiles (False: plain bytes)."""
        return self._region is not None

    def close(self) -> None:
        """Release ``view`` and unmap the tiles (see the class's docstring for a slice still held)."""
        self.view.release()
        region, self._region = self._region, None
        if region is not None:
            try:
                region.close()
            except BufferError:  # a slice outlived the run: the mmap object unmaps it when it goes
                pass

    def __enter__(self) -> Payload:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


def _libc_mmap() -> Callable[..., int | None]:
    mmap_fn = ctypes.CDLL(None, use_errno=True).mmap
    mmap_fn.restype = ctypes.c_void_p
    mmap_fn.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_long]
    return mmap_fn


def _map_tiles(tile: bytes, count: int) -> mmap.mmap:
    """An mmap object whose region is ``tile`` mapped ``count`` times side by side (OSError if it cannot be)."""
    libc_mmap = _libc_mmap()
    # The region is reserved by an mmap object, not by ctypes: its close() then
    # unmaps everything mapped into it, and knows whether views are still held.
    # MAP_NORESERVE: these pages are never written; the tiles replace them.
    region = mmap.mmap(-1, len(tile) * count, flags=mmap.MAP_PRIVATE | getattr(mmap, "MAP_NORESERVE", 0))
    try:
        anchor = ctypes.c_char.from_buffer(region)
        base = ctypes.addressof(anchor)
        del anchor  # the export would keep the region from closing
        fd = os.memfd_create("socklab-payload", os.MFD_CLOEXEC)
        try:
            os.ftruncate(fd, len(tile))
            with mmap.mmap(fd, len(tile)) as writer:
                writer[:] = tile
            # MAP_POPULATE: page tables filled now, not by faults inside the timed send()
            # (without it the send cost about a third more CPU per byte, measured in the lab).
            flags = mmap.MAP_SHARED | _MAP_FIXED | getattr(mmap, "MAP_POPULATE", 0)
            for i in range(count):
                address = base + i * len(tile)
                if libc_mmap(address, len(tile), mmap.PROT_READ, flags, fd, 0) != address:
                    errno = ctypes.get_errno()
                    raise OSError(errno, f"mapping payload tile {i} of {count}: {os.strerror(errno)}")
        finally:
            os.close(fd)
    except BaseException:
        region.close()
        raise
    return region
