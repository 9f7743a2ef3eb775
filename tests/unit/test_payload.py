"""The client's payload: the same bytes as ``make_payload``, tiled where that is possible."""

from __future__ import annotations

import mmap
import socket
import threading
import weakref

import pytest

from socklab import payload as payload_module
from socklab.payload import MAX_MAPPINGS, MAX_TILE_BYTES, MIN_TILE_BYTES, Payload, tile_bytes
from socklab.workloads import make_payload

HELLO = b"Hello Python\n"


def _same_bytes(view: memoryview, expected: bytes, step: int = 1 << 20) -> bool:
    return len(view) == len(expected) and all(view[i:i + step] == expected[i:i + step]
                                              for i in range(0, len(expected), step))


def test_a_tile_holds_whole_patterns_over_whole_pages():
    tile = tile_bytes(13, 136_314_880, 4096)
    assert tile == 5 * 13 * 4096  # the lcm (13 pages), repeated to at least MIN_TILE_BYTES
    assert tile % 13 == 0 and tile % 4096 == 0 and tile >= MIN_TILE_BYTES
    assert tile_bytes(4096, 10 * MIN_TILE_BYTES, 4096) == MIN_TILE_BYTES
    assert tile_bytes(6, 10 * MIN_TILE_BYTES, 4096) % (3 * 4096) == 0


def test_a_tile_grows_to_keep_the_mappings_under_the_limit():
    payload_bytes = 4 * 2**30
    tile = tile_bytes(13, payload_bytes, 4096)
    assert -(-payload_bytes // tile) <= MAX_MAPPINGS and tile % (13 * 4096) == 0


@pytest.mark.parametrize(("pattern_bytes", "payload_bytes"), [
    (13, MIN_TILE_BYTES),                     # fits in one tile: nothing to repeat
    (13, 10),
    (MAX_TILE_BYTES // 4096 + 1, 1 << 30),    # odd and long: whole patterns over whole pages pass the cap
    (13, MAX_MAPPINGS * MAX_TILE_BYTES + 1),  # so many tiles they would pass the cap
])
def test_no_tile_where_it_would_not_help_or_not_fit(pattern_bytes, payload_bytes):
    assert tile_bytes(pattern_bytes, payload_bytes, 4096) is None


@pytest.mark.parametrize("pattern", [HELLO, b"x", b"0123456789abcdef", b"\x00\xff" * 2048, b"odd pattern 12345" * 7])
@pytest.mark.parametrize("extra", [0, 1, 4095, 4097])
def test_a_tiled_payload_is_the_pattern_repeated_to_the_exact_size(pattern, extra):
    nbytes = 2 * tile_bytes(len(pattern), 1 << 30) + extra  # whole tiles, then into one more
    with Payload(nbytes, pattern) as payload:
        assert payload.tiled
        assert payload.view.readonly and payload.view.contiguous and payload.view.format == "B"
        assert _same_bytes(payload.view, make_payload(nbytes, pattern))


def test_the_default_bulk_payload_is_tiled_and_the_same_bytes():
    nbytes = 136_314_880
    with Payload(nbytes, HELLO) as payload:
        assert payload.tiled and _same_bytes(payload.view, HELLO * (10 * 1024 * 1024))


def test_the_tiled_payload_cannot_be_written():
    with Payload(4 * MIN_TILE_BYTES, HELLO) as payload:
        with pytest.raises(TypeError):
            payload.view[0] = 0
        with pytest.raises(TypeError):
            payload.view[1:][0] = 0


def test_a_small_payload_is_plain_bytes():
    with Payload(1024, HELLO) as payload:
        assert not payload.tiled and payload.view.obj == make_payload(1024, HELLO)


def test_the_plain_bytes_when_the_tiles_cannot_be_mapped(monkeypatch):
    def refuse(tile: bytes, count: int) -> mmap.mmap:
        raise OSError(12, "Cannot allocate memory")  # vm.max_map_count reached, say

    monkeypatch.setattr(payload_module, "_map_tiles", refuse)
    nbytes = 4 * MIN_TILE_BYTES + 3
    with Payload(nbytes, HELLO) as payload:
        assert not payload.tiled and payload.view.obj == make_payload(nbytes, HELLO)


def test_close_unmaps_the_tiles_and_releases_the_view():
    payload = Payload(4 * MIN_TILE_BYTES, HELLO)
    region = payload._region
    payload.close()
    assert region.closed and not payload.tiled
    with pytest.raises(ValueError):
        payload.view[0]
    payload.close()  # again: nothing left to do


def test_a_slice_still_held_keeps_the_tiles_mapped_until_it_goes():
    payload = Payload(4 * MIN_TILE_BYTES, HELLO)
    region = weakref.ref(payload._region)
    piece = payload.view[13:26]
    payload.close()  # neither raises nor unmaps under the slice
    assert not region().closed and piece == HELLO
    del piece
    assert region() is None  # the mmap object went with the last slice, and unmapped its region


def test_one_send_of_the_tiled_payload_delivers_its_bytes():
    nbytes = 16 * MIN_TILE_BYTES + 5
    received = bytearray()

    def read_all(sock: socket.socket) -> None:
        while chunk := sock.recv(1 << 16):
            received.extend(chunk)

    sender, receiver = socket.socketpair()
    reader = threading.Thread(target=read_all, args=(receiver,))
    reader.start()
    try:
        with Payload(nbytes, HELLO) as payload:
            assert payload.tiled
            sender.sendall(payload.view)
            sender.shutdown(socket.SHUT_WR)
            reader.join(30)
    finally:
        sender.close()
        receiver.close()
    assert received == make_payload(nbytes, HELLO)
