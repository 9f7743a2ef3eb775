"""The userspace backend's delay line: delay, jitter and loss without sch_netem.

iptables sends the link's packets to two NFQUEUE queues, one per direction;
this process holds each packet for its delay and lets it go on time. Rate stays
in the kernel (tbf), and where each hook sits decides the model:

* down (ingress): tc's ingress redirect to ifb runs before netfilter, so a
  packet crosses the tbf bottleneck on ifb first and reaches PREROUTING, and the
  delay line, afterwards: rate, then propagation delay, as on a real link.
  The packet waits in the kernel's queue and its verdict (NF_ACCEPT, or NF_DROP
  for a loss) is issued when it is due.
* up (egress): POSTROUTING runs before the qdisc, so a packet is delayed first
  and meets tbf afterwards, as in the netem plan (netem under tbf). For a FIFO
  link a constant delay before or after the bottleneck gives the same departure
  times; a loss here costs the bottleneck nothing. The verdict cannot be held
  here: a held packet still counts against its TCP socket's small-queue budget
  (TSQ, about a millisecond of data), which netem sidesteps by orphaning what
  it queues. Measured with held verdicts, 10 Mbit/s at 50 ms carried 0.55
  Mbit/s. So the packet is copied whole, dropped at once (the socket gets its
  budget back), and the copy is sent again from a raw socket when it is due,
  marked so that it passes the rule that queued it.

Where a direction has no loss, its queue is bound with the GSO flag: the kernel
hands over a GSO aggregate (up to 64 KiB, tens of wire packets) as one packet,
so a fast TCP flow costs one message, one verdict or copy, per aggregate
instead of per wire packet (Python spends 15-25 µs of CPU on each). Down, the
aggregate's verdict is held as any packet's. Up, its copy cannot go out of a
raw IP socket (longer than the MTU), so it goes out of a packet socket with a
virtio_net_hdr that has the kernel segment it on transmit (resend.py). Loss
needs wire packets (a lost aggregate would be a burst of losses), so a
direction with loss is bound without the flag and the kernel segments first.
The queue limit counts queued packets, aggregates as one, as netem's does.

Packets keep their order: each leaves no earlier than the one ahead of it, with
or without jitter (netem's tfifo would reorder under jitter). The queue is sized
like netem's limit (the bottleneck queue plus twice the link's bandwidth-delay
product); what overflows it is dropped and counted, as is what the kernel drops
when its queue or the netlink socket is full.

The process is started by ``shape apply`` (``shape delayline start``), changed
by ``shape set`` and asked for its counters over a control socket in the
network namespace's abstract socket space, so each container has its own.
"""

from __future__ import annotations

import json
import math
import os
import random
import resource
import select
import signal
import socket
import sys
import time
from collections import deque
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Mapping

from ..errors import EngineError, UsageError
from . import nfqueue
from .nfqueue import NF_ACCEPT, NF_DROP, NFQA_SKB_GSO, NfQueue, encode_verdict, encode_verdict_batch
from .resend import Resender

# One queue per direction; any numbers work as long as nothing else in the
# container's namespace uses them.
QUEUES = {"up": 7301, "down": 7302}
# skb->mark of the copies the delay line sends again, so the up rule lets them pass.
RESEND_MARK = 0x50C1AB
# Listed in /proc/net/unix as "@" + CONTROL_NAME.
CONTROL_NAME = "socklab-delayline"
CONTROL_ADDRESS = b"\0" + CONTROL_NAME.encode()
# netem's own default limit, used alike when a link has neither rate nor limit.
DEFAULT_LIMIT_PKTS = 1000
# Packets handled between two looks at the clock: a long burst is stamped and
# released in slices of this size, so none is stamped more than a few
# hundred microseconds late and none released late for the burst's sake.
RECEIVE_BATCH = 64
# ... and of this many bytes: 64 GSO aggregates would take a millisecond or two
# to read, and every packet of a slice is stamped when the slice has been read.
RECEIVE_BATCH_BYTES = 256 << 10
# select() wakes 0.1-0.3 ms after its timeout on an idle (virtual) CPU, which
# would add that much to every hold. So the loop sleeps until this long before
# the next release and polls from there: a little CPU for sub-0.1 ms releases.
SPIN_S = 0.0004
# ... but only while the line holds few packets. A busy line is woken by new
# arrivals anyway, and polling there burns the CPU the line needs on a shared
# host (at 1 Gbit/s half its time went to polls): a release late by a wake-up
# (0.1-0.3 ms) costs a 40 ms round trip less than a starved line does.
SPIN_HELD_MAX = 16
# How long a stop may take beyond the longest hold before what is left goes.
STOP_GRACE_S = 1.0
CONTROL_TIMEOUT_S = 5.0

