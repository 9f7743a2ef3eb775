"""The engine boundary: the interface the orchestrator runs cases through, and how one is picked.

See :mod:`labkit.engine.base` for the interface; :mod:`labkit.engine.compose`
is the Compose + Docker SDK implementation.
"""

from __future__ import annotations

from .base import LAB_LABEL, Engine, Finding, Lab, LabContainer, LabObject, RoleHandle, entry_argv
from .errors import ContainerGone, EngineError, ImageBuildFailed, LabEngineError, StartFailed

__all__ = ["ContainerGone", "Engine", "EngineError", "Finding", "ImageBuildFailed", "LAB_LABEL", "Lab",
           "LabContainer", "LabEngineError", "LabObject", "RoleHandle", "StartFailed", "entry_argv",
           "ENGINES", "open_engine"]


ENGINES = ("compose", "swarm")


def open_engine(name: str = "compose", *, image: str | None = None) -> Engine:
    """The engine ``lab.py`` runs on (``--engine``): the one place that picks it.

    ``image``: the image a swarm's tasks run (``--image``; Compose builds its own).
    Nothing is contacted yet; the first call that needs the engine says so if
    it cannot be reached.
    """
    if name == "swarm":
        from .swarm import SwarmEngine

        return SwarmEngine(image=image)
    from .compose import ComposeEngine

    return ComposeEngine()
