"""A benchmark's roles and links, as lab.py would start them: an experiment rendered by labkit.scenario.

Every server's and client's arguments and every container's link environment
come from an :class:`~labkit.config.Experiment` loaded (and checked) as
``lab.py`` loads one, rendered by :mod:`labkit.scenario`. What a benchmark
needs beyond what an experiment can say (a listen backlog, another port or
host, a longer idle timeout) is set on top of that argv by :func:`with_options`,
never by writing the command by hand. Pure functions, apart from reading the
probes' sources.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Mapping, Sequence

import common  # noqa: F401  (the orchestrator on the path)
from labkit import scenario
from labkit.config import Experiment, load_experiment_text

# A role started as a program in a running container (`docker exec`), without
# the entrypoint (which would shape the link again and drop privileges itself).
SOCKLAB = ("python3", "-m", "socklab")


PROBES = Path(__file__).resolve().parent / "probes"
# What one benchmark container may hold (lab.py's container_memory): the bulk
# points send payloads of up to 4 GiB (bench/fidelity.py, twice that while the
# payload is built), on a machine with more memory than the lab's 1 GiB default
# assumes of a user's.
CONTAINER_MEMORY = "10GiB"


def experiment(server: Mapping | None = None, *clients: Mapping, name: str = "bench") -> Experiment:
    """An experiment from settings written as in lab.py's YAML, loaded and checked as lab.py loads it.

    ``clients`` are client groups (``{"name": "load", "mode": "poll", ...}``);
    without one, a single default group.
    """
    document = {"name": name, "container_memory": CONTAINER_MEMORY, "server": dict(server or {}),
                "clients": [dict(group) for group in clients] or [{"name": "load"}]}
    # JSON is YAML: the loader reads it with its line numbers, for its messages.
    return load_experiment_text(json.dumps(document, indent=1), f"bench/{name}.yaml")


def with_options(argv: Sequence[str], options: Mapping[str, object]) -> list[str]:
    """``argv`` with each ``--flag value`` of ``options``: replaced where argv has the flag, else appended.

    For what a benchmark needs beyond what an experiment can say (a listen
    backlog, another port or host, a longer idle timeout).
    """
    result = list(argv)
    for flag, value in options.items():
        if flag in result:
            result[result.index(flag) + 1] = str(value)
        else:
            result += [flag, str(value)]
    return result


def server_argv(server: Mapping, *clients: Mapping, options: Mapping[str, object] | None = None) -> list[str]:
    """The server role's arguments as lab.py gives them for ``server`` and ``clients``, with ``options`` set."""
    return with_options(scenario.server_argv(experiment(server, *clients)), options or {})


def client_argv(group: Mapping, options: Mapping[str, object] | None = None, *, trace: bool = False) -> list[str]:
    """A client group's role arguments as lab.py gives them (no trace unless asked), with ``options`` set."""
    (built,) = experiment(None, {"name": "load", **group}).clients
    return with_options(scenario.client_argv(built, trace=trace), options or {})


def link_env(**link: object) -> dict[str, str]:
    """The ``SOCKLAB_LINK_*`` variables of a container whose link is ``link`` (lab.py's link keys).

    ``link_env()`` is an unshaped link; every variable is present, so nothing
    of compose.yaml's defaults leaks into a benchmark's link.
    """
    (group,) = experiment(None, {"name": "load", "link": link}).clients
    return scenario.link_env(group.link)


def probe_command(name: str, *args: object) -> list[str]:
    """``python3 -c SOURCE ARGS``: the program bench/probes/NAME.py, run where the image has none of it."""
    return ["python3", "-c", (PROBES / f"{name}.py").read_text(encoding="utf-8"), *map(str, args)]
