"""A packet capture of one container's lab traffic, bounded in size, that says what it cut.

The container's root entrypoint starts tcpdump around a role's workload
(:func:`start_capture`, then :meth:`RunningCapture.stop`) when ``SOCKLAB_CAPTURE``
asks for it; the orchestrator copies :data:`CAPTURE_PATH` out afterwards.

Why it is made this way:

* **Headers only, by default.** A snap length of 128 bytes keeps the Ethernet,
  IPv4 and TCP headers of every packet (TCP options included: 14 + 20 + 60 = 94
  bytes at most, with room for IP options or a VLAN tag) and almost none of the
  payload. What this lab studies (handshakes, window sizes, retransmissions,
  pacing, who sent what when) is all in the headers; the payload is the
  workload's filler bytes. A record then takes 16 + 128 bytes, so the default
  32 MiB cap holds some 230,000 packets.
* **A cap, so that a bulk run cannot fill the disk.** A bulk transfer sends
  gigabytes; even headers alone would grow without bound over a long run, and
  every container of a swarm writes its own capture.
* **A writer that keeps the beginning and counts the rest.** tcpdump's own
  bounds do not fit: ``-C`` with ``-W`` rotates a ring of files, which keeps the
  *end* of the run and drops its beginning (the handshake, the slow start: the
  part that matters most), and ``-C`` alone bounds each file but not their sum;
  ``-c`` bounds packets, not bytes, and makes tcpdump exit, after which nothing
  is counted. So tcpdump writes the pcap stream to a pipe (``-w -``) and
  :class:`CappedPcapWriter` copies it to the file record by record until the
  next record would take the file past the cap; from then on it reads every
  record and counts it (``cut_packets``, ``cut_bytes``) without writing it. The
  file is then a valid pcap of the run's first part, with no gap inside, and the
  result says exactly how much came after.

tcpdump runs with ``-U`` (each packet written to the pipe as it is captured)
and ``--immediate-mode`` (libpcap hands each packet over at once: its default
block buffering may hold up to a second of packets, which a SIGINT at the end
of the run would lose: the FINs).
"""

from __future__ import annotations

import collections
import os
import re
import signal
import struct
import subprocess
import threading
import time
from dataclasses import dataclass
from typing import Any, BinaryIO, Callable, Mapping

from .errors import SocklabError, UsageError

CAPTURE_PATH = "/tmp/socklab-capture.pcap"  # where the capture is written in the container
ENV_CAPTURE = "SOCKLAB_CAPTURE"  # "" or "off": no capture; else "SNAPLEN:CAP_BYTES", e.g. "128:33554432"
CAPTURE_OFF = "off"

DEFAULT_SNAPLEN = 128  # the headers (Ethernet + IPv4 + TCP with options) of every packet, not the payload
DEFAULT_CAP_BYTES = 32 * 2**20
# Smaller than Ethernet + IPv4 + TCP headers (14 + 20 + 20 = 54 bytes and options) is no use;
# 262144 is tcpdump's own largest snap length.
MIN_SNAPLEN = 64
MAX_SNAPLEN = 262144
MIN_CAP_BYTES = 64 * 1024

# The pcap format (https://www.tcpdump.org/manpages/pcap-savefile.5.html).
GLOBAL_HEADER_BYTES = 24
RECORD_HEADER_BYTES = 16
# The magic number as it appears in the stream -> (struct byte order, nanosecond timestamps).
_MAGICS = {
    b"\xa1\xb2\xc3\xd4": (">", False),
    b"\xd4\xc3\xb2\xa1": ("<", False),
    b"\xa1\xb2\x3c\x4d": (">", True),
    b"\x4d\x3c\xb2\xa1": ("<", True),
}
_PCAPNG_MAGIC = b"\x0a\x0d\x0d\x0a"
# What a record may claim at most: beyond it the stream is corrupt (or not pcap), and reading
# "incl_len" bytes of it would only swallow the rest of the stream.
_RECORD_LIMIT_BYTES = MAX_SNAPLEN
# How much of a cut record's data is read (and dropped) at once.
_DISCARD_CHUNK_BYTES = 64 * 1024

# tcpdump says this on stderr once it is capturing (after the filter is set):
# "tcpdump: listening on eth0, link-type EN10MB (Ethernet), snapshot length 128 bytes".
LISTENING_MARK = "listening on"
_DROPPED = re.compile(r"^\s*(\d+) packets? dropped by kernel\b")
STDERR_TAIL_LINES = 20
# After SIGINT tcpdump flushes and exits at once; one that does not is killed.
STOP_TIMEOUT_S = 5.0
# The threads end at the pipes' EOF, soon after tcpdump exits.
WRITER_JOIN_S = 10.0
STDERR_JOIN_S = 2.0


