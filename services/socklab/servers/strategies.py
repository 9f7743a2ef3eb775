"""The server's modes: each name is one Strategy, the three readiness modes one per poller."""

from __future__ import annotations

from functools import partial
from typing import Callable

from ..pollers import POLLERS
from .asyncio_protocols import AsyncioStrategy
from .blocking import BlockingStrategy, ThreadedStrategy
from .lifecycle import Strategy
from .reactor import ReactorStrategy

STRATEGIES: dict[str, Callable[[], Strategy]] = {
    "blocking": BlockingStrategy,
    "threaded": ThreadedStrategy,
    **{name: partial(ReactorStrategy, poller) for name, poller in POLLERS.items()},
    "asyncio": AsyncioStrategy,
}
MODES = tuple(STRATEGIES)