HELD, LOST, OVERFLOW = "held", "lost", "overflow"


@dataclass(frozen=True)
class LineConfig:
    """What the delay line does to one direction."""

    delay_ms: float = 0.0
    jitter_ms: float = 0.0
    loss_pct: float = 0.0
    limit_pkts: int = DEFAULT_LIMIT_PKTS

    def __post_init__(self) -> None:
        for name in ("delay_ms", "jitter_ms"):
            value = getattr(self, name)
            if not math.isfinite(value) or value < 0:
                raise UsageError(f"delay line {name} {value!r} must be at least zero")
        if self.jitter_ms > self.delay_ms:
            raise UsageError(f"delay line jitter_ms {self.jitter_ms:g} exceeds delay_ms {self.delay_ms:g}")
        if not 0 <= self.loss_pct <= 100:
            raise UsageError(f"delay line loss_pct {self.loss_pct!r} must be from 0 to 100")
        if self.limit_pkts < 1:
            raise UsageError(f"delay line limit_pkts {self.limit_pkts!r} must be at least 1")

    def to_word(self) -> str:
        """'delay_ms=20.0,jitter_ms=0.0,loss_pct=1.0,limit_pkts=34': one command-line word."""
        return ",".join(f"{k}={v!r}" for k, v in asdict(self).items())

    @classmethod
    def from_word(cls, word: str) -> "LineConfig":
        """Inverse of ``to_word``; UsageError naming what is wrong."""
        values: dict[str, Any] = {}
        for part in word.split(","):
            key, sep, text = part.partition("=")
            if not sep or key not in cls.__dataclass_fields__:
                raise UsageError(f"{part!r} is not one of {', '.join(f'{k}=N' for k in cls.__dataclass_fields__)}")
            try:
                values[key] = int(text) if key == "limit_pkts" else float(text)
            except ValueError:
                raise UsageError(f"{part!r}: {text!r} is not a number") from None
        return cls(**values)


class DelayQueue:
    """One direction's delay line without any I/O, driven by the caller's clock.

    ``offer`` decides a packet's fate (held, lost, overflow) and its release
    time; ``release`` hands back, in arrival order, what is due. ``uniform``
    returns numbers in [0, 1); tests pass a scripted one.
    """

    def __init__(self, config: LineConfig, uniform: Callable[[], float]) -> None:
        self.config = config
        self._uniform = uniform
        self._held: deque[tuple[float, Any]] = deque()
        self._last_due_s = -math.inf
        self.packets = 0
        self.bytes = 0
        self.delayed = 0
        self.lost = 0
        self.overflow = 0
        self.held_max = 0
        self._late_sum_s = 0.0
        self.late_max_s = 0.0

    def __len__(self) -> int:
        return len(self._held)

    def offer(self, now_s: float, item: Any, size_bytes: int) -> str:
        """Take a packet that arrived at ``now_s``: HELD, LOST or OVERFLOW."""
        self.packets += 1
        self.bytes += size_bytes
        config = self.config
        if config.loss_pct and self._uniform() * 100 < config.loss_pct:
            self.lost += 1
            return LOST
        if len(self._held) >= config.limit_pkts:
            self.overflow += 1
            return OVERFLOW
        delay_s = config.delay_ms / 1000
        if config.jitter_ms:
            delay_s += (2 * self._uniform() - 1) * config.jitter_ms / 1000
        # Never before the packet ahead: order is kept under jitter, and when
        # the delay is lowered packets already held are not overtaken.
        due_s = max(now_s + delay_s, self._last_due_s)
        self._last_due_s = due_s
        self._held.append((due_s, item))
        if len(self._held) > self.held_max:
            self.held_max = len(self._held)
        return HELD

    def next_due_s(self) -> float | None:
        """When the first held packet is due, or None if nothing is held."""
        return self._held[0][0] if self._held else None

    def release(self, now_s: float) -> list[Any]:
        """The items due by ``now_s``, oldest first; counts how late each went."""
        held = self._held
        out = []
        while held and held[0][0] <= now_s:
            due_s, item = held.popleft()
            late_s = now_s - due_s
            self._late_sum_s += late_s
            if late_s > self.late_max_s:
                self.late_max_s = late_s
            out.append(item)
        self.delayed += len(out)
        return out

    def counters(self) -> dict[str, Any]:
        """The configuration and every counter, JSON-friendly."""
        return {
            **asdict(self.config),
            "packets": self.packets,
            "bytes": self.bytes,
            "delayed": self.delayed,
            "lost": self.lost,
            "overflow": self.overflow,
            "held": len(self._held),
            "held_max": self.held_max,
            "late_ms_mean": round(self._late_sum_s / self.delayed * 1000, 4) if self.delayed else None,
            "late_ms_max": round(self.late_max_s * 1000, 4),
        }


