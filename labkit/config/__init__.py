"""Experiment files (`configs/*.yaml`): load, validate, resolve into typed objects.

Every error names the file, the line and the key, and says what is allowed::

    configs/x.yaml:12: clients[0].link.rate: '10mbps' is not a rate: use a number with bit, kbit, mbit or gbit (e.g. 10mbit)

The package, one concept a module:

- :mod:`.raw` — the YAML walk: frozen data with every value's line (:class:`RawConfig`);
- :mod:`.fields` — each key's parser, default and renderer (units by ``socklab.units``,
  link values by the container's link model ``socklab.shaping.model``);
- :mod:`.experiment` — the typed model (:class:`Experiment` and its parts), values in
  numbers with their unit in the field name (``timeout_s``, ``rate_bps``, ``delay_ms``);
- :mod:`.settings` — dotted setting keys of the matrix, ``--set`` and ``expect.when``
  (``clients.NAME.link.up.rate``: a group by its name, not its position);
- :mod:`.limits` — the loads no container can carry;
- :mod:`.builder` — RawConfig → Experiment, refusing what a container would refuse.

Defaults not fixed by SPEC.md are chosen in :mod:`.fields`: ``timeout`` 300s; a
client's ``workload`` is bulk (the tutorial) and its ``socket_timeout`` (the timeout
of the ``timeout`` mode's ``settimeout()``) 1s; the slow workload trickles 100 bytes
per second and holds the connection 10s; ``container_memory`` 1GiB (see limits).
"""

from .builder import build_experiment, load_experiment, load_experiment_text
from .errors import ConfigError
from .experiment import (ClientGroup, Condition, Expectation, Experiment, LinkConfig, LinkDirection, MatrixAxis,
                         Program, ScheduleStep, ServerConfig, Workload)
from .fields import CLIENT_MODES, LINK_BACKENDS, SERVER_MODES, WORKLOAD_KINDS
from .raw import KeyPath, Origin, RawConfig, parse_raw, read_raw
from .settings import apply_overrides, substitute

__all__ = [
    "CLIENT_MODES", "ClientGroup", "Condition", "ConfigError", "Expectation", "Experiment", "KeyPath",
    "LINK_BACKENDS", "LinkConfig", "LinkDirection", "MatrixAxis", "Origin", "Program", "RawConfig", "SERVER_MODES",
    "ScheduleStep", "ServerConfig", "WORKLOAD_KINDS", "Workload", "apply_overrides", "build_experiment",
    "load_experiment", "load_experiment_text", "parse_raw", "read_raw", "substitute",
]