# --------------------------------------------------------------------------
# Settings


def _settings_problem(snaplen_bytes: object, cap_bytes: object) -> str | None:
    """What is wrong with a snap length and a cap, as a clause; None when they are fine."""
    if isinstance(snaplen_bytes, bool) or not isinstance(snaplen_bytes, int) \
            or not MIN_SNAPLEN <= snaplen_bytes <= MAX_SNAPLEN:
        return f"snaplen {snaplen_bytes!r} is out of range: use {MIN_SNAPLEN} to {MAX_SNAPLEN} bytes"
    if isinstance(cap_bytes, bool) or not isinstance(cap_bytes, int) or cap_bytes < MIN_CAP_BYTES:
        return f"cap {cap_bytes!r} is too small: use at least {MIN_CAP_BYTES} bytes (64KiB)"
    return None


@dataclass(frozen=True)
class CaptureSettings:
    """What a capture keeps: ``snaplen_bytes`` of each packet, at most ``cap_bytes`` in all (the file)."""

    snaplen_bytes: int
    cap_bytes: int

    @classmethod
    def checked(cls, snaplen_bytes: int, cap_bytes: int) -> "CaptureSettings":
        """The settings, or UsageError (one sentence) when a value is out of range."""
        problem = _settings_problem(snaplen_bytes, cap_bytes)
        if problem is not None:
            raise UsageError(f"{problem} (snaplen: bytes kept of each packet; cap: the most one container's "
                             "capture holds)")
        return cls(snaplen_bytes, cap_bytes)

    def to_env(self) -> str:
        """The value of ``SOCKLAB_CAPTURE`` that asks for these settings, e.g. ``128:33554432``."""
        return f"{self.snaplen_bytes}:{self.cap_bytes}"

    @classmethod
    def from_env(cls, environ: Mapping[str, str]) -> "CaptureSettings | None":
        """The settings ``SOCKLAB_CAPTURE`` in ``environ`` asks for; None when it is unset, empty or ``off``.

        UsageError (one sentence) on any other value that is not ``SNAPLEN:CAP_BYTES`` in range.
        """
        value = environ.get(ENV_CAPTURE)
        if value is None:
            return None
        text = value.strip()
        if text == "" or text.lower() == CAPTURE_OFF:
            return None
        m = re.fullmatch(r"(\d+):(\d+)", text)
        if m is None:
            raise UsageError(f"{ENV_CAPTURE}={value!r} is neither {CAPTURE_OFF!r} nor SNAPLEN:CAP_BYTES "
                             f"in whole bytes, e.g. {cls(DEFAULT_SNAPLEN, DEFAULT_CAP_BYTES).to_env()!r}.")
        snaplen_bytes, cap_bytes = int(m.group(1)), int(m.group(2))
        problem = _settings_problem(snaplen_bytes, cap_bytes)
        if problem is not None:
            raise UsageError(f"{ENV_CAPTURE}={value!r}: {problem}.")
        return cls(snaplen_bytes, cap_bytes)


# --------------------------------------------------------------------------
# tcpdump's command line


def tcpdump_argv(snaplen_bytes: int, dev: str = "eth0", exclude_udp_port: int | None = None,
                 count: int | None = None) -> list[str]:
    """tcpdump writing a pcap stream of ``dev`` to stdout (pure: also the orchestrator's live capture).

    ``-n``: no name lookups (they would send DNS packets, and wait). ``-U``: each packet
    reaches the pipe as it is captured. ``--immediate-mode``: libpcap hands each packet
    over at once instead of in blocks (a block held at SIGINT would be lost). ``-Z root``:
    Debian's tcpdump would otherwise switch to a ``tcpdump`` user, absent from the image.
    ``count``: stop after that many packets. ``exclude_udp_port``: leave out UDP packets
    to or from that port (the link probe's, not the lab's traffic).
    """
    argv = ["tcpdump", "-i", dev, "-n", "-U", "-s", str(snaplen_bytes), "-w", "-", "--immediate-mode",
            "-Z", "root"]
    if count is not None:
        argv += ["-c", str(count)]
    if exclude_udp_port is not None:
        argv.append(f"not (udp port {exclude_udp_port})")  # the filter expression comes last
    return argv


