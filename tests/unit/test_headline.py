"""A failed case's headline: which roles failed and why, from how each ended and what it printed."""

from __future__ import annotations

import json

import pytest

from labkit.headline import RoleOutcome, cause, cause_alone, headline, last_line, last_words, needs_last_words

from .fake_engine import client_line, failure_line, link_line, server_line


def lines(*texts: str) -> tuple[dict, ...]:
    return tuple(json.loads(t) for t in texts)


SERVER_OK = RoleOutcome("the server", "server", 0, lines(server_line(["server", "--mode", "epoll"], 10), link_line()))
CLIENT_OK = RoleOutcome("client-sender", "client", 0, lines(client_line(["client"]), link_line()))
RESET = "send() failed: ECONNRESET (Connection reset by peer)"


def client(code: int, *texts: str, who: str = "client-sender", words: str | None = None) -> RoleOutcome:
    return RoleOutcome(who, "client", code, lines(*texts), words)


@pytest.mark.parametrize("outcome, expected", [
    (SERVER_OK, None),
    (CLIENT_OK, None),
    (RoleOutcome("the server", "server", 137), " exited 137 (killed by SIGKILL)"),
    (client(143, failure_line("client", "the client was killed by SIGTERM", 143), link_line()),
     ": the client was killed by SIGTERM"),
    (client(1, client_line(["client"], [RESET]), link_line()), f": {RESET}"),
    (client(1, client_line(["client"], [RESET, "no EOF from the server within 10s after shutdown", "x"])),
     f": {RESET} (and 2 more errors)"),
    (client(0, link_line()), " printed no result"),
    (client(1, words="OSError: [Errno 24] Too many open files"),
     " exited 1 without a result; its last words: OSError: [Errno 24] Too many open files"),
    (client(2, failure_line("client", "client: argument --bytes: '-1' is not a size", 2)),
     ": client: argument --bytes: '-1' is not a size"),
    (RoleOutcome("client-sender", "client", None, gone=True), "'s container disappeared (removed from outside the run?)"),
])
def test_the_cause_of_each_way_a_role_ends(outcome, expected):
    assert cause(outcome) == expected


def test_nothing_failed_means_no_headline():
    assert headline([SERVER_OK, CLIENT_OK, CLIENT_OK]) is None


def test_the_server_and_a_client_are_named_with_their_causes():
    killed = RoleOutcome("the server", "server", 137)
    reset = client(1, client_line(["client"], [RESET]), link_line())
    assert headline([killed, reset]) == f"the server exited 137 (killed by SIGKILL) and client-sender: {RESET}"


def test_containers_of_a_group_that_failed_alike_are_named_once_with_their_count():
    reset = client(1, client_line(["client"], [RESET]))
    silent = client(0, link_line())
    other = client(1, client_line(["client"], ["connect() timed out after 2s"]), who="client-slow")
    assert headline([reset, reset, silent, CLIENT_OK, other]) == (
        f"client-sender (2 of 4 containers): {RESET}, client-sender (1 of 4 containers) printed no result "
        "and client-slow: connect() timed out after 2s")


def test_many_causes_are_cut_short():
    outcomes = [client(1, client_line(["client"], [f"error {i}"]), who=f"client-g{i}") for i in range(6)]
    assert headline(outcomes) == ("client-g0: error 0, client-g1: error 1, client-g2: error 2 and 3 more")


def test_last_words_skip_result_lines_and_the_labs_own_banners():
    output = ("socklab: link eth0: rate 10mbit (backend netem, applied)\n"
              "Traceback (most recent call last):\n  File \"x\", line 1\nKeyError: 'bytes'\n"
              + link_line() + "\n")
    assert last_words(output) == "KeyError: 'bytes'"
    assert last_words("socklab: link eth0: unshaped\n" + link_line()) is None
    assert last_line("socklab: rate: 'x' is not a rate\n") == "socklab: rate: 'x' is not a rate"


def test_only_a_role_that_gave_no_reason_needs_its_last_words():
    assert needs_last_words(client(1))
    assert needs_last_words(client(0, link_line()))
    assert not needs_last_words(client(1, client_line(["client"], [RESET])))
    assert not needs_last_words(client(3, failure_line("entry", "no netem", 3)))
    assert not needs_last_words(CLIENT_OK)


def test_a_cause_can_stand_alone_after_a_sentence_that_named_the_role():
    assert cause_alone(RoleOutcome("the server", "server", 137)) == "it exited 137 (killed by SIGKILL)"
    assert cause_alone(client(3, failure_line("entry", "no netem", 3))) == "no netem"
    assert cause_alone(RoleOutcome("the server", "server", None, gone=True)) == (
        "its container disappeared (removed from outside the run?)")
    assert cause_alone(CLIENT_OK) is None
