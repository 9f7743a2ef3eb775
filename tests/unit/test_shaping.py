"""Link shaping: parsing, exact tc plans, backend choice, the executor, and the real thing.

Pure tests need nothing. Tests marked ``netns`` run as root on this host inside
two network namespaces they create (joined by a veth pair with 10.x addresses
that exist only there) and delete afterwards; no host interface is touched.
"""

from __future__ import annotations

import io
import json
import os
import secrets
import subprocess
import sys
from contextlib import redirect_stdout
from pathlib import Path

import pytest

from socklab.errors import EngineError, UsageError
from socklab.shaping import (
    Capabilities,
    LinkShape,
    LinkSpec,
    LinkValueError,
    ShapingError,
    assignments_from_changes,
    changes_from_env,
    changes_from_mapping,
    env_from_changes,
    apply_from_env,
    apply_spec,
    backend_from_env,
    build_plan,
    build_teardown,
    teardown,
    changes_from_assignments,
    choose_backend,
    link_spec_from_env,
    link_spec_from_mapping,
    main,
    probe_capabilities,
    run,
    set_link,
    seed_from_env,
    show_link,
)
from socklab.shaping.plan import qdisc_teardown, tcp_ceiling_bps
from socklab.shaping.runner import prefixed
from socklab.shaping.show import link_mtus, parse_qdisc_json, parse_qdisc_text

SERVICES = Path(__file__).resolve().parents[2] / "services"

ALL_CAPS = Capabilities(netem=True, tbf=True, htb=True, ingress=True, ifb=True, u32=True, mirred=True, nfqueue=True)
# This CI host's kernel: everything but netem.
NO_NETEM = Capabilities(netem=False, tbf=True, htb=True, ingress=True, ifb=True, u32=True, mirred=True, nfqueue=True)

REDIRECT = ["tc", "filter", "add", "dev", "eth0", "parent", "ffff:", "protocol", "all", "u32", "match", "u32",
            "0", "0", "action", "mirred", "egress", "redirect", "dev", "ifb0"]
IFB_UP = [["ip", "link", "add", "ifb0", "type", "ifb"], ["ip", "link", "set", "dev", "ifb0", "up"]]
INGRESS = ["tc", "qdisc", "add", "dev", "eth0", "handle", "ffff:", "ingress"]


# --- parsing -------------------------------------------------------------------


def test_top_level_values_apply_to_both_directions():
    spec = link_spec_from_mapping({"rate": "10mbit", "delay": "20ms", "jitter": "5ms", "loss": "0.1%", "limit": 1000})
    expected = LinkShape(rate_bps=10_000_000, delay_ms=20.0, jitter_ms=5.0, loss_pct=0.1, limit_pkts=1000)
    assert spec == LinkSpec(up=expected, down=expected)
    assert spec.round_trip_ms() == 50.0


def test_direction_overrides_win_over_top_level():
    spec = link_spec_from_mapping({"rate": "10mbit", "delay": "20ms", "up": {"rate": "1mbit"},
                                   "down": {"rate": "20mbit", "loss": 1}})
    assert spec.up == LinkShape(rate_bps=1_000_000, delay_ms=20.0)
    assert spec.down == LinkShape(rate_bps=20_000_000, delay_ms=20.0, loss_pct=1.0)


def test_one_direction_only_leaves_the_other_unshaped():
    spec = link_spec_from_mapping({"down": {"rate": "512kbit"}})
    assert spec.up == LinkShape() and not spec.up.shaped
    assert spec.down == LinkShape(rate_bps=512_000)
    assert link_spec_from_mapping({}) == LinkSpec() and not LinkSpec().shaped


def test_rate_none_lifts_an_inherited_rate():
    spec = link_spec_from_mapping({"rate": "10mbit", "delay": "5ms", "up": {"rate": "none"}})
    assert spec.up == LinkShape(delay_ms=5.0)


@pytest.mark.parametrize("description,message", [
    ({"rat": "1mbit"}, "link: unknown key 'rat'; allowed keys are rate, delay, jitter, loss, limit, up, down"),
    ({"up": {"rate": "1mbit", "bogus": 1}}, "link.up: unknown key 'bogus'; allowed keys are rate, delay, jitter, loss, limit"),
    ({"up": "1mbit"}, "link.up: expected a mapping with keys rate, delay, jitter, loss, limit, got '1mbit'"),
    ({"rate": "10"}, "link.rate: '10' is not a rate: use a number with bit, kbit, mbit or gbit (e.g. 10mbit)"),
    ({"rate": "10MBps"}, "link.rate: '10MBps' is not a rate"),
    ({"down": {"delay": "20"}}, "link.down.delay: '20' is not a duration: use a number with us, ms, s, m or h"),
    ({"loss": "150%"}, "link.loss: '150%' is not a percentage: use a percentage from 0% to 100%"),
    ({"limit": 0}, "link.limit: 0 is too small: use a whole number of packets, at least 1"),
    ({"limit": True}, "link.limit: True is not a queue length"),
    ({"limit": "12.5"}, "link.limit: '12.5' is not a queue length"),
    ({"delay": "2ms", "jitter": "5ms"},
     "link.jitter: jitter 5ms is larger than the up delay 2ms; a packet cannot leave before it was sent"),
    ({"delay": "10ms", "jitter": "5ms", "down": {"delay": "1ms"}},
     "link.jitter: jitter 5ms is larger than the down delay 1ms"),
    ({"up": {"limit": 100}, "down": {"rate": "1mbit"}},
     "link.up.limit: limit 100 has no effect on the up direction without rate, delay, jitter or loss"),
    ("10mbit", "link: expected a mapping with keys rate, delay, jitter, loss, limit, up, down, got '10mbit'"),
])
def test_bad_descriptions_name_the_key_and_what_is_allowed(description, message):
    with pytest.raises(UsageError) as err:
        link_spec_from_mapping(description)
    assert str(err.value).startswith(message)


def test_environment_with_empty_values_as_unset():
    environ = {
        "SOCKLAB_LINK_RATE": "10mbit", "SOCKLAB_LINK_DELAY": "20ms", "SOCKLAB_LINK_JITTER": "",
        "SOCKLAB_LINK_LOSS": " ", "SOCKLAB_LINK_UP_RATE": "1mbit", "SOCKLAB_LINK_DOWN_LOSS": "0.5%",
        "SOCKLAB_LINK_DOWN_LIMIT": "200", "SOCKLAB_LINK_BACKEND": "", "PATH": "/bin",
    }
    spec = link_spec_from_env(environ)
    assert spec.up == LinkShape(rate_bps=1_000_000, delay_ms=20.0)
    assert spec.down == LinkShape(rate_bps=10_000_000, delay_ms=20.0, loss_pct=0.5, limit_pkts=200)
    assert backend_from_env(environ) == "auto"
    assert backend_from_env({"SOCKLAB_LINK_BACKEND": "NetEm"}) == "netem"
    assert link_spec_from_env({"SOCKLAB_LINK_RATE": ""}) == LinkSpec()


@pytest.mark.parametrize("environ,message", [
    ({"SOCKLAB_LINK_DOWN_DELAY": "20"}, "SOCKLAB_LINK_DOWN_DELAY: '20' is not a duration"),
    ({"SOCKLAB_LINK_RATE": "fast"}, "SOCKLAB_LINK_RATE: 'fast' is not a rate"),
    ({"SOCKLAB_LINK_DELAYS": "20ms"}, "SOCKLAB_LINK_DELAYS: unknown link setting; use SOCKLAB_LINK_{RATE,DELAY,"),
    ({"SOCKLAB_LINK_UP_JITTER": "1ms"}, "SOCKLAB_LINK_UP_JITTER: jitter 1ms is larger than the up delay 0ms"),
])
def test_bad_environment_names_the_variable(environ, message):
    with pytest.raises(UsageError) as err:
        link_spec_from_env(environ)
    assert str(err.value).startswith(message)
    with pytest.raises(UsageError, match=r"^SOCKLAB_LINK_BACKEND: 'tc' is not a shaping backend: use auto, netem, userspace"):
        backend_from_env({"SOCKLAB_LINK_BACKEND": "tc"})


