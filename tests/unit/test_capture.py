"""The capped packet capture: the pcap copy that stops at its cap and counts the rest, its
settings, tcpdump's command line, and starting and stopping a (fake) tcpdump.

pcap streams are built here with struct, in both byte orders and with both timestamp
units; what the writer must keep and cut is worked out here independently (the oracle).
The fake tcpdump is a Python child that talks like tcpdump on stderr.
"""

from __future__ import annotations

import io
import os
import stat
import struct
import subprocess
import sys
from pathlib import Path

import pytest

from socklab import capture
from socklab.capture import (CAPTURE_PATH, DEFAULT_CAP_BYTES, DEFAULT_SNAPLEN, ENV_CAPTURE, CappedPcapWriter,
                             CaptureSettings, start_capture, tcpdump_argv)
from socklab.errors import SocklabError, UsageError

pytestmark = pytest.mark.timeout(60)

MAGIC_MICRO = 0xA1B2C3D4
MAGIC_NANO = 0xA1B23C4D
LINKTYPE_ETHERNET = 1


def pcap_header(order: str = "<", magic: int = MAGIC_MICRO, snaplen: int = 128) -> bytes:
    return struct.pack(order + "IHHiIII", magic, 2, 4, 0, 0, snaplen, LINKTYPE_ETHERNET)


def pcap_record(order: str, index: int, incl_len: int, orig_len: int | None = None) -> bytes:
    data = bytes((index + i) % 256 for i in range(incl_len))
    return struct.pack(order + "IIII", 1_700_000_000 + index, index * 1000, incl_len,
                       orig_len if orig_len is not None else incl_len + 1400) + data


def pcap_stream(order: str, sizes: list[int], magic: int = MAGIC_MICRO) -> tuple[bytes, list[bytes]]:
    records = [pcap_record(order, i, n) for i, n in enumerate(sizes)]
    return pcap_header(order, magic) + b"".join(records), records


def oracle(records: list[bytes], cap_bytes: int) -> dict:
    """What the writer must do: whole records while the file stays within the cap, then none."""
    kept = 24
    packets = 0
    for i, record in enumerate(records):
        if kept + len(record) > cap_bytes:
            rest = records[i:]
            return {"packets": packets, "bytes": kept, "cut_packets": len(rest),
                    "cut_bytes": sum(len(r) for r in rest)}
        kept += len(record)
        packets += 1
    return {"packets": packets, "bytes": kept, "cut_packets": 0, "cut_bytes": 0}


def run_writer(stream: bytes, cap_bytes: int) -> tuple[CappedPcapWriter, bytes]:
    dest = io.BytesIO()
    writer = CappedPcapWriter(io.BytesIO(stream), dest, cap_bytes)
    writer.run()
    return writer, dest.getvalue()


def counters(writer: CappedPcapWriter) -> dict:
    return {"packets": writer.packets, "bytes": writer.bytes, "cut_packets": writer.cut_packets,
            "cut_bytes": writer.cut_bytes}


# --------------------------------------------------------------------------
# CappedPcapWriter

# Record data sizes, varied so that a smaller record after the first cut one would still fit.
SIZES = [60, 128, 54, 128, 128, 66, 128, 40, 128, 90, 128, 128, 54] * 5


@pytest.mark.parametrize("order", ["<", ">"])
@pytest.mark.parametrize("magic", [MAGIC_MICRO, MAGIC_NANO])
@pytest.mark.parametrize("cap_bytes", [24, 100, 1000, 2345, 5000, 10**9])
def test_writer_keeps_whole_records_up_to_the_cap(order: str, magic: int, cap_bytes: int) -> None:
    stream, records = pcap_stream(order, SIZES, magic)
    writer, written = run_writer(stream, cap_bytes)
    expected = oracle(records, cap_bytes)
    assert counters(writer) == expected
    assert len(written) == expected["bytes"] <= cap_bytes
    assert written == stream[:expected["bytes"]]  # a prefix of the stream: no gap inside
    assert expected["bytes"] + expected["cut_bytes"] == len(stream)
    assert writer.nanosecond is (magic == MAGIC_NANO)
    assert writer.byte_order == order


def test_writer_cap_exactly_reached_keeps_the_record_that_fills_it() -> None:
    stream, records = pcap_stream("<", [100, 100, 100])
    cap_bytes = 24 + 2 * (16 + 100)
    writer, written = run_writer(stream, cap_bytes)
    assert counters(writer) == {"packets": 2, "bytes": cap_bytes, "cut_packets": 1, "cut_bytes": 116}
    assert len(written) == cap_bytes


