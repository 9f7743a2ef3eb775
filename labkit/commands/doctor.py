"""`lab.py doctor`: every check of the engine, the image and the kernel, each reported even after one fails."""

from __future__ import annotations

import json

from socklab.errors import SocklabError

from .. import engine as engines
from .common import say

FAILED_EXIT = 3  # the engine cannot run the lab


def _line(name: str, text: str) -> None:
    say(f"{name + ':':<17}{text}")


def _kernel(caps: dict) -> list[str]:
    """Print what the kernel offers and which backend links get; the problems found."""
    q = caps["qdiscs"]
    mark = {True: "yes", False: "no"}
    _line("kernel qdiscs", ", ".join(f"{name} {mark[bool(ok)]}" for name, ok in q.items())
          + (" (kernel module sch_netem is missing)" if not q.get("netem") else ""))
    _line("ifb device", f"{mark[bool(caps.get('ifb'))]};  u32 filter: {mark[bool(caps.get('u32'))]};  "
                        f"mirred: {mark[bool(caps.get('mirred'))]};  NFQUEUE: {mark[bool(caps.get('nfqueue'))]}")
    _line("capabilities", "containers get NET_ADMIN only; workloads run unprivileged")
    problems = []
    if not (q.get("tbf") and caps.get("ifb") and caps.get("mirred")):
        problems.append("this kernel lacks tbf, ifb or mirred, which every link with a rate needs")
    if q.get("netem"):
        _line("shaping backend", "netem (rate by tbf; delay, jitter and loss by sch_netem)")
    elif caps.get("nfqueue"):
        _line("shaping backend", "userspace (rate by tbf; delay, jitter and loss by a delay line fed through "
                                 "NFQUEUE, since this kernel has no sch_netem)")
    else:
        _line("shaping backend", "netem for rate only (tbf): this kernel has neither sch_netem nor NFQUEUE, so "
                                 "links asking for delay, jitter or loss cannot be shaped here")
    return problems


def cmd_doctor(args) -> int:
    """Check the engine, build the image, probe the kernel; say which shaping backend links get.

    Every check is reported; one that needs what failed says so instead of
    running. Exit 3 if any failed.
    """
    engine = engines.open_engine(args.engine, image=getattr(args, "image", None))
    failed = 0
    findings = engine.health()
    for finding in findings:
        _line(finding.name, f"ok ({finding.detail})" if finding.ok else f"FAILED — {finding.detail}")
        failed += not finding.ok
    image_ok = False
    if failed:
        _line("lab image", "not checked: it needs the engine")
    else:
        _line("lab image", "building (cached layers make this quick)")
        try:
            engine.build_image()
            image_ok = True
            _line("lab image", "ok")
        except SocklabError as exc:
            _line("lab image", f"FAILED — {exc}")
            failed += 1
    if not image_ok:
        _line("kernel", "not checked: it needs the lab image")
        return FAILED_EXIT
    try:
        caps = json.loads(engine.probe(["shape", "caps", "--json"]))
    except (SocklabError, ValueError) as exc:
        _line("kernel", f"FAILED — the probe container did not say what the kernel offers: {exc}")
        return FAILED_EXIT
    problems = _kernel(caps)
    for problem in problems:
        _line("problem", problem)
    return FAILED_EXIT if failed or problems else 0