SEED_ALLOWED = "is not a seed: use an integer such as 42, or leave it unset for different draws on every run"


def test_seed_is_an_integer_setting_of_its_own():
    assert seed_from_env({}) is None
    assert seed_from_env({"SOCKLAB_LINK_SEED": " "}) is None
    assert seed_from_env({"SOCKLAB_LINK_SEED": " 42 "}) == 42
    assert seed_from_env({"SOCKLAB_LINK_SEED": "-7"}) == -7
    # Known, so not refused as a misspelt link value, and it shapes nothing.
    assert link_spec_from_env({"SOCKLAB_LINK_SEED": "42"}) == LinkSpec()


@pytest.mark.parametrize("value", ["forty-two", "4.2", "1e3", "1_000", "0x10", "\u0664\u0662", "42 43"])
def test_a_bad_seed_names_the_variable_and_what_is_allowed(value):
    with pytest.raises(UsageError) as err:
        seed_from_env({"SOCKLAB_LINK_SEED": value})
    assert str(err.value) == f"SOCKLAB_LINK_SEED: {value!r} {SEED_ALLOWED}"
    assert err.value.exit_code == 2


def test_a_bad_seed_stops_the_command_with_one_sentence_and_exit_code_2():
    env = {k: v for k, v in os.environ.items() if not k.startswith("SOCKLAB_")}
    env.update({"PYTHONPATH": str(SERVICES), "SOCKLAB_LINK_LOSS": "1%", "SOCKLAB_LINK_SEED": "forty-two"})
    done = subprocess.run([sys.executable, "-m", "socklab", "shape", "plan", "--from-env"], env=env,
                          capture_output=True, text=True, timeout=60)
    assert (done.returncode, done.stdout) == (2, "")
    assert done.stderr == f"socklab: SOCKLAB_LINK_SEED: 'forty-two' {SEED_ALLOWED}\n"


def test_assignments_set_both_directions_or_one():
    changes, backend = changes_from_assignments(["rate=5mbit", "up.rate=1mbit", "down.delay=20ms", "backend=netem"])
    base = link_spec_from_mapping({"rate": "10mbit", "loss": "1%"})
    spec = changes.resolve(base)
    assert backend == "netem"
    assert spec.up == LinkShape(rate_bps=1_000_000, loss_pct=1.0)
    assert spec.down == LinkShape(rate_bps=5_000_000, delay_ms=20.0, loss_pct=1.0)
    for word, message in [("rate", "'rate' is not KEY=VALUE"), ("sideways.rate=1mbit", "sideways.rate: unknown link key"),
                          ("up.up=1", "up.up: unknown link key"), ("backend=fast", "backend: 'fast' is not a shaping backend")]:
        with pytest.raises(UsageError, match="^" + message):
            changes_from_assignments([word])


ROUND_TRIP_LINKS = [
    {},
    {"rate": "10mbit", "delay": "20ms", "jitter": "5ms", "loss": "0.1%", "limit": 1000},
    {"rate": "1500kbit", "delay": "1.1ms", "up": {"rate": "none", "jitter": "0.25ms"},
     "down": {"loss": "0.001%", "limit": 5}},
    {"down": {"delay": "250us", "rate": "999bit"}, "up": {"limit": "off", "delay": "1.5s"}},
]


@pytest.mark.parametrize("description", ROUND_TRIP_LINKS)
def test_rendered_variables_and_words_parse_back_to_the_same_changes(description):
    changes = changes_from_mapping(description)
    env = env_from_changes(changes, "userspace")
    assert len(env) == 16 and all(name.startswith("SOCKLAB_LINK_") for name in env)
    again = changes_from_env(env)
    assert (again.top, again.per_direction) == (changes.top, changes.per_direction)
    assert backend_from_env(env) == "userspace"
    words, backend = changes_from_assignments(assignments_from_changes(changes, "netem"))
    assert (words.top, words.per_direction, backend) == (changes.top, changes.per_direction, "netem")
    assert changes_from_env(env).resolve() == words.resolve() == changes.resolve()


def test_rendering_spells_values_as_written_and_leaves_unset_ones_empty():
    changes = changes_from_mapping({"rate": "10mbit", "delay": "20ms", "up": {"rate": "none"}})
    env = env_from_changes(changes)
    assert (env["SOCKLAB_LINK_RATE"], env["SOCKLAB_LINK_DELAY"], env["SOCKLAB_LINK_UP_RATE"]) == (
        "10mbit", "20ms", "none")
    assert env["SOCKLAB_LINK_JITTER"] == env["SOCKLAB_LINK_DOWN_RATE"] == "" and env["SOCKLAB_LINK_BACKEND"] == "auto"
    assert assignments_from_changes(changes) == ["rate=10mbit", "delay=20ms", "up.rate=none"]


def test_a_change_is_blamed_for_what_it_does_to_the_link_it_changes():
    base = link_spec_from_mapping({"delay": "10ms", "jitter": "5ms", "limit": 100, "rate": "1mbit"})
    changes, _ = changes_from_assignments(["up.delay=2ms"])
    with pytest.raises(LinkValueError) as err:
        changes.resolve(base)
    assert (err.value.label, str(err.value)) == (
        "up.delay", "up.delay: jitter 5ms is larger than the up delay 2ms; a packet cannot leave before it "
                    "was sent, so the delay must be at least the jitter")
    changes, _ = changes_from_assignments(["rate=none", "delay=0ms", "jitter=0ms"])
    with pytest.raises(LinkValueError, match=r"^rate: limit 100 has no effect on the up direction"):
        changes.resolve(base)


def test_spec_round_trips_through_its_dict_form():
    spec = link_spec_from_mapping({"rate": "10mbit", "delay": "20ms", "down": {"loss": "0.1%", "limit": 50}})
    assert spec.to_dict() == {"up": {"rate_bps": 10_000_000, "delay_ms": 20.0},
                              "down": {"rate_bps": 10_000_000, "delay_ms": 20.0, "loss_pct": 0.1, "limit_pkts": 50}}
    assert LinkSpec.from_dict(json.loads(json.dumps(spec.to_dict()))) == spec
    assert spec.describe() == "up rate 10mbit delay 20ms, down rate 10mbit delay 20ms loss 0.1% limit 50"


# --- plans ---------------------------------------------------------------------
# Expected numbers: burst = max(10 frames = 15140 B, rate/8 * 4 ms); queue = the
# round trip (at least 20 ms) times the rate, in 1514 B frames, at least 16;
# netem's limit = queue + 2 * (rate * (delay + jitter) in frames).


def test_plan_up_only_rate():
    spec = link_spec_from_mapping({"up": {"rate": "10mbit"}})
    # 10 Mbit/s * 20 ms = 25000 B = 17 frames = 25738 B.
    assert build_plan(spec, "netem") == [
        ["tc", "qdisc", "add", "dev", "eth0", "root", "handle", "1:", "tbf", "rate", "10mbit", "burst", "15140",
         "limit", "25738"],
    ]


def test_plan_down_only_goes_through_ifb_and_the_redirect_comes_last():
    spec = link_spec_from_mapping({"down": {"rate": "20mbit"}})
    # 20 Mbit/s * 20 ms = 50000 B = 34 frames = 51476 B.
    assert build_plan(spec, "netem") == [
        *IFB_UP,
        ["tc", "qdisc", "add", "dev", "ifb0", "root", "handle", "1:", "tbf", "rate", "20mbit", "burst", "15140",
         "limit", "51476"],
        INGRESS,
        REDIRECT,
    ]