def test_writer_cuts_everything_after_the_first_record_that_does_not_fit() -> None:
    # The third record does not fit; the fourth would, but the file must not have a gap.
    stream, _ = pcap_stream(">", [100, 100, 200, 10])
    writer, _ = run_writer(stream, 24 + 2 * 116 + 100)
    assert counters(writer) == {"packets": 2, "bytes": 24 + 232, "cut_packets": 2, "cut_bytes": 216 + 26}


@pytest.mark.parametrize("cut_at", [3, 16, 16 + 50])  # inside a record header, just after it, inside the data
@pytest.mark.parametrize("cap_bytes", [10**6, 24 + 116])  # writing, or already cutting, when the stream ends
def test_writer_counts_a_truncated_last_record_as_cut(cut_at: int, cap_bytes: int) -> None:
    stream, records = pcap_stream("<", [100, 100, 100])
    whole = 24 + 2 * 116
    truncated = stream[:whole + cut_at]
    writer, written = run_writer(truncated, cap_bytes)
    expected = oracle(records[:2], cap_bytes)
    expected["cut_packets"] += 1
    expected["cut_bytes"] += cut_at
    assert counters(writer) == expected
    assert written == stream[:expected["bytes"]]


def test_writer_empty_stream_writes_nothing() -> None:
    writer, written = run_writer(b"", 10**6)
    assert written == b""
    assert counters(writer) == {"packets": 0, "bytes": 0, "cut_packets": 0, "cut_bytes": 0}


def test_writer_header_only_stream() -> None:
    writer, written = run_writer(pcap_header(">"), 10**6)
    assert written == pcap_header(">")
    assert counters(writer) == {"packets": 0, "bytes": 24, "cut_packets": 0, "cut_bytes": 0}


@pytest.mark.parametrize("stream, fragment", [
    (b"tcpdump: eth0: No such device exists\n", "not pcap"),
    (b"\x0a\x0d\x0d\x0a" + bytes(40), "pcapng"),
    (struct.pack("<I", MAGIC_MICRO) + bytes(6), "ended inside its pcap header"),
    (pcap_header("<") + struct.pack("<IIII", 0, 0, 10**7, 10**7), "corrupt"),
])
def test_writer_rejects_a_stream_that_is_not_pcap(stream: bytes, fragment: str) -> None:
    with pytest.raises(ValueError, match=fragment):
        run_writer(stream, 10**6)


class TrickleReader(io.RawIOBase):
    """A raw pipe that returns at most a few bytes per read."""

    def __init__(self, data: bytes, step: int) -> None:
        self.data, self.pos, self.step = data, 0, step

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        n = min(len(buffer), self.step, len(self.data) - self.pos)
        buffer[:n] = self.data[self.pos:self.pos + n]
        self.pos += n
        return n


def test_writer_reads_whole_records_from_short_reads() -> None:
    stream, records = pcap_stream("<", SIZES)
    dest = io.BytesIO()
    writer = CappedPcapWriter(TrickleReader(stream, 7), dest, 3000)
    writer.run()
    assert counters(writer) == oracle(records, 3000)
    assert dest.getvalue() == stream[:writer.bytes]


# --------------------------------------------------------------------------
# Settings and tcpdump's command line


def test_settings_round_trip_through_the_environment() -> None:
    settings = CaptureSettings(DEFAULT_SNAPLEN, DEFAULT_CAP_BYTES)
    assert settings.to_env() == "128:33554432"
    assert CaptureSettings.from_env({ENV_CAPTURE: settings.to_env()}) == settings
    assert CaptureSettings.from_env({ENV_CAPTURE: "64:65536"}) == CaptureSettings(64, 65536)
    assert CaptureSettings.from_env({ENV_CAPTURE: " 262144:1073741824 "}) == CaptureSettings(262144, 2**30)


@pytest.mark.parametrize("environ", [{}, {ENV_CAPTURE: ""}, {ENV_CAPTURE: "off"}, {ENV_CAPTURE: "OFF"},
                                     {ENV_CAPTURE: "  "}])
def test_settings_off(environ: dict) -> None:
    assert CaptureSettings.from_env(environ) is None


BAD = [
    ("128", "SNAPLEN:CAP_BYTES"),
    ("on", "SNAPLEN:CAP_BYTES"),
    ("128:32MiB", "SNAPLEN:CAP_BYTES"),
    ("-1:65536", "SNAPLEN:CAP_BYTES"),
    ("128:65536:1", "SNAPLEN:CAP_BYTES"),
    ("63:65536", "snaplen 63 is out of range: use 64 to 262144"),
    ("262145:65536", "snaplen 262145 is out of range: use 64 to 262144"),
    ("0:65536", "snaplen 0 is out of range: use 64 to 262144"),
    ("128:65535", "cap 65535 is too small: use at least 65536"),
    ("128:0", "cap 0 is too small: use at least 65536"),
]