# --------------------------------------------------------------------------
# The capped copy of a pcap stream


def _read_up_to(source: BinaryIO, size: int) -> bytes:
    """``size`` bytes of ``source``, fewer only at its end (a raw pipe may return less per read)."""
    data = source.read(size)
    if not data or len(data) == size:
        return data or b""
    parts = [data]
    got = len(data)
    while got < size:
        more = source.read(size - got)
        if not more:
            break
        parts.append(more)
        got += len(more)
    return b"".join(parts)


class CappedPcapWriter:
    """Copies a pcap stream (as tcpdump -w - writes it) to a file, record by record, until the next record would
    take the file past cap_bytes; the rest is read and counted, not written.

    Counters, final after :meth:`run`: ``packets`` (records written), ``bytes`` (bytes
    written to ``dest``, the 24-byte global header included), ``cut_packets`` and
    ``cut_bytes`` (records read but not written, their 16-byte headers included; a record
    cut short by the end of the stream counts as cut, with the bytes it had).
    """

    def __init__(self, source: BinaryIO, dest: BinaryIO, cap_bytes: int) -> None:
        if cap_bytes < GLOBAL_HEADER_BYTES:
            raise ValueError(f"a pcap file cap of {cap_bytes} bytes cannot hold even the "
                             f"{GLOBAL_HEADER_BYTES}-byte global header")
        self.source = source
        self.dest = dest
        self.cap_bytes = cap_bytes
        self.packets = 0
        self.bytes = 0
        self.cut_packets = 0
        self.cut_bytes = 0
        self.nanosecond: bool | None = None  # the timestamps' unit, once the header is read
        self.byte_order: str | None = None  # "<" or ">", once the header is read

    def run(self) -> None:
        """Copy until the end of ``source``. An empty stream writes nothing; one that is not pcap: ValueError."""
        header = _read_up_to(self.source, GLOBAL_HEADER_BYTES)
        if not header:
            return  # tcpdump wrote nothing at all (killed before it started): nothing to keep
        kind = _MAGICS.get(header[:4])
        if kind is None:
            if header[:4] == _PCAPNG_MAGIC:
                raise ValueError("the capture stream is pcapng, not the pcap format tcpdump -w writes")
            raise ValueError(f"the capture stream is not pcap: it starts with {header[:4].hex()}, "
                             f"not a pcap magic number (a1b2c3d4 or a1b23c4d, in either byte order)")
        if len(header) < GLOBAL_HEADER_BYTES:
            raise ValueError(f"the capture stream ended inside its pcap header ({len(header)} of "
                             f"{GLOBAL_HEADER_BYTES} bytes)")
        self.byte_order, self.nanosecond = kind
        record_header = struct.Struct(self.byte_order + "IIII")  # ts_sec, ts_frac, incl_len, orig_len
        self._write(header)

        # Once a record does not fit, every later one is cut too (even a smaller one): the
        # file stays the run's first part with no gap inside it.
        writing = True
        while True:
            head = _read_up_to(self.source, RECORD_HEADER_BYTES)
            if not head:
                return
            if len(head) < RECORD_HEADER_BYTES:
                self._cut(len(head))
                return
            _, _, incl_len, _ = record_header.unpack(head)
            if incl_len > _RECORD_LIMIT_BYTES:
                raise ValueError(f"the capture stream is corrupt: record {self.packets + self.cut_packets + 1} "
                                 f"claims {incl_len} bytes, more than a snap length can be ({_RECORD_LIMIT_BYTES})")
            if writing and self.bytes + RECORD_HEADER_BYTES + incl_len <= self.cap_bytes:
                data = _read_up_to(self.source, incl_len)
                if len(data) < incl_len:  # the stream ended inside it: not a whole record, not written
                    self._cut(RECORD_HEADER_BYTES + len(data))
                    return
                self._write(head + data)
                self.packets += 1
                continue
            writing = False
            got = self._discard(incl_len)
            self._cut(RECORD_HEADER_BYTES + got)
            if got < incl_len:
                return

    def _write(self, data: bytes) -> None:
        self.dest.write(data)
        self.bytes += len(data)

    def _cut(self, nbytes: int) -> None:
        self.cut_packets += 1
        self.cut_bytes += nbytes

    def _discard(self, size: int) -> int:
        """Read and drop ``size`` bytes; how many there were (fewer at the end of the stream)."""
        got = 0
        while got < size:
            chunk = self.source.read(min(size - got, _DISCARD_CHUNK_BYTES))
            if not chunk:
                break
            got += len(chunk)
        return got