def test_plan_both_directions_rate_only():
    spec = link_spec_from_mapping({"rate": "1gbit"})
    # At 1 Gbit/s the bucket is 4 ms of tokens (500000 B); 2.5 MB queue = 1652 frames.
    tbf = ["tbf", "rate", "1gbit", "burst", "500000", "limit", "2501128"]
    assert build_plan(spec, "netem", dev="veth1", ifb="ifb7") == [
        ["tc", "qdisc", "add", "dev", "veth1", "root", "handle", "1:", *tbf],
        ["ip", "link", "add", "ifb7", "type", "ifb"],
        ["ip", "link", "set", "dev", "ifb7", "up"],
        ["tc", "qdisc", "add", "dev", "ifb7", "root", "handle", "1:", *tbf],
        ["tc", "qdisc", "add", "dev", "veth1", "handle", "ffff:", "ingress"],
        ["tc", "filter", "add", "dev", "veth1", "parent", "ffff:", "protocol", "all", "u32", "match", "u32",
         "0", "0", "action", "mirred", "egress", "redirect", "dev", "ifb7"],
    ]


def test_plan_rate_delay_loss_puts_netem_under_tbf():
    spec = link_spec_from_mapping({"rate": "10mbit", "delay": "20ms", "loss": "0.1%"})
    # Round trip 40 ms: 50000 B = 34 frames (51476 B); delay line 25000 B = 17 frames; 34 + 2*17 = 68.
    tbf = ["tbf", "rate", "10mbit", "burst", "15140", "limit", "51476"]
    netem = ["netem", "delay", "20ms", "loss", "0.1%", "limit", "68"]
    assert build_plan(spec, "netem") == [
        ["tc", "qdisc", "add", "dev", "eth0", "root", "handle", "1:", *tbf],
        ["tc", "qdisc", "add", "dev", "eth0", "parent", "1:1", "handle", "10:", *netem],
        *IFB_UP,
        ["tc", "qdisc", "add", "dev", "ifb0", "root", "handle", "1:", *tbf],
        ["tc", "qdisc", "add", "dev", "ifb0", "parent", "1:1", "handle", "10:", *netem],
        INGRESS,
        REDIRECT,
    ]


def test_plan_asymmetric_link_with_jitter_and_user_limit():
    spec = link_spec_from_mapping({"delay": "20ms", "jitter": "5ms", "up": {"rate": "1mbit"},
                                   "down": {"rate": "20mbit", "limit": 100}})
    # Up: 1 Mbit/s * 50 ms is under 16 frames (24224 B); delay line 25 ms = 3 frames: 16 + 6 = 22.
    # Down: the user's 100 packets (151400 B), delay line 62500 B = 42 frames: 100 + 84 = 184.
    assert build_plan(spec, "netem") == [
        ["tc", "qdisc", "add", "dev", "eth0", "root", "handle", "1:", "tbf", "rate", "1mbit", "burst", "15140",
         "limit", "24224"],
        ["tc", "qdisc", "add", "dev", "eth0", "parent", "1:1", "handle", "10:", "netem", "delay", "20ms", "5ms",
         "limit", "22"],
        *IFB_UP,
        ["tc", "qdisc", "add", "dev", "ifb0", "root", "handle", "1:", "tbf", "rate", "20mbit", "burst", "15140",
         "limit", "151400"],
        ["tc", "qdisc", "add", "dev", "ifb0", "parent", "1:1", "handle", "10:", "netem", "delay", "20ms", "5ms",
         "limit", "184"],
        INGRESS,
        REDIRECT,
    ]


def test_plan_delay_without_rate_is_netem_alone():
    spec = link_spec_from_mapping({"up": {"delay": "1500us", "limit": 500}, "down": {"loss": "2%"}})
    assert build_plan(spec, "netem") == [
        ["tc", "qdisc", "add", "dev", "eth0", "root", "handle", "10:", "netem", "delay", "1500us", "limit", "500"],
        *IFB_UP,
        ["tc", "qdisc", "add", "dev", "ifb0", "root", "handle", "10:", "netem", "loss", "2%"],
        INGRESS,
        REDIRECT,
    ]


def test_unshaped_link_has_an_empty_plan():
    assert build_plan(LinkSpec(), "netem") == []


def test_teardown_removes_the_delay_line_then_root_ingress_and_ifb():
    mangle = ["iptables", "-w", "-t", "mangle"]
    assert build_teardown("eth0", "ifb0") == [
        [*mangle, "-D", "POSTROUTING", "-o", "eth0", "-j", "socklab-up"],
        [*mangle, "-F", "socklab-up"],
        [*mangle, "-X", "socklab-up"],
        [*mangle, "-D", "PREROUTING", "-i", "eth0", "-j", "socklab-down"],
        [*mangle, "-F", "socklab-down"],
        [*mangle, "-X", "socklab-down"],
        ["python3", "-m", "socklab", "shape", "delayline", "stop"],
        ["tc", "qdisc", "del", "dev", "eth0", "root"],
        ["tc", "qdisc", "del", "dev", "eth0", "ingress"],
        ["ip", "link", "del", "dev", "ifb0"],
    ]


# --- backend choice --------------------------------------------------------------


def test_delay_on_a_kernel_without_netem_goes_to_the_userspace_backend():
    spec = link_spec_from_mapping({"rate": "10mbit", "delay": "20ms"})
    assert choose_backend("auto", NO_NETEM, spec).name == "userspace"
    assert choose_backend("auto", ALL_CAPS, spec).name == "netem"
    assert choose_backend("userspace", ALL_CAPS, spec).name == "userspace"
    with pytest.raises(EngineError) as err:
        choose_backend("netem", NO_NETEM, spec)
    assert str(err.value) == (
        "the link asks for delay 20ms (up) but this kernel has no netem qdisc (kernel module sch_netem); "
        "backend auto or userspace can shape this link here"
    )
    assert err.value.exit_code == 3


def test_a_kernel_without_netem_or_nfqueue_says_why_for_both_backends():
    bare = Capabilities(tbf=True, htb=True, ingress=True, ifb=True, u32=True, mirred=True)
    with pytest.raises(EngineError) as err:
        choose_backend("auto", bare, link_spec_from_mapping({"up": {"loss": "1%"}}))
    assert str(err.value) == (
        "the link asks for loss 1% (up) but this kernel has no netem qdisc (kernel module sch_netem); nor can the "
        "userspace backend: the link asks for loss 1% (up), which the userspace backend does with an NFQUEUE delay "
        "line, but this kernel lacks NFQUEUE (kernel modules nfnetlink_queue / xt_NFQUEUE)"
    )


def test_missing_netem_names_everything_the_direction_asks_for():
    spec = link_spec_from_mapping({"down": {"delay": "5ms", "jitter": "1ms", "loss": "1%"}})
    with pytest.raises(EngineError, match=r"^the link asks for delay 5ms, jitter 1ms and loss 1% \(down\) but"):
        choose_backend("netem", NO_NETEM, spec)


def test_rate_only_link_works_without_netem():
    assert choose_backend("auto", NO_NETEM, link_spec_from_mapping({"rate": "10mbit"})).name == "netem"
    assert choose_backend("netem", ALL_CAPS, link_spec_from_mapping({"delay": "20ms"})).name == "netem"


def test_missing_tbf_or_ingress_pieces_are_named():
    with pytest.raises(EngineError, match=r"rate 10mbit \(up\) but this kernel has no tbf qdisc \(kernel module sch_tbf\)$"):
        choose_backend("auto", Capabilities(netem=True), link_spec_from_mapping({"up": {"rate": "10mbit"}}))
    no_ifb = Capabilities(tbf=True, ingress=True, u32=True)
    with pytest.raises(EngineError) as err:
        choose_backend("auto", no_ifb, link_spec_from_mapping({"down": {"rate": "10mbit"}}))
    assert str(err.value) == (
        "the link shapes the down direction (rate 10mbit), which needs an ifb device fed by an ingress u32 filter "
        "with a mirred redirect, but this kernel lacks ifb (kernel module ifb) and mirred (kernel module act_mirred)"
    )


def test_userspace_down_delay_needs_no_ifb_but_a_down_rate_does():
    no_ifb = Capabilities(tbf=True, nfqueue=True)
    assert choose_backend("auto", no_ifb, link_spec_from_mapping({"down": {"delay": "5ms"}})).name == "userspace"
    with pytest.raises(EngineError, match=r"down direction \(rate 1mbit delay 5ms\), which needs an ifb device"):
        choose_backend("userspace", no_ifb, link_spec_from_mapping({"down": {"rate": "1mbit", "delay": "5ms"}}))
    with pytest.raises(UsageError, match="'fast' is not a shaping backend"):
        build_plan(LinkSpec(), "fast")


