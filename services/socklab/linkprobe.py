"""Measure the shaped path between a client container and its server before the workload starts.

    python -m socklab probe --server HOST:PORT [--group NAME] [--state FILE]

The server runs a :class:`Responder` (a daemon thread on UDP, port = the server's
TCP port); a client runs :func:`measure_link` against it and prints one result
line: the round trip by a UDP ping-pong and, where a rate is set on the path,
the rate the bottleneck really passes, by a paced packet train sent above that
rate (tbf drops the excess; the arrivals at the receiver run at its rate).

UDP, not TCP: a TCP probe would leave ssthresh and RTT in the kernel's TCP
metrics cache for the server's address, and the workload's first connection
would start from them instead of from nothing.

Protocol (one UDP socket each side; control messages are small JSON objects,
train packets a binary header padded to PAYLOAD_BYTES; every message carries the
client's random token, so several clients can share one responder):

    hello {token}                        -> hello {applied}: the responder's link
    ping {token, id} (10 ms apart)       -> pong {id}
    train {token, group}                 -> train {status: granted | measured | busy}
    (up) train packets, then up_result {token, train, sent, burst_pkts, quiet_s}
                                         -> up_result {received, rate_bps, s}, once the last arrival is quiet_s old
    down {token, train, rate_bps, duration_s, payload_bytes, burst_pkts}
                                         -> down {status: started}, the train packets, down_done {sent, offered_bps}
    done {token}                         -> done: the next client may train
"""

from __future__ import annotations

import json
import logging
import math
import os
import secrets
import socket
import statistics
import struct
import threading
import time
from typing import Any, Callable, Mapping, Sequence

from .cli import ArgumentParser
from .errors import UsageError
from .results import emit_result
from .shaping.plan import burst_bytes

ENV_PROBE_RESPOND = "SOCKLAB_PROBE_RESPOND"  # server: UDP port to answer probes on
ENV_PROBE = "SOCKLAB_PROBE"  # client: "HOST:PORT" of the responder
# Client: its group's name. Replicas of a group have identical links, so only the
# first of them to ask runs the rate trains: N replicas training one after another
# would delay the last one's workload by N trains.
ENV_PROBE_GROUP = "SOCKLAB_PROBE_GROUP"

FRAME_OVERHEAD_BYTES = 42  # UDP 8 + IPv4 20 + Ethernet 14: what tbf counts on top of a datagram's payload

# Below the 1450-byte MTU of an overlay network with its 28 header bytes, so no
# train packet is ever fragmented.
PAYLOAD_BYTES = 1200
TRAIN_RATE_FACTOR = 1.5  # trains are sent this much above the expected rate, so the bottleneck is full
TRAIN_FRAMES = 40  # a train lasts as long as this many frames take at the expected rate ...
TRAIN_MIN_S = 0.3  # ... but at least this long (a fast link's 40 frames are over in a blink) ...
TRAIN_MAX_S = 2.0  # ... and at most this long (a slow link would keep the workload waiting)
TRAIN_SKIP_FRACTION = 0.1  # arrivals not timed, whatever else: tbf's bucket may be larger than the plan says
BURST_EXTRA_PKTS = 2  # the opening burst overfills the bucket by this much, so it surely ends empty
BURST_MAX_PKTS = 1000  # the bucket of a 2.4 Gbit/s link; a larger one is not emptied first (its 10 % still is)
MIN_TRAIN_PACKETS = 5  # fewer arrivals than this say nothing about a rate

HELLO_WAIT_S = 3.0  # the responder may start a moment after the client, and hello may be lost
HELLO_RESEND_S = 0.5
PING_INTERVAL_S = 0.01
PING_MIN_WAIT_S = 1.0
RESULT_WAIT_S = 5.0  # for the up train's count, asked again every RESULT_RESEND_S
RESULT_RESEND_S = 0.3  # the ask queues behind the train and a full queue may drop it
UP_QUIET_S = 0.05  # the responder counts a train once its last arrival is this old (plus two frames' time)
QUIET_MAX_S = 10.0  # a 10 kbit/s link's frames are a second apart
DOWN_SILENCE_S = 0.1  # the client stops listening to a down train after this much silence (+ rtt, two frames)
BUSY_RETRY_S = 0.2  # a busy responder (another client's trains) is asked again this often ...
BUSY_WAIT_S = 30.0  # ... for at most this long
LEASE_S = 20.0  # a client that vanished mid-train frees the responder after this long without a word
PACE_BATCH_S = 0.0005  # the sender sleeps only when the next packet is this far ahead: batches, not per packet
RECV_BUFFER_BYTES = 4 << 20  # a train arriving at 150 Mbit/s must not overflow the default 208 KiB

RATE_BY_SELF = "this container"
RATE_BY_GROUP = "another container of the group"

# Train packets: magic, token, train number, sequence number; zero padding to the payload size.
_TRAIN_MAGIC = b"SLPT"
_TRAIN_HEADER = struct.Struct("!4sQII")
_UP_TRAIN, _DOWN_TRAIN = 1, 2
_DATAGRAM_MAX_BYTES = 65535

