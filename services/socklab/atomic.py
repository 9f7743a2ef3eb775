"""Files replaced whole or not at all: a reader sees the old file or the new one.

One helper for every file the lab rewrites while something may read it (a
trace, a result line, the link's state, meta.json, a report, a plot), on both
sides: the orchestrator imports it from here, so it is stdlib-only.
"""

from __future__ import annotations

import contextlib
import os
import secrets
from pathlib import Path
from typing import IO, Any, Iterator


@contextlib.contextmanager
def replacing(path: str | os.PathLike[str], mode: str = "w", *, durable: bool = False,
              **open_kwargs: Any) -> Iterator[IO[Any]]:
    """A file to write ``path``'s new content into; it replaces ``path`` when the
    block ends without an exception, and is removed if it raises.

    The temporary file is a unique name beside ``path`` (two writers never share
    it) created with the usual permissions (umask applies, as for ``open``).
    ``durable`` syncs the data before the rename, so that even a machine crash
    leaves the old or the new file: for what a synced record will name. Without
    it readers still never see half a file, at no cost in the measured run.
    """
    if mode not in ("w", "wb"):
        raise ValueError(f"replacing() writes a whole file: mode 'w' or 'wb', not {mode!r}")
    target = Path(path)
    tmp = target.with_name(f".{target.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
    if mode == "w":
        open_kwargs.setdefault("encoding", "utf-8")
    fh = open(tmp, mode.replace("w", "x"), **open_kwargs)
    try:
        with fh:
            yield fh
            if durable:
                fh.flush()
                os.fsync(fh.fileno())
        os.replace(tmp, target)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def write_atomic(path: str | os.PathLike[str], data: str | bytes, *, durable: bool = False) -> None:
    """Replace ``path`` with ``data`` (text as UTF-8) atomically (see :func:`replacing`)."""
    with replacing(path, "wb" if isinstance(data, bytes) else "w", durable=durable) as fh:
        fh.write(data)