# --- executor, probe, apply/set/show with a fake kernel ---------------------------


class FakeKernel:
    """A Runner that records argv, fails what ``fails`` says, and answers the show commands."""

    def __init__(self, fails=lambda argv: False, qdiscs=None, links=("lo", "eth0"), iptables="", unix_sockets=""):
        self.calls: list[list[str]] = []
        self.fails = fails
        self.qdiscs = qdiscs or {}
        self.links = set(links)
        self.iptables = iptables
        self.unix_sockets = unix_sockets

    def __call__(self, argv):
        argv = list(argv)
        self.calls.append(argv)
        if self.fails(argv):
            raise ShapingError(argv, 2, "Error: Specified qdisc kind is unknown.\n")
        if argv[:4] == ["tc", "-s", "-j", "qdisc"]:
            return json.dumps(self.qdiscs.get(argv[-1], []))
        if argv[:3] == ["ip", "-o", "link"]:
            return "".join(f"{i}: {name}: <UP> mtu 1500\n" for i, name in enumerate(sorted(self.links), 1))
        if argv[-1] == "-S":
            return self.iptables
        if argv == ["cat", "/proc/net/unix"]:
            return self.unix_sockets
        return ""

    def changing(self):
        """Calls that change something (not the read-only show and list commands)."""
        return [c for c in self.calls if c[:2] not in (["tc", "-s"], ["ip", "-o"]) and c[-1] != "-S" and c[0] != "cat"]


def test_run_returns_stdout_and_raises_one_readable_error():
    assert run([sys.executable, "-c", "print('hi')"]) == "hi\n"
    with pytest.raises(ShapingError) as err:
        run([sys.executable, "-c", "import sys; sys.stderr.write('Error: nope.\\n'); sys.exit(2)"])
    assert err.value.returncode == 2 and err.value.stderr == "Error: nope."
    assert str(err.value).endswith("failed with exit code 2: Error: nope.")
    assert isinstance(err.value, EngineError)
    with pytest.raises(ShapingError, match=r"^`socklab-no-such-program x` could not run: socklab-no-such-program is not installed$"):
        run(["socklab-no-such-program", "x"])
    assert str(ShapingError(["tc", "qdisc", "add", "dev", "eth0", "root", "netem"], 2, "Error: Specified qdisc kind is unknown.\n")) == (
        "`tc qdisc add dev eth0 root netem` failed with exit code 2: Error: Specified qdisc kind is unknown."
    )


def test_prefixed_runner_prepends_its_prefix():
    fake = FakeKernel()
    prefixed(["ip", "netns", "exec", "ns1"], fake)(["tc", "qdisc", "show"])
    assert fake.calls == [["ip", "netns", "exec", "ns1", "tc", "qdisc", "show"]]


def test_probe_tries_each_feature_on_a_throwaway_device_and_removes_it():
    fake = FakeKernel(fails=lambda argv: "netem" in argv)
    caps = probe_capabilities(fake)
    assert caps == NO_NETEM
    assert fake.calls[1] == ["ip", "link", "add", "socklab-probe0", "type", "ifb"]
    assert ["tc", "qdisc", "add", "dev", "socklab-probe0", "root", "handle", "1:", "netem", "delay", "1ms"] in fake.calls
    assert fake.calls.count(["ip", "link", "del", "dev", "socklab-probe0"]) == 2
    assert ["iptables", "-w", "-t", "mangle", "-A", "socklab-probe", "-j", "NFQUEUE", "--queue-num", "0",
            "--queue-bypass"] in fake.calls
    assert fake.calls[-1] == ["iptables", "-w", "-t", "mangle", "-X", "socklab-probe"]


def test_probe_without_net_admin_says_so():
    fake = FakeKernel(fails=lambda argv: argv[:3] == ["ip", "link", "add"])
    with pytest.raises(EngineError, match="cannot probe traffic control: creating a throwaway ifb device failed .* NET_ADMIN"):
        probe_capabilities(fake)


def test_probe_reports_mirred_separately_from_u32():
    fake = FakeKernel(fails=lambda argv: "mirred" in argv)
    caps = probe_capabilities(fake)
    assert caps.u32 and not caps.mirred and caps.netem


def test_apply_tears_down_then_runs_the_plan_and_remembers_it(tmp_path):
    fake = FakeKernel()
    spec = link_spec_from_mapping({"rate": "10mbit"})
    result = apply_spec(spec, "auto", runner=fake, state_path=tmp_path / "link.json", caps=NO_NETEM)
    assert fake.changing() == qdisc_teardown("eth0", "ifb0") + build_plan(spec, "netem")
    assert result["summary"] == "link eth0: up rate 10mbit, down rate 10mbit (backend netem, applied, 6 commands)"
    state = json.loads((tmp_path / "link.json").read_text())
    assert state["backend"] == "netem" and state["applied"] == spec.to_dict()
    assert Capabilities.from_dict(state["caps"]) == NO_NETEM


def test_apply_that_the_kernel_cannot_do_touches_nothing(tmp_path):
    fake = FakeKernel()
    with pytest.raises(EngineError, match="no netem qdisc"):
        apply_spec(link_spec_from_mapping({"delay": "20ms"}), "netem", runner=fake, state_path=tmp_path / "s.json",
                   caps=NO_NETEM)
    assert fake.calls == [] and not (tmp_path / "s.json").exists()


def test_apply_failing_half_way_removes_what_it_built(tmp_path):
    fake = FakeKernel(fails=lambda argv: argv[:3] == ["tc", "filter", "add"])
    with pytest.raises(ShapingError, match="tc filter add dev eth0"):
        apply_spec(link_spec_from_mapping({"rate": "10mbit"}), runner=fake, state_path=tmp_path / "s.json", caps=ALL_CAPS)
    assert fake.changing()[-3:] == qdisc_teardown("eth0", "ifb0")


def test_teardown_stops_a_delay_line_only_where_there_may_be_one():
    # Its control socket is listed (say, it started but its rules did not go in): stop it, unhook everything.
    fake = FakeKernel(unix_sockets="0000: 00000002 0 10000 0001 01 4242 @socklab-delayline\n")
    teardown(fake, "eth0", "ifb0")
    assert fake.changing() == build_teardown("eth0", "ifb0")
    # A chain that cannot be removed is named.
    stuck = FakeKernel(iptables="-P OUTPUT ACCEPT\n-N socklab-down\n", fails=lambda argv: argv[4:5] == ["-X"])
    with pytest.raises(EngineError, match=r"^could not remove the old shaping \(the iptables chain socklab-down "
                                          r"remained\): `iptables -w -t mangle -X socklab-up` failed"):
        teardown(stuck, "eth0", "ifb0")
    # Neither: no Python is started for nothing.
    quiet = FakeKernel()
    teardown(quiet, "eth0", "ifb0")
    assert quiet.changing() == qdisc_teardown("eth0", "ifb0")


def test_teardown_that_leaves_something_behind_is_an_error(tmp_path):
    stuck = {"kind": "tbf", "handle": "1:", "root": True, "options": {}}
    fake = FakeKernel(fails=lambda argv: argv[:3] == ["tc", "qdisc", "del"], qdiscs={"eth0": [stuck]},
                      links=("lo", "eth0", "ifb0"))
    with pytest.raises(EngineError) as err:
        apply_spec(link_spec_from_mapping({"rate": "1mbit"}), runner=fake, state_path=tmp_path / "s.json", caps=ALL_CAPS)
    assert str(err.value) == (
        "could not remove the old shaping (the tbf qdisc at the root of eth0, the device ifb0 remained): "
        "`tc qdisc del dev eth0 root` failed with exit code 2: Error: Specified qdisc kind is unknown."
    )