log = logging.getLogger("socklab.linkprobe")


# --- what the shaping says the path should be ---------------------------------------------------------------------


def _leg(applied: Mapping[str, Any] | None, direction: str) -> Mapping[str, Any]:
    return ((applied or {}).get(direction)) or {}


def path_legs(client_applied: Mapping[str, Any], server_applied: Mapping[str, Any]) -> dict[str, tuple]:
    """The two legs each direction of the path crosses (pure): client -> server ("up") passes the
    client's up and the server's down; server -> client ("down") the server's up and the client's down."""
    return {"up": (_leg(client_applied, "up"), _leg(server_applied, "down")),
            "down": (_leg(server_applied, "up"), _leg(client_applied, "down"))}


def legs_total(legs: Sequence[Mapping[str, Any]], name: str) -> float:
    """What ``legs`` add up to in ``name`` ("delay_ms" or "jitter_ms")."""
    return round(sum(float(leg.get(name) or 0) for leg in legs), 6)


def legs_min_rate_bps(legs: Sequence[Mapping[str, Any]]) -> int | None:
    """The slowest rate set on ``legs``, or None if none is."""
    rates = [leg["rate_bps"] for leg in legs if leg.get("rate_bps") is not None]
    return min(rates) if rates else None


def legs_loss_pct(legs: Sequence[Mapping[str, Any]]) -> float:
    """The chance that a packet crossing every one of ``legs`` is lost by one of them."""
    survive = math.prod(1 - float(leg.get("loss_pct") or 0) / 100 for leg in legs)
    # Rounded so that 1% each way reads 1.99, not 1.9900000000000029.
    return round((1 - survive) * 100, 9)


def expected_path(client_applied: Mapping[str, Any], server_applied: Mapping[str, Any]) -> dict[str, Any]:
    """What the two containers' shaping makes of the path between them (pure).

    Returns {"rtt_ms": the four delays (path_legs), "jitter_ms": the four
    jitters, "up_rate_bps", "down_rate_bps": the slowest rate set on that path
    or None, "loss_pct": the chance that a round trip loses its packet or its
    answer}.
    """
    paths = path_legs(client_applied, server_applied)
    legs = paths["up"] + paths["down"]
    return {
        "rtt_ms": legs_total(legs, "delay_ms"),
        "jitter_ms": legs_total(legs, "jitter_ms"),
        "up_rate_bps": legs_min_rate_bps(paths["up"]),
        "down_rate_bps": legs_min_rate_bps(paths["down"]),
        "loss_pct": legs_loss_pct(legs),
    }


def train_duration_s(rate_bps: float, payload_bytes: int = PAYLOAD_BYTES) -> float:
    """How long a train for a path of ``rate_bps`` lasts: TRAIN_FRAMES frames' time, within the bounds."""
    frames_s = TRAIN_FRAMES * (payload_bytes + FRAME_OVERHEAD_BYTES) * 8 / rate_bps
    return min(TRAIN_MAX_S, max(TRAIN_MIN_S, frames_s))


def opening_burst_pkts(rate_bps: int, payload_bytes: int = PAYLOAD_BYTES) -> int:
    """Packets a train opens with, unpaced: enough to empty the bucket of the lab's tbf at ``rate_bps``.

    A full bucket passes a train sent at 1.5 x the rate unchanged until the
    tokens run out, and with 1.5 x it drains at only half the rate: three
    buckets' worth (36 packets at 10 Mbit/s and below, where the bucket is 10
    frames) would arrive too fast, most of a slow link's train. Sent at once,
    one bucket's worth passes, the rest waits in the queue, and every packet
    after it arrives at the rate. The receiver leaves these out by number.
    """
    frame_bytes = payload_bytes + FRAME_OVERHEAD_BYTES
    return min(BURST_MAX_PKTS, math.ceil(burst_bytes(rate_bps) / frame_bytes) + BURST_EXTRA_PKTS)


def _frame_s(rate_bps: float, payload_bytes: int = PAYLOAD_BYTES) -> float:
    """Seconds one train frame takes at ``rate_bps``: gaps shorter than a few of these are not the train's end."""
    return (payload_bytes + FRAME_OVERHEAD_BYTES) * 8 / rate_bps


def receiver_rate(arrivals: Sequence[tuple[float, int, int]], burst_pkts: int = 0) -> tuple[float | None, float]:
    """(rate_bps or None, seconds timed) of a train from its (arrival time s, payload bytes, sequence number)
    in arrival order; ``burst_pkts`` is the opening burst's size (numbers below it are not timed).

    Neither are the first TRAIN_SKIP_FRACTION of the arrivals: in case tbf's
    bucket is larger than the burst emptied. The first timed arrival starts the
    clock, so its own bytes (which arrived before it) are not counted:
    rate = bytes of the later ones / time since it. Frames are counted as tbf
    counts them, with FRAME_OVERHEAD_BYTES each. None for fewer than
    MIN_TRAIN_PACKETS timed arrivals.
    """
    skip = int(len(arrivals) * TRAIN_SKIP_FRACTION)
    timed = [arrival for index, arrival in enumerate(arrivals) if index >= skip and arrival[2] >= burst_pkts]
    if len(timed) < MIN_TRAIN_PACKETS:
        return None, 0.0
    span_s = timed[-1][0] - timed[0][0]
    if len(timed) < 2 or span_s <= 0:
        return None, max(span_s, 0.0)
    bits = sum(size + FRAME_OVERHEAD_BYTES for _, size, _ in timed[1:]) * 8
    return bits / span_s, span_s


