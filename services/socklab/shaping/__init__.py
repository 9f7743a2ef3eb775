"""Link shaping inside a lab container: model, tc plans, backends, executor, CLI.

Commands are built by pure functions (``build_plan``, ``build_teardown``) and
run in one place (``runner.run``), in the manner of Mininet's link.py. The
userspace backend's delay line (``delayline``, over the netlink client in
``nfqueue``) is one of those commands: a process that outlives the command.
"""

from .backends import Backend, NetemBackend, UserspaceBackend, build_plan, choose_backend, get_backend
from .caps import Capabilities, probe_capabilities
from .cli import main
from .commands import (apply_from_env, apply_spec, remove_link, set_link, show_link, stop_delay_line,
                       teardown)
from .model import (
    LinkChanges,
    LinkShape,
    LinkSpec,
    LinkValueError,
    assignments_from_changes,
    backend_from_env,
    changes_from_assignments,
    changes_from_env,
    changes_from_mapping,
    env_from_changes,
    link_spec_from_env,
    link_spec_from_mapping,
    seed_from_env,
)
from .plan import build_teardown
from .runner import Runner, ShapingError, run
from .show import counts_since, qdisc_stats

__all__ = [
    "Backend", "Capabilities", "LinkChanges", "LinkShape", "LinkSpec", "LinkValueError", "NetemBackend", "Runner",
    "UserspaceBackend", "ShapingError", "apply_from_env", "apply_spec", "assignments_from_changes",
    "backend_from_env", "build_plan", "build_teardown", "changes_from_assignments", "changes_from_env",
    "changes_from_mapping", "choose_backend", "env_from_changes", "get_backend", "link_spec_from_env",
    "link_spec_from_mapping", "main", "probe_capabilities", "qdisc_stats", "counts_since", "remove_link", "run",
    "seed_from_env", "set_link", "show_link", "stop_delay_line", "teardown",
]