# --------------------------------------------------------------------------
# Running tcpdump


def parse_dropped_by_kernel(lines: list[str]) -> int | None:
    """N of tcpdump's closing line "N packets dropped by kernel" (the last one); None without one."""
    for line in reversed(lines):
        m = _DROPPED.match(line)
        if m:
            return int(m.group(1))
    return None


def _open_capture_file(path: str) -> BinaryIO:
    """``path`` created afresh, readable by everyone (the orchestrator copies it out as another user)."""
    try:
        os.unlink(path)  # an earlier run's file, or something else put there: not written through
    except FileNotFoundError:
        pass
    except OSError as exc:
        raise SocklabError(f"cannot replace the capture file {path}: {exc.strerror or exc}.") from None
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644)
        os.fchmod(fd, 0o644)  # whatever the umask took away
    except OSError as exc:
        raise SocklabError(f"cannot write the capture file {path}: {exc.strerror or exc}.") from None
    return os.fdopen(fd, "wb")


class RunningCapture:
    """tcpdump capturing, its stdout copied into the capture file by a thread; :meth:`stop` ends it."""

    def __init__(self, proc: subprocess.Popen, settings: CaptureSettings, path: str, dest: BinaryIO) -> None:
        self.proc = proc
        self.settings = settings
        self.path = path
        self.writer = CappedPcapWriter(proc.stdout, dest, settings.cap_bytes)
        self.stop_timeout_s = STOP_TIMEOUT_S
        self.exit_status: int | None = None  # tcpdump's, once stopped (negative: killed by that signal)
        self.writer_error: str | None = None
        self.stderr_lines: collections.deque[str] = collections.deque(maxlen=STDERR_TAIL_LINES)
        self.listening = threading.Event()
        self.stderr_closed = threading.Event()
        self._wake = threading.Event()  # either of the two above
        self._dest = dest
        self._result: dict[str, Any] | None = None
        self._writer_thread = threading.Thread(target=self._copy, name="socklab-capture-writer", daemon=True)
        self._stderr_thread = threading.Thread(target=self._read_stderr, name="socklab-capture-stderr",
                                               daemon=True)

    def _start_threads(self) -> None:
        self._writer_thread.start()
        self._stderr_thread.start()

    def _copy(self) -> None:
        try:
            self.writer.run()
        except (ValueError, OSError) as exc:
            self.writer_error = str(exc) if isinstance(exc, ValueError) else (exc.strerror or str(exc))
            # Keep reading: a full pipe would block tcpdump, which could then not exit on SIGINT.
            try:
                while self.proc.stdout.read(_DISCARD_CHUNK_BYTES):
                    pass
            except (OSError, ValueError):
                pass
        finally:
            try:
                self._dest.close()
            except OSError as exc:  # the last buffered records could not be written (a full disk)
                self.writer_error = self.writer_error or (exc.strerror or str(exc))

    def _read_stderr(self) -> None:
        try:
            for raw in self.proc.stderr:
                line = raw.decode("utf-8", "replace").rstrip("\r\n") if isinstance(raw, bytes) else raw.rstrip()
                if line.strip():
                    self.stderr_lines.append(line)
                if LISTENING_MARK in line and not self.listening.is_set():
                    self.listening.set()
                    self._wake.set()
        except (OSError, ValueError):
            pass
        finally:
            self.stderr_closed.set()
            self._wake.set()

    def last_stderr_line(self) -> str:
        """tcpdump's last non-blank line on stderr, or a placeholder.

        tcpdump puts the system's reason for an error on a line of its own in parentheses
        ("tcpdump: eth0: You don't have permission ...", then "(socket: Operation not
        permitted)"): such a line comes with the one before it.
        """
        lines = [line.strip() for line in self.stderr_lines]
        if not lines:
            return "(it printed nothing)"
        if lines[-1].startswith("(") and len(lines) > 1:
            return f"{lines[-2]} {lines[-1]}"
        return lines[-1]

    def _end_process(self) -> None:
        """Ask tcpdump to stop (SIGINT: it flushes and prints its counters); kill it if it does not."""
        if self.proc.poll() is None:
            try:
                self.proc.send_signal(signal.SIGINT)
            except ProcessLookupError:
                pass
            try:
                self.proc.wait(self.stop_timeout_s)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.exit_status = self.proc.returncode

    def _join(self) -> None:
        self._writer_thread.join(WRITER_JOIN_S)
        self._stderr_thread.join(STDERR_JOIN_S)
        # The pipes are ours to close (the writer closes the file), each once its reader is done.
        for stream, reader in ((self.proc.stdout, self._writer_thread), (self.proc.stderr, self._stderr_thread)):
            if stream is not None and not reader.is_alive():
                try:
                    stream.close()
                except OSError:
                    pass

    def stop(self) -> dict[str, Any]:
        """Stop tcpdump (SIGINT; killed after ``stop_timeout_s``), finish the file, and say what it holds.

        ``{"file", "packets", "bytes", "cut_packets", "cut_bytes", "snaplen", "cap_bytes",
        "dropped_by_kernel", "seen_packets"}``: records and bytes written, records and bytes
        cut by the cap, the settings, what tcpdump said the kernel dropped (None when it did
        not say: killed), and all the records that reached the writer. SocklabError (one
        sentence) when the file could not be written whole, or tcpdump ended on its own with
        an error before this was called. Calling it again returns the same result.
        """
        if self._result is not None:
            return self._result
        ended_early = self.proc.poll()
        self._end_process()
        self._join()
        if self._writer_thread.is_alive():
            raise SocklabError(f"the capture writer had not finished {self.path} {WRITER_JOIN_S:g}s after "
                               f"tcpdump exited, so the capture is incomplete.")
        if self.writer_error is not None:
            raise SocklabError(f"the capture in {self.path} is incomplete: {self.writer_error}.")
        if ended_early is not None and ended_early != 0:
            raise SocklabError(f"tcpdump stopped on its own with status {ended_early} before the capture "
                               f"was over, so {self.path} holds only the start: {self.last_stderr_line()}")
        w = self.writer
        self._result = {
            "file": self.path,
            "packets": w.packets,
            "bytes": w.bytes,
            "cut_packets": w.cut_packets,
            "cut_bytes": w.cut_bytes,
            "snaplen": self.settings.snaplen_bytes,
            "cap_bytes": self.settings.cap_bytes,
            "dropped_by_kernel": parse_dropped_by_kernel(list(self.stderr_lines)),
            "seen_packets": w.packets + w.cut_packets,
        }
        return self._result

    def abandon(self) -> None:
        """Kill tcpdump and end the threads at once (a failed start); the file is removed."""
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()
        self.exit_status = self.proc.returncode
        self._join()
        try:
            os.unlink(self.path)
        except OSError:
            pass