def test_set_retunes_in_place_when_the_layout_stays(tmp_path):
    state = tmp_path / "link.json"
    apply_spec(link_spec_from_mapping({"rate": "10mbit", "delay": "20ms"}), runner=FakeKernel(), state_path=state,
               caps=ALL_CAPS)
    fake = FakeKernel()
    changes, _ = changes_from_assignments(["rate=5mbit", "down.delay=10ms"])
    result = set_link(changes, runner=fake, state_path=state)
    # Round trip 30 ms: 5 Mbit/s * 30 ms = 18750 B -> 16 frames floor; delay lines 9 and 5 frames.
    assert fake.calls == [
        ["tc", "qdisc", "change", "dev", "eth0", "root", "handle", "1:", "tbf", "rate", "5mbit", "burst", "15140",
         "limit", "24224"],
        ["tc", "qdisc", "change", "dev", "eth0", "parent", "1:1", "handle", "10:", "netem", "delay", "20ms",
         "limit", "34"],
        ["tc", "qdisc", "change", "dev", "ifb0", "root", "handle", "1:", "tbf", "rate", "5mbit", "burst", "15140",
         "limit", "24224"],
        ["tc", "qdisc", "change", "dev", "ifb0", "parent", "1:1", "handle", "10:", "netem", "delay", "10ms",
         "limit", "26"],
    ]
    assert result["method"] == "changed in place"
    assert json.loads(state.read_text())["applied"] == {"up": {"rate_bps": 5_000_000, "delay_ms": 20.0},
                                                        "down": {"rate_bps": 5_000_000, "delay_ms": 10.0}}


def test_set_rebuilds_when_the_layout_changes_and_reuses_the_probe(tmp_path):
    state = tmp_path / "link.json"
    apply_spec(link_spec_from_mapping({"rate": "10mbit"}), runner=FakeKernel(), state_path=state, caps=NO_NETEM)
    fake = FakeKernel()
    result = set_link(changes_from_assignments(["up.rate=none"])[0], runner=fake, state_path=state)
    new = link_spec_from_mapping({"down": {"rate": "10mbit"}})
    assert fake.changing() == qdisc_teardown("eth0", "ifb0") + build_plan(new, "netem")
    assert result["summary"] == "link eth0: up unshaped, down rate 10mbit (backend netem, rebuilt, 5 commands)"
    # The kernel was not probed again: the state file kept what the first probe found.
    assert not any("socklab-probe0" in c for c in fake.calls)
    with pytest.raises(EngineError, match=r"^the link asks for delay 20ms \(up\)"):
        set_link(changes_from_assignments(["delay=20ms"])[0], "netem", runner=fake, state_path=state)
    assert json.loads(state.read_text())["applied"] == new.to_dict()


def test_set_to_nothing_removes_the_shaping(tmp_path):
    state = tmp_path / "link.json"
    apply_spec(link_spec_from_mapping({"up": {"rate": "10mbit"}}), runner=FakeKernel(), state_path=state, caps=ALL_CAPS)
    fake = FakeKernel()
    result = set_link(changes_from_assignments(["rate=none"])[0], runner=fake, state_path=state)
    assert fake.changing() == qdisc_teardown("eth0", "ifb0")
    assert result["summary"] == "link eth0: unshaped (removed)" and result["backend"] == "none"


def test_show_combines_the_state_and_the_kernels_counters(tmp_path):
    state = tmp_path / "link.json"
    apply_spec(link_spec_from_mapping({"rate": "10mbit"}), runner=FakeKernel(), state_path=state, caps=ALL_CAPS)
    tbf = {"kind": "tbf", "handle": "1:", "root": True, "refcnt": 2,
           "options": {"rate": 1250000, "burst": 15140, "lat": 8478}, "bytes": 3000, "packets": 2, "drops": 1,
           "overlimits": 5, "requeues": 0, "backlog": 1514, "qlen": 1}
    fake = FakeKernel(qdiscs={"eth0": [tbf], "ifb0": [tbf]}, links=("lo", "eth0", "ifb0"))
    shown = show_link(fake, state_path=state)
    entry = {"kind": "tbf", "handle": "1:", "parent": "root", "options": {"rate": 1250000, "burst": 15140, "lat": 8478},
             "bytes": 3000, "packets": 2, "drops": 1, "overlimits": 5, "backlog": 1514, "qlen": 1}
    assert shown == {"backend": "netem", "applied": {"up": {"rate_bps": 10_000_000}, "down": {"rate_bps": 10_000_000}},
                     "qdisc": {"eth0": [entry], "ifb0": [entry]}, "delay_line": None, "mtu": 1500}
    nothing = show_link(FakeKernel(), state_path=tmp_path / "none.json")
    assert nothing == {"backend": "none", "applied": {"up": {}, "down": {}}, "qdisc": {"eth0": [], "ifb0": []},
                       "delay_line": None, "mtu": 1500}


def test_device_mtus_are_read_from_ip_link_as_the_kernel_prints_it():
    printed = ("1: lo: <LOOPBACK,UP,LOWER_UP> mtu 65536 qdisc noqueue state UNKNOWN mode DEFAULT group default "
               "qlen 1000\\    link/loopback 00:00:00:00:00:00 brd 00:00:00:00:00:00\n"
               "24: eth0@if25: <BROADCAST,MULTICAST,UP,LOWER_UP> mtu 1450 qdisc tbf state UP mode DEFAULT group "
               "default \\    link/ether 02:42:0a:00:01:05 brd ff:ff:ff:ff:ff:ff link-netnsid 0\n"
               "3: ifb0: <BROADCAST,NOARP,UP,LOWER_UP> mtu 1500 qdisc tbf state UNKNOWN\n")
    assert link_mtus(lambda argv: printed) == {"lo": 65536, "eth0": 1450, "ifb0": 1500}


def test_qdisc_text_is_parsed_when_tc_has_no_json():
    text = (
        "qdisc tbf 1: root refcnt 2 rate 10Mbit burst 15140b lat 19.9ms \n"
        " Sent 4200000 bytes 2800 pkt (dropped 3, overlimits 917 requeues 0) \n"
        " backlog 15Kb 10p requeues 0\n"
        "qdisc ingress ffff: parent ffff:fff1 ---------------- \n"
        " Sent 120 bytes 2 pkt (dropped 0, overlimits 0 requeues 0) \n"
        " backlog 0b 0p requeues 0\n"
    )
    assert parse_qdisc_text(text) == [
        {"kind": "tbf", "handle": "1:", "parent": "root", "options": {"text": "refcnt 2 rate 10Mbit burst 15140b lat 19.9ms"},
         "bytes": 4200000, "packets": 2800, "drops": 3, "overlimits": 917, "backlog": 15000, "qlen": 10},
        {"kind": "ingress", "handle": "ffff:", "parent": "ffff:fff1", "options": {"text": "----------------"},
         "bytes": 120, "packets": 2, "drops": 0, "overlimits": 0, "backlog": 0, "qlen": 0},
    ]
    with pytest.raises(ValueError):
        parse_qdisc_json(text)


def test_show_falls_back_to_text_when_json_is_refused(tmp_path):
    def fails(argv):
        return "-j" in argv

    class TextKernel(FakeKernel):
        def __call__(self, argv):
            out = super().__call__(argv)
            return "qdisc noqueue 0: root refcnt 2 \n Sent 0 bytes 0 pkt (dropped 0, overlimits 0 requeues 0)\n" \
                if argv[:3] == ["tc", "-s", "qdisc"] else out

    shown = show_link(TextKernel(fails=fails), state_path=tmp_path / "none.json")
    assert [q["kind"] for q in shown["qdisc"]["eth0"]] == ["noqueue"]