@pytest.mark.parametrize("value, fragment", BAD)
def test_settings_bad_values(value: str, fragment: str) -> None:
    with pytest.raises(UsageError) as info:
        CaptureSettings.from_env({ENV_CAPTURE: value})
    message = str(info.value)
    assert fragment in message
    assert ENV_CAPTURE in message and repr(value) in message
    assert message.endswith(".") and "\n" not in message


def test_settings_checked() -> None:
    assert CaptureSettings.checked(256, 2**26) == CaptureSettings(256, 2**26)
    for snaplen, cap in ((10, 2**26), (128, 1024), (True, 2**26)):
        with pytest.raises(UsageError, match="is out of range|is too small"):
            CaptureSettings.checked(snaplen, cap)


def test_tcpdump_argv() -> None:
    prefix = ["tcpdump", "-i", "eth0", "-n", "-U", "-s", "128", "-w", "-"]
    argv = tcpdump_argv(128)
    assert argv[:len(prefix)] == prefix
    assert argv[argv.index("-Z") + 1] == "root"
    assert "--immediate-mode" in argv
    assert "-c" not in argv
    assert not any("udp" in a for a in argv)

    argv = tcpdump_argv(96, dev="eth1", exclude_udp_port=9999, count=10)
    assert argv[:len(prefix)] == ["tcpdump", "-i", "eth1", "-n", "-U", "-s", "96", "-w", "-"]
    assert argv[argv.index("-c") + 1] == "10"
    assert argv[-1] == "not (udp port 9999)"  # the filter comes after every option
    assert tcpdump_argv(96, dev="eth1", exclude_udp_port=9999, count=10) == argv  # pure


def test_capture_path_is_in_tmp() -> None:
    assert CAPTURE_PATH == "/tmp/socklab-capture.pcap"


# --------------------------------------------------------------------------
# start_capture and stop with a fake tcpdump

FAKE_TCPDUMP = r"""
import os, signal, sys, time
stopped = []
signal.signal(signal.SIGINT, lambda *_: stopped.append(1))  # before "listening": stop() may come at once
with open(sys.argv[1], "rb") as fh:
    data = fh.read()
sys.stderr.write("tcpdump: listening on eth0, link-type EN10MB (Ethernet), snapshot length 128 bytes\n")
sys.stderr.flush()
view = memoryview(data)
while view:  # a write that SIGINT interrupts is short (as with tcpdump's stdio, nothing may be lost)
    view = view[os.write(1, view):]
while not stopped:
    time.sleep(0.01)
sys.stderr.write("3 packets captured\n3 packets received by filter\n0 packets dropped by kernel\n")
sys.stderr.flush()
"""

FAKE_DENIED = r"""
import sys
sys.stderr.write("tcpdump: eth0: You don't have permission to perform this capture on that device\n")
sys.stderr.write("(socket: Operation not permitted)\n")
sys.exit(1)
"""

FAKE_SILENT = r"""
import time
time.sleep(30)
"""


