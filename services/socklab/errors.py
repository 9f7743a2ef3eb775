"""Exceptions that carry the sentence the user sees, and the exit code it maps to."""


class SocklabError(Exception):
    """An error whose message is a complete sentence meant for the user."""

    exit_code = 1


class UsageError(SocklabError):
    """Bad input: an argument, an environment variable or a value out of range."""

    exit_code = 2


class EngineError(SocklabError):
    """The host or kernel cannot do what was asked (missing qdisc, no capability)."""

    exit_code = 3