def test_apply_from_env_uses_every_setting(tmp_path):
    fake = FakeKernel(fails=lambda argv: "netem" in argv)
    environ = {"SOCKLAB_LINK_UP_RATE": "2mbit", "SOCKLAB_LINK_DEV": "eth1", "SOCKLAB_LINK_IFB": "ifb3",
               "SOCKLAB_LINK_BACKEND": "netem", "SOCKLAB_LINK_STATE": str(tmp_path / "l.json")}
    result = apply_from_env(environ, fake)
    assert result["summary"] == "link eth1: up rate 2mbit, down unshaped (backend netem, applied, 1 commands)"
    assert fake.changing()[-4:] == qdisc_teardown("eth1", "ifb3") + [
        ["tc", "qdisc", "add", "dev", "eth1", "root", "handle", "1:", "tbf", "rate", "2mbit", "burst", "15140",
         "limit", "24224"]]
    assert json.loads((tmp_path / "l.json").read_text())["dev"] == "eth1"


def test_a_kept_container_removes_its_link_but_not_what_the_kernel_was_found_to_do(tmp_path):
    from socklab.shaping import remove_link

    environ = {"SOCKLAB_LINK_RATE": "2mbit", "SOCKLAB_LINK_STATE": str(tmp_path / "l.json")}
    probed = FakeKernel(fails=lambda argv: "netem" in argv)
    apply_from_env(environ, probed)
    assert ["ip", "link", "add", "socklab-probe0", "type", "ifb"] in probed.calls
    removed = FakeKernel()
    remove_link(removed, state_path=tmp_path / "l.json")
    assert removed.changing() == qdisc_teardown("eth0", "ifb0")
    assert not (tmp_path / "l.json").exists()
    # The next case's link: applied from nothing, without probing the kernel again.
    again = FakeKernel(fails=lambda argv: "netem" in argv)
    result = apply_from_env(environ, again)
    assert not any(c[:3] == ["ip", "link", "add"] and "socklab-probe0" in c for c in again.calls)
    plan = build_plan(link_spec_from_mapping({"rate": "2mbit"}), "netem")
    assert again.changing()[-len(plan):] == plan
    assert result["summary"].startswith("link eth0: up rate 2mbit, down rate 2mbit")


def _starts(fake):
    return [c for c in fake.changing() if c[:6] == ["python3", "-m", "socklab", "shape", "delayline", "start"]]


def test_apply_from_env_seeds_the_delay_line_and_a_rebuild_keeps_the_seed(tmp_path):
    fake = FakeKernel()
    environ = {"SOCKLAB_LINK_LOSS": "1%", "SOCKLAB_LINK_BACKEND": "userspace", "SOCKLAB_LINK_SEED": "42",
               "SOCKLAB_LINK_STATE": str(tmp_path / "l.json")}
    apply_from_env(environ, fake)
    assert [c[-1] for c in _starts(fake)] == ["--seed=42"]
    # The up direction leaves the delay line, which therefore starts again.
    result = set_link(changes_from_assignments(["up.loss=0"])[0], runner=fake, state_path=tmp_path / "l.json")
    assert result["method"] == "rebuilt"
    assert [c[-1] for c in _starts(fake)] == ["--seed=42", "--seed=42"]
    # Unset: unseeded, as before the setting existed.
    unseeded = FakeKernel()
    apply_from_env({**environ, "SOCKLAB_LINK_SEED": ""}, unseeded)
    assert [c for c in _starts(unseeded) if any(w.startswith("--seed") for w in c)] == []
    assert len(_starts(unseeded)) == 1


def test_a_bad_seed_touches_nothing(tmp_path):
    fake = FakeKernel()
    with pytest.raises(UsageError, match="^SOCKLAB_LINK_SEED: '0.5' is not a seed"):
        apply_from_env({"SOCKLAB_LINK_LOSS": "1%", "SOCKLAB_LINK_SEED": "0.5",
                        "SOCKLAB_LINK_STATE": str(tmp_path / "l.json")}, fake)
    assert fake.calls == [] and not (tmp_path / "l.json").exists()


def test_delayline_seed_is_for_start_only_and_must_be_an_integer(tmp_path):
    environ = {"SOCKLAB_LINK_STATE": str(tmp_path / "link.json")}
    with pytest.raises(UsageError, match=f"^--seed: 'x' {SEED_ALLOWED}$"):
        main(["delayline", "start", "--up", "loss_pct=1.0", "--seed", "x"], environ=environ, runner=FakeKernel())
    with pytest.raises(UsageError, match="^shape delayline set: --seed is fixed when the delay line starts"):
        main(["delayline", "set", "--up", "loss_pct=1.0", "--seed", "1"], environ=environ, runner=FakeKernel())


def test_cli_plan_apply_set_show(tmp_path):
    environ = {"SOCKLAB_LINK_STATE": str(tmp_path / "link.json"), "SOCKLAB_LINK_RATE": "10mbit"}

    def cli(*argv, runner=None):
        out = io.StringIO()
        with redirect_stdout(out):
            assert main(list(argv), environ=environ, runner=runner or FakeKernel()) == 0
        return out.getvalue()

    assert cli("plan", "up.rate=1mbit") == (
        "tc qdisc add dev eth0 root handle 1: tbf rate 1mbit burst 15140 limit 24224\n")
    assert json.loads(cli("plan", "--json", "--from-env", "down.rate=none")) == [
        ["tc", "qdisc", "add", "dev", "eth0", "root", "handle", "1:", "tbf", "rate", "10mbit", "burst", "15140",
         "limit", "25738"]]
    assert cli("plan") == "# eth0 unshaped: nothing to run\n"
    assert cli("apply", "--from-env", "down.rate=20mbit").startswith(
        "link eth0: up rate 10mbit, down rate 20mbit (backend netem, applied")
    assert cli("set", "up.rate=5mbit") == "link eth0: up rate 5mbit, down rate 20mbit (backend netem, changed in place, 2 commands)\n"
    assert json.loads(cli("show", "--json"))["applied"] == {"up": {"rate_bps": 5_000_000}, "down": {"rate_bps": 20_000_000}}
    assert json.loads(cli("caps", "--json"))["qdiscs"]["netem"] is True
    for argv, message in [(["set"], "the following arguments are required"), (["apply", "--dev", "a/b"], "device 'a/b'"),
                          (["frobnicate"], "invalid choice")]:
        with pytest.raises(UsageError, match=message):
            cli(*argv)


# --- the real thing, inside network namespaces ------------------------------------

# Goodput ceiling of a TCP bulk transfer: 1448 payload bytes per 1514 B frame.
PAYLOAD_PER_FRAME = 1448 / 1514
GOODPUT_TOLERANCE = 0.07
TRANSFER_BYTES = 4_000_000

# A receiver script's start: listen on argv[1]:argv[2], say "ready", accept one connection.
ACCEPT_ONE = r"""
import socket, sys
srv = socket.socket()
srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
srv.bind((sys.argv[1], int(sys.argv[2])))
srv.listen(1)
srv.settimeout(60)
print("ready", flush=True)
conn, _ = srv.accept()
"""

RECEIVER = ACCEPT_ONE + r"""
import json, time
conn.settimeout(60)
total, first = 0, None
while True:
    data = conn.recv(1 << 16)
    if not data:
        break
    if first is None:
        first = time.monotonic()
    total += len(data)
end = time.monotonic()
conn.close()
print(json.dumps({"bytes": total, "seconds": end - first}), flush=True)
"""

SENDER = r"""
import socket, sys
s = socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=60)
s.sendall(b"x" * int(sys.argv[3]))
s.shutdown(socket.SHUT_WR)
s.recv(1)  # the receiver's close: everything was delivered
s.close()
"""


def _need_root():
    if os.geteuid() != 0:
        if os.environ.get("CI") == "true":
            pytest.fail("netns tests must run in CI, which runs as root; this run is not root")
        pytest.skip("netns tests need root")