def _send_train(
    sock: socket.socket,
    addr: Any,
    token: int,
    train: int,
    offered_bps: float,
    duration_s: float,
    payload_bytes: int,
    burst_pkts: int,
    clock: Callable[[], float],
    stopped: Callable[[], bool] = lambda: False,
) -> tuple[int, float | None]:
    """Send a train: ``burst_pkts`` at once (see opening_burst_pkts), then packets paced at ``offered_bps``
    (frame bits) for ``duration_s``. Returns (packets sent, offered_bps the paced part achieved).

    Due times are absolute, so a late wake-up is made good by the next batch;
    sleeping only when a batch is due lets Python keep 1.5 x 100 Mbit/s (a
    packet every 66 us, far below what one sleep costs).
    """
    frame_bits = (payload_bytes + FRAME_OVERHEAD_BYTES) * 8
    interval_s = frame_bits / offered_bps
    paced = max(2, round(duration_s / interval_s))
    packet = bytearray(payload_bytes)
    start_s = clock()
    # A sender blocked by a full send buffer (a tbf queue on its own link) stops at
    # twice the planned time rather than keep the workload waiting.
    give_up_s = start_s + 2 * duration_s + 0.5
    sent = paced_sent = 0
    first_paced_s = last_s = 0.0
    for seq in range(burst_pkts + paced):
        if seq >= burst_pkts:
            ahead_s = start_s + (seq - burst_pkts) * interval_s - clock()
            if ahead_s > PACE_BATCH_S:
                time.sleep(ahead_s)
            elif ahead_s < 0 and clock() > give_up_s:
                break
        if stopped():
            break
        _TRAIN_HEADER.pack_into(packet, 0, _TRAIN_MAGIC, token, train, seq)
        try:
            sock.sendto(packet, addr)
        except OSError:  # ENOBUFS, a full buffer past the timeout: that packet is simply not sent
            continue
        sent += 1
        if seq >= burst_pkts:
            last_s = clock()
            if paced_sent == 0:
                first_paced_s = last_s
            paced_sent += 1
    achieved = (paced_sent - 1) * frame_bits / (last_s - first_paced_s) if last_s > first_paced_s else None
    return sent, achieved


def _train_header(data: bytes) -> tuple[int, int, int] | None:
    """(token, train, sequence number) of a train packet, or None for anything else."""
    if len(data) < _TRAIN_HEADER.size or not data.startswith(_TRAIN_MAGIC):
        return None
    _, token, train, seq = _TRAIN_HEADER.unpack_from(data)
    return token, train, seq


def _encode(message: Mapping[str, Any]) -> bytes:
    return json.dumps(message, separators=(",", ":")).encode()


def _decode(data: bytes) -> dict[str, Any] | None:
    if not data.startswith(b"{"):
        return None
    try:
        message = json.loads(data)
    except ValueError:
        return None
    return message if isinstance(message, dict) else None


def _grow_receive_buffer(sock: socket.socket) -> None:
    # The kernel caps this at net.core.rmem_max; whatever it grants helps.
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, RECV_BUFFER_BYTES)
    except OSError:
        pass


# --- the server's side --------------------------------------------------------------------------------------------


