"""Plot kind: the TCP time–sequence graph of a client's packet capture, as tcptrace draws it.

Where the send timeline shows what send() accepted, this shows what left the
container: each data segment's sequence offset against the time it was
captured, retransmissions marked, and the server's ACKs beside them.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any, Mapping, Sequence

import matplotlib
from matplotlib.lines import Line2D

from socklab.errors import UsageError

from .. import pcap
from ..rundir import LoadedRun
from . import kit
from .extract import TraceLoader, run_label

# Workloads whose client streams data one way: a time–sequence graph of an echo's
# small requests or of a connect workload would be a handful of dots.
TSEQ_WORKLOADS = ("bulk",)
# A program of the user's is drawn when its capture shows it streaming at least this much.
PROGRAM_STREAM_MIN_BYTES = 64 * 1024
RETRANSMIT_COLOUR = "#C00000"
ACK_COLOUR = "#555555"
# Beyond this many segments, dots merge into a band that hides the line's steps.
MAX_DOTS = 3000


def _streams(group, client: dict) -> bool:
    """Whether a group's client sends one long stream: a bulk workload, or a program whose
    capture shows it sent at least PROGRAM_STREAM_MIN_BYTES."""
    if group.workload.kind in TSEQ_WORKLOADS:
        return True
    tcp = (client.get("capture") or {}).get("tcp") or {}
    return group.program is not None and ((tcp.get("payload_bytes") or {}).get("to_server") or 0) \
        >= PROGRAM_STREAM_MIN_BYTES


@dataclass(frozen=True)
class SequencePanel:
    """One case's time–sequence graph: the largest flow to the server in the capture of
    the first replica of a group, in the case's first repetition that kept one."""

    title: str
    label: str
    mode: str
    run: int
    flow: pcap.SequenceFlow
    flows_to_server: int

    @property
    def retransmitted(self) -> int:
        """How many of the flow's segments were retransmissions."""
        return sum(self.flow.retransmits)

    def goodput_bps(self) -> float | None:
        """The mean slope of the new data: bytes from the first data segment to the last, × 8."""
        times = self.flow.times_s
        span_s = times[-1] - times[0] if times else 0.0
        return self.flow.highest_end_bytes * 8 / span_s if span_s > 0 else None


def capture_path(run: LoadedRun, entry: Mapping[str, Any]) -> Path | None:
    """The capture file a record's client (or server) entry names, if it is inside the
    run directory and there; a record is never a reason to read files elsewhere."""
    capture = entry.get("capture")
    name = capture.get("file") if isinstance(capture, Mapping) else None
    if not isinstance(name, str) or not name:
        return None
    relative = PurePosixPath(name)
    if relative.is_absolute() or ".." in relative.parts:
        return None
    path = run.path / relative
    return path if path.is_file() else None


def sequence_panels(runs: Sequence[LoadedRun], load: TraceLoader) -> list[SequencePanel]:
    """A panel per case and streaming client group that captured packets (see :class:`SequencePanel`).

    ``load`` (the trace loader every kind is given) is not needed: captures are
    read here, each once.
    """
    panels = []
    for index, run in enumerate(runs):
        by_id = {case.id: case for case in run.cases}
        several_groups = len({g.name for c in run.cases for g in c.experiment.clients}) > 1
        chosen: dict[tuple[str, str], tuple[int, Mapping[str, Any]]] = {}
        for record in run.records:
            case = by_id.get(record["case"])
            if case is None or record["status"] != "ok":
                continue
            for client in record["clients"]:
                group = next((g for g in case.experiment.clients if g.name == client["name"]), None)
                if group is None or client.get("replica", 0) != 0 or not _streams(group, client):
                    continue
                key = (case.id, group.name)
                if capture_path(run, client) is not None and (
                        key not in chosen or record["repetition"] < chosen[key][0]):
                    chosen[key] = (record["repetition"], client)
        for (case_id, group_name), (repetition, client) in chosen.items():
            # Imported only for a run that captured: scenario is the lab's container side, which a
            # report otherwise never needs.
            from ..scenario import SERVER_PORT

            try:
                flows = pcap.sequence_series(capture_path(run, client), SERVER_PORT)
            except (UsageError, OSError):
                continue  # a damaged capture: the report's capture line says what the record knew
            to_server = [f for f in flows if f.direction == pcap.TO_SERVER]
            if not to_server:
                continue
            largest = max(to_server, key=lambda f: f.highest_end_bytes)
            mode = client.get("mode") or by_id[case_id].experiment.group(group_name).mode
            title = run_label(run) + case_id + (f" · group {group_name}" if several_groups else "") + \
                f" (r{repetition})"
            panels.append(SequencePanel(title, f"{mode} client", mode, index, largest, len(to_server)))
    return panels