class Pair:
    """Two namespaces joined by a veth pair, each end called eth0: 'a' is the shaped container."""

    def __init__(self) -> None:
        tag = secrets.token_hex(3)
        self.a, self.b = f"socklab-t-{tag}-a", f"socklab-t-{tag}-b"
        octet = int(tag[:2], 16)
        self.addr_a, self.addr_b = f"10.213.{octet}.1", f"10.213.{octet}.2"
        self.runner_a = prefixed(["ip", "netns", "exec", self.a])

    def create(self) -> None:
        for ns in (self.a, self.b):
            run(["ip", "netns", "add", ns])
            run(["ip", "-n", ns, "link", "set", "lo", "up"])
        # Created inside a, with its peer born in b: nothing ever exists in the host namespace.
        run(["ip", "-n", self.a, "link", "add", "eth0", "type", "veth", "peer", "name", "eth0", "netns", self.b])
        for ns, addr in ((self.a, self.addr_a), (self.b, self.addr_b)):
            run(["ip", "-n", ns, "addr", "add", f"{addr}/24", "dev", "eth0"])
            run(["ip", "-n", ns, "link", "set", "eth0", "up"])

    def delete(self) -> None:
        # A delay line is a process: it would outlive its namespace.
        subprocess.run(["ip", "netns", "exec", self.a, sys.executable, "-m", "socklab", "shape", "delayline", "stop"],
                       capture_output=True, check=False, timeout=120,
                       env={**os.environ, "PYTHONPATH": str(SERVICES)})
        for ns in (self.a, self.b):
            subprocess.run(["ip", "netns", "del", ns], capture_output=True, check=False)

    def shape(self, *argv: str, state: Path, check: bool = True) -> subprocess.CompletedProcess:
        """`python -m socklab shape ARGV` inside namespace a, as a container's entrypoint would."""
        env = {**os.environ, "PYTHONPATH": str(SERVICES), "SOCKLAB_LINK_STATE": str(state)}
        done = subprocess.run(["ip", "netns", "exec", self.a, sys.executable, "-m", "socklab", "shape", *argv],
                              capture_output=True, text=True, env=env, timeout=120)
        if check:
            assert done.returncode == 0, done.stderr
        return done

    def goodput_bps(self, sender_ns: str, receiver_ns: str, receiver_addr: str) -> float:
        """Goodput of one TCP bulk transfer: payload bits over first byte to EOF, at the receiver."""
        port = "5201"
        receiver = subprocess.Popen(["ip", "netns", "exec", receiver_ns, sys.executable, "-c", RECEIVER,
                                     receiver_addr, port], stdout=subprocess.PIPE, text=True)
        try:
            assert receiver.stdout.readline().strip() == "ready"
            subprocess.run(["ip", "netns", "exec", sender_ns, sys.executable, "-c", SENDER, receiver_addr, port,
                            str(TRANSFER_BYTES)], check=True, timeout=120)
            out, _ = receiver.communicate(timeout=120)
        finally:
            if receiver.poll() is None:
                receiver.kill()
                receiver.wait()
        result = json.loads(out)
        assert result["bytes"] == TRANSFER_BYTES
        return result["bytes"] * 8 / result["seconds"]


@pytest.fixture
def pair():
    _need_root()
    namespaces = Pair()
    try:
        namespaces.create()
        yield namespaces
    finally:
        namespaces.delete()


def _tc_accepts(runner, argv) -> bool:
    try:
        runner(argv)
    except ShapingError:
        return False
    return True


@pytest.mark.netns
def test_probe_matches_what_tc_says(pair):
    caps = probe_capabilities(pair.runner_a)
    # Ask tc directly, on a device of the test's own, for the two qdiscs the lab hinges on.
    pair.runner_a(["ip", "link", "add", "t-check0", "type", "ifb"])
    has_netem = _tc_accepts(pair.runner_a, ["tc", "qdisc", "add", "dev", "t-check0", "root", "netem", "delay", "1ms"])
    if has_netem:
        pair.runner_a(["tc", "qdisc", "del", "dev", "t-check0", "root"])
    has_tbf = _tc_accepts(pair.runner_a, ["tc", "qdisc", "add", "dev", "t-check0", "root", "tbf", "rate", "1mbit",
                                          "burst", "16000", "limit", "32000"])
    assert (caps.netem, caps.tbf) == (has_netem, has_tbf)
    assert caps.tbf and caps.ifb and caps.ingress and caps.u32 and caps.mirred
    # The probe cleaned up after itself.
    assert "socklab-probe0" not in pair.runner_a(["ip", "-o", "link", "show"])