class Responder:
    """Answers link probes on a UDP socket from a daemon thread (see the module's protocol).

    Trains are serialized: one client at a time holds the responder's lease
    (granted by "train", given back by "done", lapsing after LEASE_S without a
    word); the others hear "busy" and ask again. A group is granted once for the
    responder's life, to the first client of it that asks: start a new responder
    for a new case if the container is kept between cases.
    """

    def __init__(self, sock: socket.socket, applied: Callable[[], Mapping[str, Any]]):
        self._sock = sock
        self._applied = applied
        self.port: int = sock.getsockname()[1]
        self._stop = threading.Event()
        self._senders: list[threading.Thread] = []
        # Everything below is touched by the serving thread only (senders only send).
        self._holder: int | None = None
        self._lease_until_s = 0.0
        self._groups: dict[str, int] = {}
        self._arrivals: dict[tuple[int, int], list[tuple[float, int, int]]] = {}
        self._pending: dict[tuple[int, int], dict[str, Any]] = {}
        self._results: dict[tuple[int, int], dict[str, Any]] = {}
        self._down_started: set[tuple[int, int]] = set()
        self._thread = threading.Thread(target=self._serve, name="socklab-probe-responder", daemon=True)

    def start(self) -> "Responder":
        """Start serving (start_responder does)."""
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop serving and close the socket; a train being sent stops too."""
        self._stop.set()
        self._thread.join(timeout=2.0)
        for sender in self._senders:
            sender.join(timeout=2.0)
        self._sock.close()

    def __enter__(self) -> "Responder":
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def _serve(self) -> None:
        # A short timeout: the stop flag is seen, and a count waiting for its
        # train to go quiet is answered on time even when nothing arrives.
        self._sock.settimeout(0.02)
        while not self._stop.is_set():
            try:
                data, addr = self._sock.recvfrom(_DATAGRAM_MAX_BYTES)
            except socket.timeout:
                data, addr = None, None
            except OSError as exc:
                if self._stop.is_set():
                    break
                log.debug("probe responder: %s", exc)
                continue
            now_s = time.monotonic()
            if data is not None:
                try:
                    self._receive(data, addr, now_s)
                except Exception:  # a malformed message must not end the responder
                    log.debug("probe responder: bad message from %s", addr, exc_info=True)
            if self._pending:
                self._answer_quiet_counts(now_s)

    def _receive(self, data: bytes, addr: Any, now_s: float) -> None:
        header = _train_header(data)
        if header is not None:
            token, train, seq = header
            # Only the lease holder's packets are kept: nothing else can grow the lists.
            if token == self._holder and (token, train) not in self._results:
                self._arrivals.setdefault((token, train), []).append((now_s, len(data), seq))
            return
        message = _decode(data)
        if message is None or not isinstance(message.get("token"), int):
            return
        op, token = message.get("op"), message["token"]
        reply: dict[str, Any] | None = None
        if op == "hello":
            reply = {"op": "hello", "token": token, "v": 1, "applied": self._applied_now()}
        elif op == "ping":
            reply = {"op": "pong", "token": token, "id": message.get("id")}
        elif op == "train":
            reply = {"op": "train", "token": token, "status": self._grant(token, message.get("group"), now_s)}
        elif op == "done":
            if self._holder == token:
                self._holder = None
            reply = {"op": "done", "token": token}
        elif op == "up_result":
            self._ask_count(token, message, addr, now_s)
        elif op == "down":
            self._start_down(token, message, addr, now_s)
        if reply is not None:
            self._reply(reply, addr)

    def _reply(self, message: Mapping[str, Any], addr: Any) -> None:
        try:
            self._sock.sendto(_encode(message), addr)
        except OSError as exc:  # the client's problem, not the responder's
            log.debug("probe responder: reply to %s: %s", addr, exc)

    def _applied_now(self) -> Mapping[str, Any] | None:
        try:
            return dict(self._applied())
        except Exception as exc:  # a missing state file must not silence the responder
            log.debug("probe responder: applied link: %s", exc)
            return None

    def _holds(self, token: int, now_s: float) -> bool:
        """Whether ``token`` holds the lease; a holder's every word renews it."""
        if self._holder == token and now_s < self._lease_until_s:
            self._lease_until_s = now_s + LEASE_S
            return True
        return False

    def _grant(self, token: int, group: Any, now_s: float) -> str:
        if group is not None:
            owner = self._groups.setdefault(str(group), token)
            if owner != token:
                return "measured"
        if self._holds(token, now_s):
            return "granted"
        if self._holder is not None and now_s < self._lease_until_s:
            return "busy"
        # A new holder: what the last one left is of no more use.
        self._arrivals.clear()
        self._pending.clear()
        self._results.clear()
        self._down_started.clear()
        self._holder, self._lease_until_s = token, now_s + LEASE_S
        return "granted"

    def _ask_count(self, token: int, message: Mapping[str, Any], addr: Any, now_s: float) -> None:
        key = (token, int(message.get("train", 0)))
        if not self._holds(token, now_s):
            self._reply({"op": "up_result", "token": token, "train": key[1], "error": "no lease"}, addr)
        elif key in self._results:
            self._reply(self._results[key], addr)  # the answer to an ask that was lost
        else:
            quiet_s = min(QUIET_MAX_S, max(UP_QUIET_S, float(message.get("quiet_s") or 0)))
            pending = self._pending.setdefault(key, {"since_s": now_s})
            pending.update(addr=addr, quiet_s=quiet_s, burst_pkts=_burst_from(message))
            self._answer_quiet_counts(now_s)

    def _answer_quiet_counts(self, now_s: float) -> None:
        for key, pending in list(self._pending.items()):
            arrivals = self._arrivals.get(key, [])
            # With nothing arrived, the first ask starts the wait: all may have been lost.
            last_s = arrivals[-1][0] if arrivals else pending["since_s"]
            if now_s - last_s < pending["quiet_s"]:
                continue
            rate_bps, span_s = receiver_rate(arrivals, pending["burst_pkts"])
            result = {"op": "up_result", "token": key[0], "train": key[1], "received": len(arrivals),
                      "rate_bps": rate_bps, "s": span_s}
            self._results[key] = result
            self._arrivals.pop(key, None)
            del self._pending[key]
            self._reply(result, pending["addr"])

    def _start_down(self, token: int, message: Mapping[str, Any], addr: Any, now_s: float) -> None:
        train = int(message.get("train", 0))
        answer = {"op": "down", "token": token, "train": train}
        if not self._holds(token, now_s):
            self._reply({**answer, "status": "refused"}, addr)
            return
        if (token, train) in self._down_started:  # a repeated ask (its "started" was lost) hears it again
            self._reply({**answer, "status": "started"}, addr)
            return
        rate_bps = float(message["rate_bps"])
        duration_s = min(TRAIN_MAX_S, max(0.0, float(message["duration_s"])))
        payload_bytes = min(1400, max(_TRAIN_HEADER.size, int(message.get("payload_bytes") or PAYLOAD_BYTES)))
        if not (rate_bps > 0 and math.isfinite(rate_bps)):
            self._reply({**answer, "status": "refused"}, addr)
            return
        self._down_started.add((token, train))
        # "started" goes out before the first train packet, so it does not queue behind the train.
        self._reply({**answer, "status": "started"}, addr)
        sender = threading.Thread(target=self._send_down, name="socklab-probe-train", daemon=True,
                                  args=(addr, token, train, rate_bps, duration_s, payload_bytes, _burst_from(message)))
        self._senders = [s for s in self._senders if s.is_alive()] + [sender]
        sender.start()

    def _send_down(self, addr: Any, token: int, train: int, rate_bps: float, duration_s: float,
                   payload_bytes: int, burst_pkts: int) -> None:
        sent, offered_bps = _send_train(self._sock, addr, token, train, rate_bps, duration_s, payload_bytes,
                                        burst_pkts, time.monotonic, self._stop.is_set)
        # Queued behind the train, so it arrives last (unless lost: the client also stops on silence).
        self._reply({"op": "down_done", "token": token, "train": train, "sent": sent, "offered_bps": offered_bps},
                    addr)