def start_capture(settings: CaptureSettings, *, dev: str = "eth0", exclude_udp_port: int | None = None,
                  path: str = CAPTURE_PATH, ready_timeout_s: float = 5.0,
                  popen: Callable[..., subprocess.Popen] = subprocess.Popen) -> RunningCapture:
    """Start tcpdump on ``dev`` writing into ``path`` (0644) within ``settings``; return once it listens.

    It returns only when tcpdump has said "listening on", so that the connection the
    workload opens next has its handshake in the capture. tcpdump runs in its own
    process group (a Ctrl-C meant for the workload must not end the capture early).
    SocklabError (one sentence, with tcpdump's last line on stderr) when tcpdump cannot
    start, exits, or is not listening within ``ready_timeout_s``.
    """
    argv = tcpdump_argv(settings.snaplen_bytes, dev=dev, exclude_udp_port=exclude_udp_port)
    dest = _open_capture_file(path)
    try:
        proc = popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                     process_group=0)
    except OSError as exc:
        dest.close()
        try:
            os.unlink(path)
        except OSError:
            pass
        raise SocklabError(f"cannot run {argv[0]} for the capture: {exc.strerror or exc}.") from None
    capture = RunningCapture(proc, settings, path, dest)
    capture._start_threads()

    deadline = time.monotonic() + ready_timeout_s
    while not capture.listening.is_set():
        left = deadline - time.monotonic()
        if capture.stderr_closed.is_set() or left <= 0:
            break
        capture._wake.wait(left)
        capture._wake.clear()
    if capture.listening.is_set():
        return capture

    try:
        status = proc.wait(0.5) if capture.stderr_closed.is_set() else proc.poll()
    except subprocess.TimeoutExpired:
        status = None
    capture.abandon()
    if status is not None:
        raise SocklabError(f"tcpdump exited with status {status} before it was listening on {dev}: "
                           f"{capture.last_stderr_line()}")
    raise SocklabError(f"tcpdump was not listening on {dev} within {ready_timeout_s:g}s "
                       f"(its last word: {capture.last_stderr_line()})")