class FakePopen:
    """A ``popen=`` for start_capture: runs a Python script instead of tcpdump, keeping the argv asked for."""

    def __init__(self, script: str, *args: str) -> None:
        self.script = script
        self.args = list(args)
        self.argv: list[str] | None = None
        self.procs: list[subprocess.Popen] = []

    def __call__(self, argv: list[str], **kwargs) -> subprocess.Popen:
        self.argv = argv
        proc = subprocess.Popen([sys.executable, "-c", self.script, *self.args], **kwargs)
        self.procs.append(proc)
        return proc

    def reap(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()


@pytest.fixture
def fakes():
    made: list[FakePopen] = []

    def make(script: str, *args: str) -> FakePopen:
        made.append(FakePopen(script, *args))
        return made[-1]

    yield make
    for fake in made:
        fake.reap()


def test_start_and_stop_with_a_fake_tcpdump(tmp_path: Path, fakes) -> None:
    # More than the smallest cap holds: some records are cut.
    sizes = [128] * 600
    stream, records = pcap_stream("<", sizes)
    source = tmp_path / "stream.pcap"
    source.write_bytes(stream)
    path = tmp_path / "capture.pcap"
    settings = CaptureSettings(128, 65536)
    fake = fakes(FAKE_TCPDUMP, str(source))

    running = start_capture(settings, exclude_udp_port=9999, path=str(path), popen=fake)
    assert fake.argv == tcpdump_argv(128, exclude_udp_port=9999)
    result = running.stop()

    expected = oracle(records, 65536)
    assert expected["cut_packets"] > 0
    assert result == {
        "file": str(path),
        "packets": expected["packets"],
        "bytes": expected["bytes"],
        "cut_packets": expected["cut_packets"],
        "cut_bytes": expected["cut_bytes"],
        "snaplen": 128,
        "cap_bytes": 65536,
        "dropped_by_kernel": 0,
        "seen_packets": 600,
    }
    assert path.read_bytes() == stream[:expected["bytes"]]
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o644
    assert running.exit_status == 0
    assert running.stop() == result  # a second stop says the same


def test_start_replaces_an_earlier_file(tmp_path: Path, fakes) -> None:
    stream, records = pcap_stream(">", [60, 70], MAGIC_NANO)
    source = tmp_path / "stream.pcap"
    source.write_bytes(stream)
    path = tmp_path / "capture.pcap"
    path.write_bytes(b"x" * 100_000)
    os.chmod(path, 0o600)
    result = start_capture(CaptureSettings(128, 65536), path=str(path), popen=fakes(FAKE_TCPDUMP, str(source))).stop()
    assert (result["packets"], result["cut_packets"], result["bytes"]) == (2, 0, len(stream))
    assert path.read_bytes() == stream
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o644


def test_stop_without_counters_from_tcpdump(tmp_path: Path, fakes) -> None:
    # A tcpdump that ignores SIGINT is killed; it said nothing about drops.
    script = ("import signal, sys, time\nsignal.signal(signal.SIGINT, signal.SIG_IGN)\n"
              "sys.stderr.write('tcpdump: listening on eth0\\n'); sys.stderr.flush()\ntime.sleep(30)\n")
    running = start_capture(CaptureSettings(128, 65536), path=str(tmp_path / "c.pcap"), popen=fakes(script))
    running.stop_timeout_s = 0.3
    result = running.stop()
    assert result["dropped_by_kernel"] is None
    assert (result["packets"], result["bytes"], result["seen_packets"]) == (0, 0, 0)
    assert running.exit_status is not None and running.exit_status < 0


def test_stop_reports_a_stream_that_is_not_pcap(tmp_path: Path, fakes) -> None:
    source = tmp_path / "stream.txt"
    source.write_bytes(b"this is text, not a capture\n" * 10_000)  # more than a pipe holds
    running = start_capture(CaptureSettings(128, 65536), path=str(tmp_path / "c.pcap"),
                            popen=fakes(FAKE_TCPDUMP, str(source)))
    with pytest.raises(SocklabError, match="incomplete: the capture stream is not pcap"):
        running.stop()
    assert running.exit_status == 0  # the pipe was drained, so it could exit on SIGINT


def test_start_fails_when_tcpdump_exits_first(tmp_path: Path, fakes) -> None:
    path = tmp_path / "c.pcap"
    with pytest.raises(SocklabError) as info:
        start_capture(CaptureSettings(128, 65536), path=str(path), popen=fakes(FAKE_DENIED))
    message = str(info.value)
    assert "exited with status 1 before it was listening on eth0" in message
    assert "You don't have permission" in message and "(socket: Operation not permitted)" in message
    assert "\n" not in message
    assert not path.exists()


def test_start_fails_when_tcpdump_is_not_listening_in_time(tmp_path: Path, fakes) -> None:
    fake = fakes(FAKE_SILENT)
    with pytest.raises(SocklabError, match=r"not listening on eth0 within 0.3s \(its last word: \(it printed"):
        start_capture(CaptureSettings(128, 65536), path=str(tmp_path / "c.pcap"), ready_timeout_s=0.3, popen=fake)
    assert fake.procs[0].poll() is not None  # killed, not left behind


def test_start_fails_when_tcpdump_is_missing(tmp_path: Path) -> None:
    def missing(argv, **kwargs):
        raise FileNotFoundError(2, "No such file or directory")

    with pytest.raises(SocklabError, match="cannot run tcpdump for the capture: No such file or directory"):
        start_capture(CaptureSettings(128, 65536), path=str(tmp_path / "c.pcap"), popen=missing)
    assert not (tmp_path / "c.pcap").exists()


def test_dropped_by_kernel_parsing() -> None:
    assert capture.parse_dropped_by_kernel(["5 packets captured", "1 packet dropped by kernel"]) == 1
    assert capture.parse_dropped_by_kernel(["7 packets dropped by kernel", "2 packets dropped by interface"]) == 7
    assert capture.parse_dropped_by_kernel(["tcpdump: listening on eth0"]) is None
