"""The errors an engine raises, whichever engine it is.

Each carries the sentence the user sees. Their classes say what the run does
next: an :class:`EngineError` ends the run (no later case could run either);
:class:`ContainerGone` and :class:`StartFailed` fail one case and the run goes on.
"""

from __future__ import annotations

from socklab.errors import EngineError, SocklabError


class LabEngineError(EngineError):
    """The engine could not do what the lab asked; the message says what."""


class ImageBuildFailed(EngineError):
    """The lab image could not be built; the message says why and what to do."""


class ContainerGone(SocklabError):
    """A container of the case vanished (removed from outside): the case fails, the run goes on."""


class StartFailed(SocklabError):
    """A case's containers did not all start (or never became ready): the case fails, the run goes on."""


__all__ = ["ContainerGone", "EngineError", "ImageBuildFailed", "LabEngineError", "StartFailed"]
