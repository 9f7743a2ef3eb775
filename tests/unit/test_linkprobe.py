"""The link probe: expected paths by hand, and the responder and probe over real UDP on 127.0.0.1.

Loopback is not rate-limited, so a train arrives at the rate it was sent: the
measured rate equal to the offered one proves the pacing and the receiver's
arithmetic. What tbf does to a train is not tested here (no root, no tc); the
rate a real bottleneck passes was checked by hand in network namespaces.
"""

from __future__ import annotations

import json
import socket
import time

import pytest

from socklab import __main__ as socklab_main
from socklab import linkprobe as lp
from socklab.errors import UsageError
from socklab.results import find_results

SERVER_LINK = {"up": {"delay_ms": 2.0}, "down": {"loss_pct": 0.5}}


@pytest.fixture
def responder():
    r = lp.start_responder(0, lambda: SERVER_LINK, host="127.0.0.1")
    yield r
    r.stop()


# --- pure parts ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("client, server, oracle", [
    ({}, {}, {"rtt_ms": 0.0, "jitter_ms": 0.0, "up_rate_bps": None, "down_rate_bps": None, "loss_pct": 0.0}),
    # up path: client up (10M) + server down (5M) -> 5M; down path: server up (none) + client down (50M) -> 50M;
    # rtt 10 + 5 + 3 + 0 = 18; jitter 2; loss 1 - 0.99 * 0.98 = 2.98 %.
    ({"up": {"rate_bps": 10_000_000, "delay_ms": 10.0, "jitter_ms": 2.0, "loss_pct": 1.0},
      "down": {"rate_bps": 50_000_000, "delay_ms": 5.0}},
     {"up": {"delay_ms": 3.0, "loss_pct": 2.0}, "down": {"rate_bps": 5_000_000}},
     {"rtt_ms": 18.0, "jitter_ms": 2.0, "up_rate_bps": 5_000_000, "down_rate_bps": 50_000_000, "loss_pct": 2.98}),
    # Only the server shapes: its up is the client's down path, its down the client's up path.
    ({"up": {}, "down": {}}, {"up": {"rate_bps": 20_000_000, "delay_ms": 7.5, "jitter_ms": 1.5}, "down": {}},
     {"rtt_ms": 7.5, "jitter_ms": 1.5, "up_rate_bps": None, "down_rate_bps": 20_000_000, "loss_pct": 0.0}),
    # Four legs of 1 % loss: 1 - 0.99 ** 4 = 3.940399 %; rates: the slower of the two on each path.
    ({"up": {"rate_bps": 1_000_000, "loss_pct": 1.0}, "down": {"rate_bps": 2_000_000, "loss_pct": 1.0}},
     {"up": {"rate_bps": 3_000_000, "loss_pct": 1.0}, "down": {"rate_bps": 500_000, "loss_pct": 1.0}},
     {"rtt_ms": 0.0, "jitter_ms": 0.0, "up_rate_bps": 500_000, "down_rate_bps": 2_000_000, "loss_pct": 3.940399}),
    # A leg losing everything loses every round trip.
    ({"down": {"loss_pct": 100.0, "delay_ms": 1.0}}, {"up": {"delay_ms": 1.0}},
     {"rtt_ms": 2.0, "jitter_ms": 0.0, "up_rate_bps": None, "down_rate_bps": None, "loss_pct": 100.0}),
])
def test_expected_path(client, server, oracle):
    got = lp.expected_path(client, server)
    assert set(got) == set(oracle)
    for key, want in oracle.items():
        assert got[key] == (pytest.approx(want) if isinstance(want, float) else want), key


def test_train_duration_and_opening_burst():
    # 40 frames of 1242 bytes at 1 Mbit/s: 40 * 9936 / 1e6 s; faster links get the floor, slower the ceiling.
    assert lp.train_duration_s(1_000_000) == pytest.approx(0.39744)
    assert lp.train_duration_s(100_000_000) == lp.TRAIN_MIN_S
    assert lp.train_duration_s(10_000) == lp.TRAIN_MAX_S
    # The plan's bucket: 10 frames of 1514 B (15140 B) up to 30 Mbit/s, 4 ms of the rate above: in 1242-byte frames,
    # rounded up, plus two.
    assert lp.opening_burst_pkts(10_000_000) == 13 + 2
    assert lp.opening_burst_pkts(100_000_000) == 41 + 2