def _burst_from(message: Mapping[str, Any]) -> int:
    return min(BURST_MAX_PKTS, max(0, int(message.get("burst_pkts") or 0)))


def start_responder(port: int, applied: Callable[[], Mapping[str, Any]], host: str = "0.0.0.0") -> Responder:
    """Answer link probes on UDP ``host``:``port`` from a daemon thread; its Responder (``.port``, ``.stop()``).

    ``applied()`` is this container's applied link ({"up": {...}, "down": {...}}),
    read again for every hello, so a link changed since is reported as it is.
    The socket is bound before this returns: a port in use raises OSError here.
    """
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_DGRAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        _grow_receive_buffer(sock)
        sock.bind((host, port))
    except OSError:
        sock.close()
        raise
    return Responder(sock, applied).start()


# --- the client's side --------------------------------------------------------------------------------------------


class _Probe:
    """One client's conversation with a responder: a socket, the responder's address and a token."""

    def __init__(self, host: str, port: int, clock: Callable[[], float]):
        self.host, self.port, self.clock = host, port, clock
        self.token = secrets.randbits(63)
        self.sock: socket.socket | None = None
        self.addr: Any = None

    def close(self) -> None:
        if self.sock is not None:
            self.sock.close()

    def _open(self) -> None:
        """Resolve the responder's name and open the socket; socket.gaierror if the name is not known (yet)."""
        infos = socket.getaddrinfo(self.host, self.port, type=socket.SOCK_DGRAM)
        # IPv4 first: the frame overhead the rates count is IPv4's.
        family, _, _, _, addr = sorted(infos, key=lambda info: info[0] != socket.AF_INET)[0]
        # Not connected: a reply from another source address (a service's virtual
        # IP answered by its task) must still be heard; the token picks ours out.
        sock = socket.socket(family, socket.SOCK_DGRAM)
        _grow_receive_buffer(sock)
        self.sock, self.addr = sock, addr

    def send(self, message: Mapping[str, Any]) -> None:
        assert self.sock is not None
        try:
            self.sock.sendto(_encode({**message, "token": self.token}), self.addr)
        except OSError as exc:  # unreachable for now, a full buffer: the retries see to it
            log.debug("probe: send to %s: %s", self.addr, exc)

    def receive(self, until_s: float) -> tuple[bytes, float] | None:
        """The next datagram and its arrival time, or None once ``until_s`` (clock) has passed."""
        assert self.sock is not None
        while True:
            left_s = until_s - self.clock()
            if left_s <= 0:
                return None
            self.sock.settimeout(left_s)
            try:
                data, _ = self.sock.recvfrom(_DATAGRAM_MAX_BYTES)
            except socket.timeout:
                return None
            except OSError as exc:  # an ICMP error reported late: keep listening
                log.debug("probe: receive: %s", exc)
                continue
            return data, self.clock()

    def message(self, until_s: float) -> tuple[dict[str, Any], float] | None:
        """The next control message for this token (train packets are skipped), or None at ``until_s``."""
        while (got := self.receive(until_s)) is not None:
            message = _decode(got[0])
            if message is not None and message.get("token") == self.token:
                return message, got[1]
        return None

    def request(self, message: Mapping[str, Any], match: Callable[[dict[str, Any]], bool], wait_s: float,
                resend_s: float) -> dict[str, Any] | None:
        """Send ``message`` every ``resend_s`` until an answer ``match`` accepts; None after ``wait_s``."""
        deadline_s = self.clock() + wait_s
        while self.clock() < deadline_s:
            self.send(message)
            until_s = min(deadline_s, self.clock() + resend_s)
            while (got := self.message(until_s)) is not None:
                if match(got[0]):
                    return got[0]
        return None

    def hello(self, wait_s: float) -> tuple[dict[str, Any] | None, str | None]:
        """(the hello answer, None) or (None, why not) within ``wait_s``."""
        deadline_s = self.clock() + wait_s
        resolve_error = None
        while self.sock is None:
            try:
                self._open()
            except (socket.gaierror, UnicodeError) as exc:
                # A container's name may not resolve until its container is up.
                resolve_error = exc
                if self.clock() + BUSY_RETRY_S >= deadline_s:
                    return None, (f"cannot resolve {self.host!r} for the link probe within "
                                  f"{wait_s:g} s ({resolve_error})")
                time.sleep(BUSY_RETRY_S)
        answer = self.request({"op": "hello"}, lambda m: m.get("op") == "hello", deadline_s - self.clock(),
                              HELLO_RESEND_S)
        if answer is None:
            return None, f"no answer from the link probe responder at {self.host}:{self.port} within {wait_s:g} s"
        return answer, None

    def ping(self, count: int, expected_rtt_s: float) -> dict[str, Any] | None:
        """Send ``count`` pings PING_INTERVAL_S apart, reading answers meanwhile: the rtt summary, None if none came."""
        sent_at_s: dict[int, float] = {}
        rtts_ms: dict[int, float] = {}
        start_s = self.clock()
        wait_s = max(PING_MIN_WAIT_S, 3 * expected_rtt_s + 0.5)
        next_id = 0
        while True:
            if next_id < count and self.clock() >= start_s + next_id * PING_INTERVAL_S:
                sent_at_s[next_id] = self.clock()
                self.send({"op": "ping", "id": next_id})
                next_id += 1
                continue
            if len(rtts_ms) == count:
                break
            # Between pings, listen until the next is due: an answer read late would read as a longer rtt.
            until_s = start_s + next_id * PING_INTERVAL_S if next_id < count else sent_at_s[count - 1] + wait_s
            got = self.message(until_s)
            if got is None:
                if next_id < count:
                    continue
                break
            message, arrived_s = got
            ping_id = message.get("id")
            if message.get("op") == "pong" and ping_id in sent_at_s and ping_id not in rtts_ms:
                rtts_ms[ping_id] = (arrived_s - sent_at_s[ping_id]) * 1000
        if not rtts_ms:
            return None
        values = list(rtts_ms.values())
        return {"median": round(statistics.median(values), 3), "min": round(min(values), 3),
                "max": round(max(values), 3), "sent": count, "received": len(values)}

    def ask_trains(self, group: str | None, expected_rtt_s: float) -> tuple[str | None, str | None]:
        """("granted" | "measured", None), or (None, why not): waits while the responder trains another client."""
        give_up_s = self.clock() + BUSY_WAIT_S
        while True:
            answer = self.request({"op": "train", "group": group},
                                  lambda m: m.get("op") == "train", HELLO_WAIT_S + expected_rtt_s,
                                  max(HELLO_RESEND_S, 2 * expected_rtt_s + 0.2))
            if answer is None:
                return None, "the link probe responder stopped answering before the rate trains"
            if answer.get("status") in ("granted", "measured"):
                return answer["status"], None
            if self.clock() + BUSY_RETRY_S > give_up_s:
                return None, f"the link probe responder was busy with other clients' trains for {BUSY_WAIT_S:g} s"
            time.sleep(BUSY_RETRY_S)

    def done(self, expected_rtt_s: float) -> None:
        """Give the lease back (else the next client waits until it lapses)."""
        self.request({"op": "done"}, lambda m: m.get("op") == "done", 1.0 + expected_rtt_s,
                     max(0.25, 2 * expected_rtt_s + 0.1))

    def up_train(self, rate_bps: int, expected: Mapping[str, Any]) -> tuple[dict[str, Any] | None, str | None]:
        """Send a train to the responder and ask what arrived: (the up result, None or why it lacks a rate)."""
        assert self.sock is not None
        offered_bps = TRAIN_RATE_FACTOR * rate_bps
        duration_s = train_duration_s(rate_bps)
        expected_rtt_s = (expected["rtt_ms"] + expected["jitter_ms"]) / 1000
        # Sends block at most this long on a buffer filled by this container's own tbf queue.
        self.sock.settimeout(0.1)
        burst_pkts = opening_burst_pkts(rate_bps)
        sent, achieved_bps = _send_train(self.sock, self.addr, self.token, _UP_TRAIN, offered_bps, duration_s,
                                         PAYLOAD_BYTES, burst_pkts, self.clock)
        # Jitter can hold a packet back past the others, and on a slow link the
        # frames themselves are far apart: the responder waits that much longer for quiet.
        quiet_s = UP_QUIET_S + expected["jitter_ms"] / 1000 + 2 * _frame_s(rate_bps)
        ask = {"op": "up_result", "train": _UP_TRAIN, "sent": sent, "burst_pkts": burst_pkts, "quiet_s": quiet_s}
        # The queue may still be draining: at most every packet sent at the rate.
        drain_s = min(RESULT_WAIT_S * 10, sent * _frame_s(rate_bps))
        answer = self.request(ask, lambda m: m.get("op") == "up_result" and m.get("train") == _UP_TRAIN,
                              RESULT_WAIT_S + expected_rtt_s + quiet_s + drain_s, RESULT_RESEND_S)
        if answer is None:
            return None, f"the link probe responder did not report the up train's arrivals within {RESULT_WAIT_S:g} s"
        if answer.get("error"):
            return None, f"the link probe responder refused the up train's count ({answer['error']})"
        result = _train_result(achieved_bps or offered_bps, answer.get("rate_bps"), answer.get("received", 0),
                               answer.get("s", 0.0), sent)
        return result, _too_few("up", result)

    def down_train(self, rate_bps: int, expected: Mapping[str, Any]) -> tuple[dict[str, Any] | None, str | None]:
        """Have the responder send a train here and time its arrivals: (the down result, None or why no rate)."""
        offered_bps = TRAIN_RATE_FACTOR * rate_bps
        duration_s = train_duration_s(rate_bps)
        expected_rtt_s = (expected["rtt_ms"] + expected["jitter_ms"]) / 1000
        silence_s = DOWN_SILENCE_S + expected_rtt_s + expected["jitter_ms"] / 1000 + 2 * _frame_s(rate_bps)
        resend_s = max(HELLO_RESEND_S, 2 * expected_rtt_s + 0.3)
        burst_pkts = opening_burst_pkts(rate_bps)
        ask = {"op": "down", "train": _DOWN_TRAIN, "rate_bps": offered_bps, "duration_s": duration_s,
               "payload_bytes": PAYLOAD_BYTES, "burst_pkts": burst_pkts}
        arrivals: list[tuple[float, int, int]] = []
        started_s: float | None = None
        done: dict[str, Any] = {}
        asks = 0
        # The queue drains after the train: at most every packet at the rate.
        drain_s = min(RESULT_WAIT_S * 10, (burst_pkts + duration_s / _frame_s(offered_bps)) * _frame_s(rate_bps))
        give_up_s = self.clock() + duration_s + RESULT_WAIT_S + expected_rtt_s + silence_s + drain_s
        while True:
            now_s = self.clock()
            if arrivals:
                until_s = arrivals[-1][0] + silence_s
            elif started_s is not None:  # started, nothing yet: the whole train may be lost
                until_s = started_s + duration_s + silence_s
            elif asks < 4:
                self.send(ask)
                asks += 1
                until_s = now_s + resend_s
            else:
                return None, "the link probe responder did not start the down train"
            until_s = min(until_s, give_up_s)
            got = self.receive(until_s)
            if got is None:
                if arrivals or started_s is not None or self.clock() >= give_up_s:
                    break
                continue
            data, arrived_s = got
            header = _train_header(data)
            if header is not None:
                if header[:2] == (self.token, _DOWN_TRAIN):
                    arrivals.append((arrived_s, len(data), header[2]))
                continue
            message = _decode(data)
            if message is None or message.get("token") != self.token or message.get("train") != _DOWN_TRAIN:
                continue
            if message.get("op") == "down" and message.get("status") == "started":
                started_s = started_s if started_s is not None else arrived_s
            elif message.get("op") == "down":
                return None, f"the link probe responder refused the down train ({message.get('status')})"
            elif message.get("op") == "down_done":
                done = message
        rate, span_s = receiver_rate(arrivals, burst_pkts)
        result = _train_result(done.get("offered_bps") or offered_bps, rate, len(arrivals), span_s, done.get("sent"))
        return result, _too_few("down", result)