def draws(seed: int | None, direction: str) -> random.Random:
    """The generator of one direction's loss and jitter draws; unseeded (from the OS) when ``seed`` is None.

    Each direction gets its own, seeded with the direction too: up and down
    then draw different sequences, and neither's depends on how the other's
    packets interleave with it, so a seeded link repeats its decisions.
    """
    return random.Random(None if seed is None else f"{seed}:{direction}")


def takes_gso(config: LineConfig) -> bool:
    """Whether a direction's queue takes GSO aggregates whole: only without loss, which must strike wire packets."""
    return config.loss_pct == 0


@dataclass
class _Line:
    queue_num: int
    queue: DelayQueue
    # up: the packet is copied, dropped at once, and its copy sent again.
    copies: bool
    send_errors: int = 0
    # Aggregates taken whole (the queue is bound with the GSO flag while this direction has no loss).
    gso_packets: int = 0

    def bind_args(self, config: LineConfig | None = None) -> tuple[int, int, bool]:
        """What the queue is configured with for ``config`` (default: the current one): length, copy range, GSO."""
        config = config or self.queue.config
        copy_range = nfqueue.COPY_WHOLE if self.copies else nfqueue.COPY_LENGTH_ONLY
        return config.limit_pkts, copy_range, takes_gso(config)