def test_receiver_rate_arithmetic():
    # 100 arrivals 1 ms apart: the first 10 are not timed; of the other 90, the first starts the clock, and the
    # 89 after it (1242 frame bytes each) arrive in 89 ms: 1242 * 8 / 1 ms = 9.936 Mbit/s.
    arrivals = [(i * 0.001, 1200, i) for i in range(100)]
    rate_bps, span_s = lp.receiver_rate(arrivals)
    assert rate_bps == pytest.approx(9_936_000)
    assert span_s == pytest.approx(0.089)
    # An opening burst of 30 arriving at once, then 60 at 1 ms: only the 60 are timed (59 in 59 ms).
    burst = [(0.0, 1200, i) for i in range(30)] + [(0.001 * (i - 29), 1200, i) for i in range(30, 90)]
    assert lp.receiver_rate(burst, burst_pkts=30)[0] == pytest.approx(9_936_000)
    assert lp.receiver_rate(burst)[0] > 10 * 9_936_000 / 9  # the burst read as the rate would inflate it
    assert lp.receiver_rate(arrivals[:4]) == (None, 0.0)
    assert lp.receiver_rate(burst[:34], burst_pkts=30)[0] is None  # four after the burst are too few


def test_parse_server():
    assert lp.parse_server("server:5000") == ("server", 5000)
    assert lp.parse_server("[::1]:5000") == ("::1", 5000)
    for bad in ("server", "server:", ":5000", "server:0", "server:70000", "server:http"):
        with pytest.raises(UsageError):
            lp.parse_server(bad)


def test_probe_is_a_role():
    assert socklab_main.ROLES["probe"] == "socklab.linkprobe"


# --- over loopback ------------------------------------------------------------------------------------------------


def test_round_trip_and_hello_on_loopback(responder):
    own = {"up": {}, "down": {"delay_ms": 1.0}}
    result = lp.measure_link("127.0.0.1", responder.port, own)
    assert result["error"] is None
    assert result["server"] == f"127.0.0.1:{responder.port}"
    assert result["server_applied"] == SERVER_LINK
    assert result["own_applied"] == own
    assert result["expected"] == lp.expected_path(own, SERVER_LINK)
    rtt = result["rtt_ms"]
    assert rtt["sent"] == rtt["received"] == 10
    assert 0 < rtt["min"] <= rtt["median"] <= rtt["max"]
    assert rtt["median"] < 5
    # No rate on the path: no trains, no grant asked for.
    assert result["up"] is None and result["down"] is None and result["rate_by"] is None
    assert 0 < result["probe_s"] < 2
    json.dumps(result)  # the result line must be JSON


def test_trains_on_loopback_measure_the_offered_rate(responder):
    rate_bps = 20_000_000
    own = {"up": {"rate_bps": rate_bps}, "down": {"rate_bps": rate_bps}}
    started = time.monotonic()
    result = lp.measure_link("127.0.0.1", responder.port, own)
    assert time.monotonic() - started < 3
    assert result["error"] is None
    assert result["rate_by"] == lp.RATE_BY_SELF
    for direction in ("up", "down"):
        train = result[direction]
        # Paced at 1.5 x the expected rate, and unlimited loopback passes all of it at that rate.
        assert 0.7 < train["offered_bps"] / (lp.TRAIN_RATE_FACTOR * rate_bps) < 1.3, train
        assert 0.7 < train["rate_bps"] / train["offered_bps"] < 1.3, train
        assert train["packets"] >= lp.MIN_TRAIN_PACKETS
        assert train["sent"] >= train["packets"] > 0.9 * train["sent"]
        assert 0.7 * lp.TRAIN_MIN_S < train["s"] < lp.TRAIN_MIN_S * 1.5


def test_group_trains_once(responder):
    own = {"up": {"rate_bps": 50_000_000}, "down": {}}
    first = lp.measure_link("127.0.0.1", responder.port, own, group="clients", pings=2)
    assert first["rate_by"] == lp.RATE_BY_SELF and first["up"] is not None and first["error"] is None
    second = lp.measure_link("127.0.0.1", responder.port, own, group="clients", pings=2)
    assert second["rate_by"] == lp.RATE_BY_GROUP
    assert second["up"] is None and second["down"] is None and second["error"] is None
    assert second["rtt_ms"]["received"] == 2
    other = lp.measure_link("127.0.0.1", responder.port, own, group="others", pings=2)
    assert other["rate_by"] == lp.RATE_BY_SELF
    # Without a group every probe trains.
    assert lp.measure_link("127.0.0.1", responder.port, own, pings=2)["rate_by"] == lp.RATE_BY_SELF


def _ask(sock: socket.socket, port: int, message: dict) -> dict:
    sock.sendto(json.dumps(message).encode(), ("127.0.0.1", port))
    while True:
        answer = json.loads(sock.recv(65535))
        if answer.get("token") == message["token"] and answer.get("op") == message["op"]:
            return answer