def _train_result(offered_bps: float, rate_bps: float | None, packets: int, span_s: float,
                  sent: int | None) -> dict[str, Any]:
    """One direction's entry: "packets" arrived, "s" seconds between the first and last timed arrival."""
    return {"offered_bps": round(float(offered_bps), 1),
            "rate_bps": round(float(rate_bps), 1) if rate_bps is not None else None,
            "packets": int(packets), "s": round(float(span_s), 6), "sent": sent}


def _too_few(direction: str, result: Mapping[str, Any]) -> str | None:
    if result["rate_bps"] is not None:
        return None
    of = f" of {result['sent']}" if result.get("sent") is not None else ""
    return (f"the {direction} train measured no rate: {result['packets']}{of} packets arrived, fewer than "
            f"{MIN_TRAIN_PACKETS} of them after its opening burst and first {TRAIN_SKIP_FRACTION:.0%}")


def measure_link(
    host: str,
    port: int,
    own_applied: Mapping[str, Any],
    *,
    group: str | None = None,
    pings: int = 10,
    clock: Callable[[], float] = time.monotonic,
) -> dict[str, Any]:
    """Probe the path to the responder at ``host``:``port``; never raises for network trouble.

    Round trip by ``pings`` UDP pings; where the shaping of either end sets a
    rate on a direction, that direction's rate by a train sent TRAIN_RATE_FACTOR
    above it, if the responder grants ``group`` (the first of a group to ask
    trains, the others report rate_by "another container of the group"; with
    group None always). Returns {"server", "probe_s", "rtt_ms", "server_applied",
    "own_applied", "expected", "up", "down", "rate_by", "error"}; "error" is
    None or one sentence saying what could not be measured and why.
    """
    start_s = clock()
    own = {direction: dict(_leg(own_applied, direction)) for direction in ("up", "down")}
    result: dict[str, Any] = {
        "server": f"[{host}]:{port}" if ":" in host else f"{host}:{port}",
        "probe_s": 0.0, "rtt_ms": None, "server_applied": None, "own_applied": own,
        "expected": expected_path(own, {}), "up": None, "down": None, "rate_by": None, "error": None,
    }
    errors: list[str] = []
    probe = _Probe(host, port, clock)
    try:
        own_rtt_s = sum(float(own[d].get("delay_ms") or 0) + float(own[d].get("jitter_ms") or 0) for d in own) / 1000
        answer, error = probe.hello(HELLO_WAIT_S + 2 * own_rtt_s)
        if answer is None:
            errors.append(error or "no answer from the link probe responder")
        else:
            server_applied = answer.get("applied")
            result["server_applied"] = server_applied
            expected = result["expected"] = expected_path(own, server_applied or {})
            expected_rtt_s = (expected["rtt_ms"] + expected["jitter_ms"]) / 1000
            if pings > 0:
                result["rtt_ms"] = probe.ping(pings, expected_rtt_s)
                if result["rtt_ms"] is None:
                    errors.append(f"none of the {pings} pings to the link probe responder was answered")
            _measure_rates(probe, result, expected, group, errors)
    except OSError as exc:  # whatever the network does, the workload still runs: say it, do not raise
        errors.append(f"the link probe failed: {exc}")
    finally:
        probe.close()
    result["probe_s"] = round(clock() - start_s, 6)
    result["error"] = "; ".join(errors) if errors else None
    return result