class DelayLine:
    """The running delay line: NFQUEUE socket, sockets that send copies again (resend.py), control socket."""

    def __init__(self, configs: Mapping[str, LineConfig], clock: Callable[[], float] = time.monotonic,
                 seed: int | None = None) -> None:
        if not configs or set(configs) - set(QUEUES):
            raise UsageError(f"the delay line needs directions among {', '.join(QUEUES)}, got {sorted(configs)}")
        self.clock = clock
        self.lines = {
            direction: _Line(QUEUES[direction], DelayQueue(config, draws(seed, direction).random),
                             copies=direction == "up")
            for direction, config in configs.items()
        }
        self._by_queue = {line.queue_num: line for line in self.lines.values()}
        self.nfq: NfQueue | None = None
        self.resender: Resender | None = None
        self.control: socket.socket | None = None
        self._stop_at_s: float | None = None
        self._stop_waiters: list[socket.socket] = []
        self.started_s = clock()

    def open(self) -> None:
        """Bind the queues and open the sockets; EngineError with the reason if not possible."""
        try:
            self.control = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            self.control.bind(CONTROL_ADDRESS)
            self.control.listen(8)
        except OSError as exc:
            raise EngineError(f"the delay line cannot open its control socket ({exc.strerror or exc}); "
                              "is another delay line running in this container?") from None
        try:
            self.nfq = NfQueue()
            for line in self.lines.values():
                self.nfq.bind(line.queue_num, *line.bind_args())
            if any(line.copies for line in self.lines.values()):
                self.resender = Resender(RESEND_MARK, self.clock)
        except OSError as exc:
            raise EngineError(f"the delay line cannot use NFQUEUE ({exc.strerror or exc}); it needs root with "
                              "NET_ADMIN and the kernel's nfnetlink_queue module") from None

    # -- the loop ---------------------------------------------------------------

    def run(self) -> None:
        """Hold and release packets until asked to stop and everything held has gone."""
        assert self.nfq is not None and self.control is not None
        # A signal only sets the stop time; the wake-up descriptor makes the
        # wait return, since Python retries select() with its old timeout.
        wake_r, wake_w = socket.socketpair()
        wake_r.setblocking(False)
        wake_w.setblocking(False)
        signal.set_wakeup_fd(wake_w.fileno())
        for signum in (signal.SIGTERM, signal.SIGINT):
            signal.signal(signum, lambda *_: self.request_stop())
        waitables = [self.nfq.sock, self.control, wake_r]
        while True:
            now = self.clock()
            if self._stop_at_s is not None and (not self._held() or now >= self._stop_at_s):
                break
            due = [d for d in (line.queue.next_due_s() for line in self.lines.values()) if d is not None]
            spin_s = SPIN_S if self._held() <= SPIN_HELD_MAX else 0.0
            timeout = None if not due else max(0.0, min(due) - now - spin_s)
            if self._stop_at_s is not None:
                timeout = max(0.0, min(timeout if timeout is not None else math.inf, self._stop_at_s - now))
            readable, _, _ = select.select(waitables, [], [], timeout)
            if self.nfq.sock in readable:
                self._take()
            self._release(self.clock())
            if self.control in readable:
                self._serve()
            if wake_r in readable:
                wake_r.recv(4096)
        self._finish()

    def _held(self) -> int:
        return sum(len(line.queue) for line in self.lines.values())

    def _take(self) -> None:
        """Read queued packets in slices, each stamped with the time it was read."""
        assert self.nfq is not None
        while True:
            packets = self.nfq.receive(RECEIVE_BATCH, RECEIVE_BATCH_BYTES)
            if not packets:
                return
            now = self.clock()
            verdicts = bytearray()
            last_copied: dict[int, int] = {}
            for packet in packets:
                line = self._by_queue[packet.queue_num]
                if packet.skb_info & NFQA_SKB_GSO:
                    line.gso_packets += 1
                if line.copies:
                    line.queue.offer(now, packet, packet.length_bytes)
                    last_copied[packet.queue_num] = packet.packet_id
                elif line.queue.offer(now, packet.packet_id, packet.length_bytes) != HELD:
                    verdicts += encode_verdict(packet.queue_num, packet.packet_id, NF_DROP)
            for queue_num, packet_id in last_copied.items():
                # Every original in this queue up to here was copied: drop them
                # in one message. Their sockets get their budget back now.
                verdicts += encode_verdict_batch(queue_num, packet_id, NF_DROP)
            self.nfq.send(verdicts)
            self._release(self.clock())
            if len(packets) < RECEIVE_BATCH and sum(len(p.payload) for p in packets) < RECEIVE_BATCH_BYTES:
                return

    def _release(self, now: float) -> None:
        assert self.nfq is not None
        verdicts = bytearray()
        for line in self.lines.values():
            due = line.queue.release(now)
            if not due:
                continue
            if line.copies:
                self._send_copies(line, due)
            else:
                # Held packets are released in arrival order, and ids grow in
                # arrival order, so one batch verdict covers exactly the due ones.
                verdicts += encode_verdict_batch(line.queue_num, due[-1], NF_ACCEPT)
        self.nfq.send(verdicts)

    def _send_copies(self, line: _Line, packets: list[nfqueue.Packet]) -> None:
        assert self.resender is not None
        send = self.resender.send
        for packet in packets:
            if not send(packet):
                # Lost, and counted: see Resender for what cannot go.
                line.send_errors += 1

    # -- control ----------------------------------------------------------------

    def request_stop(self) -> None:
        """Stop taking more time than the longest hold needs: let what is held go, then exit."""
        if self._stop_at_s is None:
            longest_s = max((line.queue.config.delay_ms + line.queue.config.jitter_ms) / 1000
                            for line in self.lines.values())
            self._stop_at_s = self.clock() + longest_s + STOP_GRACE_S

    def stats(self) -> dict[str, Any]:
        """Counters per direction (the kernel's overflow drops included) and the CPU time spent."""
        kernel = nfqueue.read_proc_queues()
        lines = {}
        for direction, line in self.lines.items():
            counters = line.queue.counters()
            dropped = kernel.get(line.queue_num, {})
            counters["overflow"] += dropped.get("overflow", 0) + dropped.get("socket_overflow", 0)
            lines[direction] = {"queue": line.queue_num, "method": "copy" if line.copies else "verdict",
                                "gso": takes_gso(line.queue.config), **counters, "send_errors": line.send_errors,
                                "gso_packets": line.gso_packets}
        usage = resource.getrusage(resource.RUSAGE_SELF)
        return {"running": self._stop_at_s is None, "pid": os.getpid(),
                "uptime_s": round(self.clock() - self.started_s, 3),
                "cpu_s": round(usage.ru_utime + usage.ru_stime, 3), **lines}

    def reconfigure(self, configs: Mapping[str, LineConfig]) -> None:
        """New delay, jitter, loss or limit for running directions; packets held keep their time."""
        if set(configs) != set(self.lines):
            raise UsageError(f"the delay line runs for {' and '.join(self.lines)}; a change to "
                             f"{' and '.join(configs) or 'no direction'} needs a new one")
        assert self.nfq is not None
        for direction, config in configs.items():
            line = self.lines[direction]
            if line.bind_args(config) != line.bind_args():
                # Aggregates already queued stay whole: a loss set now may
                # strike a few of them as one.
                self.nfq.configure(line.queue_num, *line.bind_args(config))
            line.queue.config = config

    def _serve(self) -> None:
        assert self.control is not None
        conn, _ = self.control.accept()
        conn.settimeout(CONTROL_TIMEOUT_S)
        keep = False
        try:
            request = json.loads(_read_line(conn))
            op = request.get("op")
            if op == "stats":
                answer = {"ok": True, **self.stats()}
            elif op == "set":
                self.reconfigure({d: LineConfig(**c) for d, c in request.get("lines", {}).items()})
                answer = {"ok": True, **self.stats()}
            elif op == "stop":
                self.request_stop()
                self._stop_waiters.append(conn)
                keep = True
                return
            else:
                answer = {"ok": False, "error": f"unknown request {op!r}"}
        except (ValueError, TypeError, UsageError, OSError) as exc:
            answer = {"ok": False, "error": str(exc)}
        finally:
            if not keep:
                _answer(conn, answer)

    def _finish(self) -> None:
        """Final counters to whoever asked to stop; closing the queue drops nothing held."""
        final = {"ok": True, **self.stats(), "running": False}
        for conn in self._stop_waiters:
            _answer(conn, final)
        assert self.nfq is not None
        self.nfq.close()
        if self.resender is not None:
            self.resender.close()
        if self.control is not None:
            self.control.close()