def test_trains_are_serialized(responder):
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.settimeout(1.0)
        assert _ask(sock, responder.port, {"op": "train", "token": 1, "group": None})["status"] == "granted"
        assert _ask(sock, responder.port, {"op": "train", "token": 2, "group": "b"})["status"] == "busy"
        # Asked again, the holder keeps its lease; a second replica of group b is told b is measured.
        assert _ask(sock, responder.port, {"op": "train", "token": 1, "group": None})["status"] == "granted"
        assert _ask(sock, responder.port, {"op": "train", "token": 3, "group": "b"})["status"] == "measured"
        # Only the holder may have a down train sent.
        assert _ask(sock, responder.port, {"op": "down", "token": 2, "train": 2, "rate_bps": 1e6,
                                           "duration_s": 0.3})["status"] == "refused"
        _ask(sock, responder.port, {"op": "done", "token": 1})
        assert _ask(sock, responder.port, {"op": "train", "token": 2, "group": "b"})["status"] == "granted"


def test_responder_survives_garbage(responder):
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        for junk in (b"", b"{", b"[1]", b'{"op": "hello"}', b'{"op": "down", "token": 5}', b"SLPT\x00", b"\xff" * 50):
            sock.sendto(junk, ("127.0.0.1", responder.port))
    result = lp.measure_link("127.0.0.1", responder.port, {}, pings=3)
    assert result["error"] is None and result["rtt_ms"]["received"] == 3


def test_responder_whose_link_is_unreadable():
    def broken():
        raise OSError("no state file")

    r = lp.start_responder(0, broken, host="127.0.0.1")
    try:
        result = lp.measure_link("127.0.0.1", r.port, {"up": {"delay_ms": 1.0}}, pings=2)
    finally:
        r.stop()
    assert result["error"] is None and result["server_applied"] is None
    assert result["expected"]["rtt_ms"] == 1.0


def _unused_udp_port() -> tuple[socket.socket, int]:
    """A bound socket that never answers (kept open so that nothing else takes the port) and its port."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind(("127.0.0.1", 0))
    return sock, sock.getsockname()[1]


def test_no_responder():
    silent, port = _unused_udp_port()
    with silent:
        started = time.monotonic()
        result = lp.measure_link("127.0.0.1", port, {"up": {"rate_bps": 10_000_000}})
        elapsed_s = time.monotonic() - started
    assert 2.5 < elapsed_s < 4
    assert result["error"] == f"no answer from the link probe responder at 127.0.0.1:{port} within 3 s"
    assert result["rtt_ms"] is None and result["server_applied"] is None
    assert result["up"] is None and result["rate_by"] is None
    assert result["expected"]["up_rate_bps"] == 10_000_000


def _state_file(tmp_path, applied):
    path = tmp_path / "link.json"
    path.write_text(json.dumps({"backend": "netem", "dev": "eth0", "ifb": "ifb0", "applied": applied}))
    return path


def test_probe_role(responder, tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("SOCKLAB_PROBE", raising=False)
    monkeypatch.delenv("SOCKLAB_PROBE_GROUP", raising=False)
    applied = {"up": {"delay_ms": 1.0}, "down": {}}
    state = _state_file(tmp_path, applied)
    assert lp.main(["--server", f"127.0.0.1:{responder.port}", "--state", str(state), "--group", "g"]) == 0
    (line,) = find_results(capsys.readouterr().out)
    assert line["role"] == "probe"
    assert line["own_applied"] == applied
    assert line["server_applied"] == SERVER_LINK
    assert line["expected"]["rtt_ms"] == pytest.approx(3.0)
    assert line["rtt_ms"]["received"] == 10 and line["error"] is None


def test_probe_role_reads_the_environment_and_exits_0_unanswered(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(lp, "HELLO_WAIT_S", 0.5)
    silent, port = _unused_udp_port()
    monkeypatch.setenv("SOCKLAB_PROBE", f"127.0.0.1:{port}")
    monkeypatch.setenv("SOCKLAB_LINK_STATE", str(tmp_path / "none-applied.json"))
    with silent:
        assert lp.main([]) == 0
    (line,) = find_results(capsys.readouterr().out)
    assert line["role"] == "probe" and line["rtt_ms"] is None
    assert line["own_applied"] == {"up": {}, "down": {}}
    assert "no answer from the link probe responder" in line["error"]


def test_probe_role_needs_a_server(monkeypatch):
    monkeypatch.delenv("SOCKLAB_PROBE", raising=False)
    with pytest.raises(UsageError):
        lp.main([])