def _measure_rates(probe: _Probe, result: dict[str, Any], expected: Mapping[str, Any], group: str | None,
                   errors: list[str]) -> None:
    """Run the trains the expected rates call for, if the responder grants them; fills result's up/down/rate_by."""
    if expected["up_rate_bps"] is None and expected["down_rate_bps"] is None:
        return
    expected_rtt_s = (expected["rtt_ms"] + expected["jitter_ms"]) / 1000
    status, error = probe.ask_trains(group, expected_rtt_s)
    if status == "measured":
        result["rate_by"] = RATE_BY_GROUP
        return
    if status != "granted":
        errors.append(error or "the link probe responder did not grant the rate trains")
        return
    result["rate_by"] = RATE_BY_SELF
    try:
        for direction, run in (("up", probe.up_train), ("down", probe.down_train)):
            rate_bps = expected[f"{direction}_rate_bps"]
            if rate_bps is None:
                continue
            result[direction], error = run(rate_bps, expected)
            if error:
                errors.append(error)
    finally:
        probe.done(expected_rtt_s)


# --- the probe role -----------------------------------------------------------------------------------------------


def parse_server(text: str) -> tuple[str, int]:
    """'HOST:PORT' or '[V6]:PORT' -> (host, port); UsageError otherwise."""
    host, sep, port_text = text.strip().rpartition(":")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    if not sep or not host or not port_text.isdigit() or not 1 <= int(port_text) <= 65535:
        raise UsageError(f"{text!r} is not a link probe responder: use HOST:PORT, e.g. server:5000")
    return host, int(port_text)