def _read_line(conn: socket.socket) -> bytes:
    data = b""
    while not data.endswith(b"\n"):
        chunk = conn.recv(65536)
        if not chunk:
            break
        data += chunk
    return data


def _answer(conn: socket.socket, answer: Mapping[str, Any]) -> None:
    try:
        conn.sendall(json.dumps(answer).encode() + b"\n")
    except OSError:
        pass  # the asker went away; nothing to tell it
    finally:
        conn.close()


# -- the commands `shape delayline start|set|stats|stop` run ---------------------


def ask(request: Mapping[str, Any], timeout_s: float = CONTROL_TIMEOUT_S) -> dict[str, Any] | None:
    """Send one request to this namespace's delay line; None when none is running."""
    conn = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    conn.settimeout(timeout_s)
    try:
        try:
            conn.connect(CONTROL_ADDRESS)
        except (ConnectionRefusedError, FileNotFoundError):
            return None
        conn.sendall(json.dumps(request).encode() + b"\n")
        line = _read_line(conn)
    except socket.timeout:
        raise EngineError(f"the delay line did not answer {request.get('op')!r} within {timeout_s:g} s") from None
    finally:
        conn.close()
    if not line:
        raise EngineError("the delay line closed its control connection without an answer")
    answer = json.loads(line)
    if not answer.pop("ok", False):
        raise EngineError(f"the delay line refused {request.get('op')!r}: {answer.get('error')}")
    return answer


def start(configs: Mapping[str, LineConfig], log_path: Path, seed: int | None = None) -> int:
    """Start the delay line in the background; return its pid once its queues are bound.

    ``seed`` makes its loss and jitter draws repeat from run to run (see ``draws``).
    The daemon leaves this process's session and output (so that whoever ran
    this command, through ``runner.run``, is not kept waiting for it) and logs
    to ``log_path``. Raises EngineError if it could not start.
    """
    line = DelayLine(configs, seed=seed)
    read_fd, write_fd = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(read_fd)
        status = 0
        try:
            os.setsid()
            _detach(log_path)
            try:
                line.open()
            except EngineError as exc:
                os.write(write_fd, f"error {exc}".encode())
                status = 3
            else:
                os.write(write_fd, b"ready")
                os.close(write_fd)
                line.run()
        except BaseException as exc:  # a daemon has no one else to tell
            print(f"socklab delay line: {type(exc).__name__}: {exc}", file=sys.stderr, flush=True)
            status = 1
        finally:
            os._exit(status)
    os.close(write_fd)
    with os.fdopen(read_fd, "rb") as pipe:
        said = pipe.read().decode()
    if said == "ready":
        return pid
    os.waitpid(pid, 0)
    raise EngineError(said.removeprefix("error ") if said else f"the delay line failed to start (see {log_path})")


def _detach(log_path: Path) -> None:
    devnull = os.open(os.devnull, os.O_RDWR)
    try:
        log_path.parent.mkdir(parents=True, exist_ok=True)
        log = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    except OSError:
        log = devnull
    os.dup2(devnull, 0)
    os.dup2(log, 1)
    os.dup2(log, 2)


def stop() -> dict[str, Any] | None:
    """Stop this namespace's delay line; its final counters, or None if none was running.

    Waits while it lets held packets go (at most the longest hold and a
    second). The caller removes the iptables rules first, or new packets
    would meet a queue with no listener.
    """
    # The delay line bounds its own stop by its longest hold, which the asker
    # does not know; a minute covers any delay a lab link sensibly has.
    return ask({"op": "stop"}, timeout_s=CONTROL_TIMEOUT_S + 60.0)