def draw_tseq(panels: Sequence[SequencePanel], runs: Sequence[LoadedRun], path: Path) -> None:
    """Each panel: data segments' sequence offsets against time, retransmissions, the ACK line."""
    shown = list(panels)[:kit.MAX_PANELS]
    with matplotlib.rc_context(kit.STYLE):
        fig, axes = kit.panel_grid(len(shown), 1 if len(shown) == 1 else 2, 3.2)
        for ax, panel in zip(axes, shown):
            flow = panel.flow
            largest = max(flow.highest_end_bytes, max(flow.ack_bytes, default=0), 1)
            divisor, unit = kit.bytes_unit(largest)
            colour = kit.mode_colour(panel.mode)
            new = [(t, e / divisor) for t, e, again in zip(flow.times_s, flow.seq_end_bytes, flow.retransmits)
                   if not again]
            again = [(t, e / divisor) for t, e, a in zip(flow.times_s, flow.seq_end_bytes, flow.retransmits) if a]
            if flow.ack_times_s:
                # The ACK line is what the server had received in order: a step until the next ACK.
                ax.plot(flow.ack_times_s, [b / divisor for b in flow.ack_bytes], color=ACK_COLOUR, lw=0.9,
                        drawstyle="steps-post", zorder=2)
            goodput = panel.goodput_bps()
            label = panel.label + (f", ≈ {kit.mbit_text(goodput / 1e6)}" if goodput else "")
            if panel.flows_to_server > 1:
                label += f" (largest of {panel.flows_to_server} connections)"
            ax.plot([t for t, _ in new], [e for _, e in new], color=colour, lw=1.2, zorder=3, label=label,
                    marker="." if len(new) <= MAX_DOTS else None, ms=3)
            if again:
                ax.plot([t for t, _ in again], [e for _, e in again], ls="none", marker="x", ms=4, mew=1.1,
                        color=RETRANSMIT_COLOUR, zorder=4, label=f"{len(again):,} retransmitted")
            ax.set_xlim(left=0)
            ax.set_ylim(bottom=0, top=largest / divisor * 1.15)
            ax.set_xlabel("time since the capture began (s)")
            ax.set_ylabel(f"sequence offset ({unit})")
            ax.set_title(panel.title)
            ax.legend(loc="upper left", frameon=True, framealpha=0.9)
        keys = [Line2D([], [], color=kit.KEY_COLOUR, lw=1.2, marker=".", label="new data (segment's end)"),
                Line2D([], [], color=RETRANSMIT_COLOUR, ls="none", marker="x", label="retransmitted segment"),
                Line2D([], [], color=ACK_COLOUR, lw=0.9, drawstyle="steps-post", label="acknowledged by the server")]
        kit.finish(fig, keys + kit.run_legend(runs, with_hatches=False),
                   "TCP time–sequence graph of the client's capture (slope = goodput)", path)


def caption(panels: Sequence[SequencePanel], runs: Sequence[LoadedRun]) -> str:
    """What to look for in a time–sequence graph."""
    return ("From each bulk case's (or streaming program's) first repetition that captured packets: the "
            "client's largest connection to the server, as captured on its eth0 and drawn as tcptrace "
            "draws it, each data segment at the sequence offset it ends at. The slope is the goodput; a flat "
            "step is time the sender sent nothing new (its program blocked, or the window was full and it waited for ACKs); red × are "
            "retransmissions; the grey step line is what the server had acknowledged, and the height between "
            "it and the data is the bytes in flight." + kit.panels_note(len(panels)))