def build_parser() -> ArgumentParser:
    """The probe role's arguments."""
    p = ArgumentParser(prog="socklab probe", description="Measure the shaped path to a link probe responder.")
    p.add_argument("--server", default=os.environ.get(ENV_PROBE) or None,
                   help=f"the responder's HOST:PORT (default ${ENV_PROBE})")
    p.add_argument("--group", default=os.environ.get(ENV_PROBE_GROUP) or None,
                   help=f"this container's group: only its first container runs the rate trains "
                        f"(default ${ENV_PROBE_GROUP}; none: always)")
    p.add_argument("--state", help="this container's link state file (default $SOCKLAB_LINK_STATE or the default)")
    p.add_argument("--pings", type=int, default=10, help="pings for the round trip (default 10)")
    return p


def main(argv: Sequence[str]) -> int:
    """The probe role: measure the path to --server and print the result line; 0 even when it was not reached."""
    # Imported here: the shaping package is not needed to answer or run a probe otherwise.
    from .shaping.commands import read_state, state_path_from

    args = build_parser().parse_args(list(argv))
    if not args.server:
        raise UsageError(f"socklab probe: give --server HOST:PORT (or set ${ENV_PROBE})")
    host, port = parse_server(args.server)
    state = read_state(state_path_from(os.environ, args.state)) or {}
    own_applied = state.get("applied") or {"up": {}, "down": {}}
    result = measure_link(host, port, own_applied, group=args.group, pings=max(0, args.pings))
    emit_result({"role": "probe", **result})
    return 0