@pytest.mark.netns
def test_rate_holds_up_and_down_through_ifb(pair, tmp_path):
    state = tmp_path / "link.json"
    summary = pair.shape("apply", "rate=10mbit", state=state).stdout
    assert summary.startswith("link eth0: up rate 10mbit, down rate 10mbit (backend netem, applied")

    shown = json.loads(pair.shape("show", "--json", state=state).stdout)
    assert shown["backend"] == "netem"
    assert shown["applied"] == {"up": {"rate_bps": 10_000_000}, "down": {"rate_bps": 10_000_000}}
    for dev in ("eth0", "ifb0"):
        root = [q for q in shown["qdisc"][dev] if q["parent"] == "root"]
        assert [(q["kind"], q["handle"], q["options"]["rate"]) for q in root] == [("tbf", "1:", 10_000_000 // 8)]
    assert any(q["kind"] == "ingress" for q in shown["qdisc"]["eth0"])

    ceiling_bps = 10e6 * PAYLOAD_PER_FRAME
    up_bps = pair.goodput_bps(pair.a, pair.b, pair.addr_b)
    down_bps = pair.goodput_bps(pair.b, pair.a, pair.addr_a)
    print(f"goodput at 10mbit: up {up_bps / 1e6:.3f} Mbit/s, down {down_bps / 1e6:.3f} Mbit/s "
          f"(ceiling {ceiling_bps / 1e6:.3f})")
    assert abs(up_bps / ceiling_bps - 1) <= GOODPUT_TOLERANCE, f"up {up_bps:.0f} bit/s vs {ceiling_bps:.0f}"
    assert abs(down_bps / ceiling_bps - 1) <= GOODPUT_TOLERANCE, f"down {down_bps:.0f} bit/s vs {ceiling_bps:.0f}"

    # The counters saw the transfer: the up data left through eth0's tbf, the down data through ifb0's.
    shown = json.loads(pair.shape("show", "--json", state=state).stdout)
    for dev in ("eth0", "ifb0"):
        tbf = next(q for q in shown["qdisc"][dev] if q["kind"] == "tbf")
        assert tbf["bytes"] >= TRANSFER_BYTES, (dev, tbf)


@pytest.mark.netns
def test_set_changes_a_running_link_and_apply_clears_it(pair, tmp_path):
    state = tmp_path / "link.json"
    pair.shape("apply", "rate=10mbit", state=state)
    done = pair.shape("set", "up.rate=2mbit", state=state)
    assert done.stdout.startswith("link eth0: up rate 2mbit, down rate 10mbit (backend netem, changed in place")
    shown = json.loads(pair.shape("show", "--json", state=state).stdout)
    rates = {dev: next(q["options"]["rate"] for q in qs if q["kind"] == "tbf") for dev, qs in shown["qdisc"].items()}
    assert rates == {"eth0": 2_000_000 // 8, "ifb0": 10_000_000 // 8}
    up_bps = pair.goodput_bps(pair.a, pair.b, pair.addr_b)
    assert abs(up_bps / (2e6 * PAYLOAD_PER_FRAME) - 1) <= GOODPUT_TOLERANCE, up_bps

    done = pair.shape("set", "down.rate=none", state=state)
    assert "rebuilt" in done.stdout
    shown = json.loads(pair.shape("show", "--json", state=state).stdout)
    assert shown["qdisc"]["ifb0"] == [] and not any(q["kind"] == "ingress" for q in shown["qdisc"]["eth0"])

    assert pair.shape("apply", state=state).stdout == "link eth0: unshaped (applied)\n"
    shown = json.loads(pair.shape("show", "--json", state=state).stdout)
    assert [q["kind"] for q in shown["qdisc"]["eth0"]] == ["noqueue"]


@pytest.mark.netns
def test_delay_goes_to_netem_or_the_delay_line_as_the_kernel_allows(pair, tmp_path):
    state = tmp_path / "link.json"
    caps = probe_capabilities(pair.runner_a)
    done = pair.shape("apply", "rate=10mbit", "delay=20ms", "backend=netem", state=state, check=False)
    shown = json.loads(pair.shape("show", "--json", state=state).stdout)
    if caps.netem:
        assert done.returncode == 0, done.stderr
        assert [q["kind"] for q in shown["qdisc"]["eth0"] if q["kind"] in ("tbf", "netem")] == ["tbf", "netem"]
    else:
        assert done.returncode == 3
        assert done.stderr.strip() == (
            "socklab: the link asks for delay 20ms (up) but this kernel has no netem qdisc (kernel module "
            "sch_netem); backend auto or userspace can shape this link here")
        # Refused before anything was touched: still unshaped, and nothing recorded.
        assert shown["backend"] == "none" and shown["qdisc"]["ifb0"] == []
        done = pair.shape("apply", "rate=10mbit", "delay=20ms", state=state)
        assert "(backend userspace, applied" in done.stdout


ECHO_SERVER = r"""
import socket, sys
srv = socket.socket()
srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
srv.bind((sys.argv[1], int(sys.argv[2])))
srv.listen(4)
srv.settimeout(120)
print("ready", flush=True)
while True:
    conn, _ = srv.accept()
    conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    while data := conn.recv(4096):
        conn.sendall(data)
    conn.close()
"""

PING_PONG = r"""
import socket, statistics, sys, time
s = socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=30)
s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
rtts = []
for _ in range(int(sys.argv[3])):
    start = time.monotonic()
    s.sendall(b"x" * 64)
    got = 0
    while got < 64:
        got += len(s.recv(64 - got))
    rtts.append((time.monotonic() - start) * 1000)
print(statistics.median(rtts))
"""


def _median_rtt_ms(pair: Pair, port: str, count: int = 20) -> float:
    done = subprocess.run(["ip", "netns", "exec", pair.a, sys.executable, "-c", PING_PONG, pair.addr_b, port,
                           str(count)], capture_output=True, text=True, timeout=60, check=True)
    return float(done.stdout)


@pytest.mark.netns
def test_userspace_backend_delays_changes_and_goes_away(pair, tmp_path):
    state = tmp_path / "link.json"
    port = "5202"
    server = subprocess.Popen(["ip", "netns", "exec", pair.b, sys.executable, "-c", ECHO_SERVER, pair.addr_b, port],
                              stdout=subprocess.PIPE, text=True)
    try:
        assert server.stdout.readline().strip() == "ready"
        done = pair.shape("apply", "up.delay=10ms", "down.delay=5ms", "backend=userspace", state=state)
        assert done.stdout.startswith("link eth0: up delay 10ms, down delay 5ms (backend userspace, applied")
        assert abs(_median_rtt_ms(pair, port) - 15) <= 1

        done = pair.shape("set", "delay=20ms", state=state)
        assert "changed in place" in done.stdout
        assert abs(_median_rtt_ms(pair, port) - 40) <= 2

        shown = json.loads(pair.shape("show", "--json", state=state).stdout)
        assert shown["backend"] == "userspace"
        line = shown["delay_line"]
        assert line["running"] is True
        for direction, method in (("up", "copy"), ("down", "verdict")):
            counters = line[direction]
            assert counters["method"] == method and counters["delay_ms"] == 20.0
            assert counters["packets"] >= 20 and counters["delayed"] == counters["packets"] - counters["held"]
            assert counters["lost"] == counters["overflow"] == counters["send_errors"] == 0

        assert pair.shape("apply", state=state).stdout == "link eth0: unshaped (applied)\n"
        assert "socklab-" not in pair.runner_a(["iptables", "-w", "-t", "mangle", "-S"])
        assert pair.shape("delayline", "stats", state=state).stdout.strip() == "null"
        assert _median_rtt_ms(pair, port) < 1
    finally:
        server.kill()
        server.wait()


DIGEST_RECEIVER = ACCEPT_ONE + r"""
import hashlib
digest, count = hashlib.sha256(), 0
while data := conn.recv(1 << 16):
    digest.update(data)
    count += len(data)
print(count, digest.hexdigest())
"""

DIGEST_SENDER = r"""
import hashlib, random, socket, sys
data = random.Random(1).randbytes(int(sys.argv[3]))
with socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=60) as s:
    s.sendall(data)
print(len(data), hashlib.sha256(data).hexdigest())
"""


@pytest.mark.netns
@pytest.mark.parametrize("link, whole", [(["up.delay=5ms"], True), (["up.delay=5ms", "up.loss=1%"], False)])
def test_userspace_up_direction_carries_bulk_intact_with_aggregates_whole_unless_lossy(pair, tmp_path, link, whole):
    # Without loss the up queue takes GSO aggregates whole and sends them again
    # through a packet socket (the kernel segments them); with loss, wire packets.
    # Between veths a partial checksum is trusted, so the payload's digest is what shows corruption.
    state = tmp_path / "link.json"
    pair.shape("apply", *link, "backend=userspace", state=state)
    port = "5203"
    receiver = subprocess.Popen(["ip", "netns", "exec", pair.b, sys.executable, "-c", DIGEST_RECEIVER, pair.addr_b,
                                 port], stdout=subprocess.PIPE, text=True)
    try:
        assert receiver.stdout.readline().strip() == "ready"
        sent = subprocess.run(["ip", "netns", "exec", pair.a, sys.executable, "-c", DIGEST_SENDER, pair.addr_b, port,
                               str(8 << 20)], capture_output=True, text=True, check=True, timeout=120).stdout
        received, _ = receiver.communicate(timeout=60)
    finally:
        if receiver.poll() is None:
            receiver.kill()
            receiver.wait()
    assert received.split() == sent.split()
    up = json.loads(pair.shape("delayline", "stats", state=state).stdout)["up"]
    assert up["gso"] is whole and up["send_errors"] == 0
    assert (up["gso_packets"] > 0) is whole
    # Aggregates: far fewer packets than the 5,800 wire packets 8 MiB takes.
    assert (up["packets"] < 3000) is whole


@pytest.mark.parametrize("mtu, payload, frame", [(1500, 1448, 1514), (1450, 1398, 1464), (9000, 8948, 9014)])
def test_the_tcp_ceiling_is_full_segments_payload_per_frame_at_the_devices_mtu(mtu, payload, frame):
    assert tcp_ceiling_bps(10e6, mtu) == pytest.approx(10e6 * payload / frame)
    assert tcp_ceiling_bps(10e6) == pytest.approx(10e6 * 1448 / 1514)


def test_counts_since_leaves_only_what_passed_after_the_earlier_look():
    from socklab.shaping import counts_since

    def tbf(bytes_, packets, drops, backlog):
        return {"kind": "tbf", "handle": "1:", "parent": "root", "options": {}, "bytes": bytes_,
                "packets": packets, "drops": drops, "overlimits": drops * 2, "backlog": backlog, "qlen": 1}

    before = {"qdisc": {"eth0": [tbf(1_000, 10, 2, 500)], "ifb0": []},
              "delay_line": {"running": True, "cpu_s": 0.1, "up": {"packets": 10, "bytes": 1_000, "lost": 1,
                                                                    "held": 3, "delay_ms": 20}}}
    now = {"backend": "userspace", "qdisc": {"eth0": [tbf(5_000, 40, 3, 0)],
                                             "ifb0": [{**tbf(700, 7, 0, 0), "kind": "netem"}]},
           "delay_line": {"running": False, "cpu_s": 0.5, "up": {"packets": 50, "bytes": 9_000, "lost": 4,
                                                                  "held": 0, "delay_ms": 20}}}
    since = counts_since(now, before)
    (eth0,) = since["qdisc"]["eth0"]
    assert (eth0["bytes"], eth0["packets"], eth0["drops"], eth0["overlimits"]) == (4_000, 30, 1, 2)
    assert eth0["backlog"] == 0 and eth0["qlen"] == 1  # levels, not counts
    assert since["qdisc"]["ifb0"][0]["bytes"] == 700  # not there before: all of it is since
    assert since["delay_line"]["up"] == {"packets": 40, "bytes": 8_000, "lost": 3, "held": 0, "delay_ms": 20}
    assert since["delay_line"]["cpu_s"] == 0.5 and since["backend"] == "userspace"
