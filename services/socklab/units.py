"""Parsing of the lab's units: sizes, durations, rates and percentages.

The one place units are understood; the orchestrator and the container side both
use it. Each parser takes the text a user wrote (or a plain number where that is
unambiguous) and returns a number in the unit its name states.
"""

from __future__ import annotations

import math
import re
from decimal import Decimal

from .errors import UsageError

_NUMBER = r"(?P<num>[0-9]+(?:\.[0-9]*)?|\.[0-9]+)"

_SIZE_FACTORS = {
    "": 1, "b": 1,
    "kb": 1000, "mb": 1000**2, "gb": 1000**3,
    "kib": 1024, "mib": 1024**2, "gib": 1024**3,
}
_DURATION_FACTORS = {"us": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0, "min": 60.0, "h": 3600.0}
_RATE_FACTORS = {"bit": 1, "kbit": 1000, "mbit": 1000**2, "gbit": 1000**3, "tbit": 1000**4}


def _split(text: object, what: str, allowed: str) -> tuple[float, str]:
    if isinstance(text, bool) or not isinstance(text, (str, int, float)):
        raise UsageError(f"{text!r} is not {what}: use {allowed}")
    if isinstance(text, (int, float)):
        if not math.isfinite(text):
            raise UsageError(f"{text!r} is not {what}: use {allowed}")
        return float(text), ""
    m = re.fullmatch(_NUMBER + r"\s*(?P<unit>[A-Za-z%]*)", text.strip())
    if not m:
        raise UsageError(f"{text!r} is not {what}: use {allowed}")
    return float(m.group("num")), m.group("unit")


def parse_size_bytes(text: object) -> int:
    """'1500', '64KiB', '128MiB', '1GB' -> bytes (an int >= 0)."""
    allowed = "a whole number of bytes or one with B, KB, KiB, MB, MiB, GB or GiB (e.g. 64KiB)"
    value, unit = _split(text, "a size", allowed)
    factor = _SIZE_FACTORS.get(unit.lower())
    if factor is None:
        raise UsageError(f"{text!r} is not a size: use {allowed}")
    result = value * factor
    if result != int(result):
        raise UsageError(f"{text!r} is not a whole number of bytes: use {allowed}")
    return int(result)


def parse_duration_s(text: object, *, bare_unit_s: float | None = None) -> float:
    """'20ms', '1.5s', '2m' -> seconds.

    A bare number is accepted only where the caller names its unit
    (``bare_unit_s``), since '20' alone is ambiguous in a config file.
    """
    allowed = "a number with us, ms, s, m or h (e.g. 20ms, 1.5s)"
    value, unit = _split(text, "a duration", allowed)
    if unit == "":
        if bare_unit_s is None and value != 0:
            raise UsageError(f"{text!r} is not a duration: use {allowed}")
        return value * (bare_unit_s or 1.0)
    factor = _DURATION_FACTORS.get(unit.lower())
    if factor is None:
        raise UsageError(f"{text!r} is not a duration: use {allowed}")
    return value * factor


def parse_rate_bps(text: object) -> int:
    """'10mbit', '1gbit', '512kbit' -> bits per second (tc's decimal units).

    tc's 'bps' means bytes per second, which users routinely misread; it is
    rejected rather than guessed.
    """
    allowed = "a number with bit, kbit, mbit or gbit (e.g. 10mbit)"
    value, unit = _split(text, "a rate", allowed)
    factor = _RATE_FACTORS.get(unit.lower())
    if factor is None:
        raise UsageError(f"{text!r} is not a rate: use {allowed}")
    bps = value * factor
    if bps <= 0:
        raise UsageError(f"{text!r} is not a rate: it must be above zero")
    return int(round(bps))


def parse_percent(text: object) -> float:
    """'0.1%' -> 0.1 (percent, 0..100). A bare number is read as percent too."""
    allowed = "a percentage from 0% to 100% (e.g. 0.1%)"
    value, unit = _split(text, "a percentage", allowed)
    if unit not in ("", "%") or not 0 <= value <= 100:
        raise UsageError(f"{text!r} is not a percentage: use {allowed}")
    return value


def format_rate(rate_bps: int) -> str:
    """Bits per second as the shortest exact tc rate ('10mbit', '1500kbit')."""
    for unit, factor in (("gbit", 1000**3), ("mbit", 1000**2), ("kbit", 1000)):
        if rate_bps % factor == 0:
            return f"{rate_bps // factor}{unit}"
    return f"{rate_bps}bit"


def format_duration(seconds: float) -> str:
    """Seconds as a tc time ('20ms', '1500us'), exact to the microsecond."""
    us = int(round(seconds * 1e6))
    if us % 1000 == 0:
        return f"{us // 1000}ms"
    return f"{us}us"


def format_number(number: float) -> str:
    """A number in the shortest digits that read back to it, never with an exponent
    (which the parsers above do not accept): 1.1 -> '1.1', 20.0 -> '20', 1e-05 -> '0.00001'."""
    # Decimal(repr()) keeps repr's shortest round-tripping digits.
    text = format(Decimal(repr(float(number))), "f")
    return text[:-2] if text.endswith(".0") else text
