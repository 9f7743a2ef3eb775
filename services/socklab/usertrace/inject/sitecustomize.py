"""Run by the interpreter at start (this directory is first on PYTHONPATH, see
socklab.usertrace.child_env): trace the program's socket calls, then run the
``sitecustomize`` this one hides (Debian ships one), so that the interpreter
otherwise behaves as it would have.

Tracing never stops the program: if it cannot start, one line on stderr says
why (``socklab: tracing is off: <why>``) and the program runs untraced.
"""

import os
import sys

_ENV_TRACE_FILE = "SOCKLAB_TRACE_FILE"  # socklab.usertrace.ENV_TRACE_FILE, which may not import


def _trace() -> None:
    if not os.environ.get(_ENV_TRACE_FILE):
        return
    try:
        from socklab.usertrace import install_from_env

        install_from_env()
    except Exception as exc:  # noqa: BLE001 - whatever it is, the program runs on untraced
        os.environ.pop(_ENV_TRACE_FILE, None)  # nor do the programs it starts try again
        why = " ".join(str(exc).split()) or type(exc).__name__
        sys.stderr.write(f"socklab: tracing is off: {why}\n")
        sys.stderr.flush()


def _hidden_sitecustomize() -> None:
    """Import the next ``sitecustomize`` on sys.path after this directory, as site.py would have."""
    import importlib.machinery
    import importlib.util

    here = os.path.dirname(os.path.realpath(__file__))

    def is_here(entry: object) -> bool:
        try:
            return isinstance(entry, str) and os.path.realpath(entry or os.getcwd()) == here
        except (OSError, ValueError):
            return False

    entries = list(sys.path)
    mine = [i for i, entry in enumerate(entries) if is_here(entry)]
    later = [entry for entry in entries[mine[0] + 1 if mine else 0:] if isinstance(entry, str) and not is_here(entry)]
    try:
        spec = importlib.machinery.PathFinder.find_spec("sitecustomize", later)
        if spec is None or spec.loader is None:
            return
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
    except Exception as exc:  # noqa: BLE001 - as site.py reports a failing sitecustomize
        if sys.flags.verbose:
            sys.excepthook(*sys.exc_info())
        else:
            sys.stderr.write(f"Error in sitecustomize; set PYTHONVERBOSE for traceback:\n"
                             f"{type(exc).__name__}: {exc}\n")
        return
    globals()["hidden"] = module  # kept, as site.py keeps its sitecustomize in sys.modules


_trace()
_hidden_sitecustomize()
