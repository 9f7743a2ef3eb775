"""The demonstration's side-by-side summary of client and server results.

    python -m socklab summary DIR --clients nonblocking,blocking [--server server]

Reads the result files the roles wrote into the shared directory (``NAME.json``)
and prints, column by column, what each client's ``send()`` calls did and what
the server confirms it received. Exits 1 when a result is missing, so a broken
demonstration never looks like a finished one.
"""

from __future__ import annotations

import json
import os
from typing import Any, Callable

from .cli import ArgumentParser
from .errors import SocklabError


def load_result(directory: str, name: str) -> dict[str, Any]:
    """The result line ``name`` wrote into ``directory``."""
    path = os.path.join(directory, f"{name}.json")
    try:
        with open(path, encoding="utf-8") as fh:
            return json.loads(fh.readline())
    except FileNotFoundError:
        raise SocklabError(f"no result from {name!r} in {directory} (did it fail? see its log)") from None
    except ValueError:
        raise SocklabError(f"the result file {path} is not one JSON line") from None


def _int(value: Any) -> str:
    return "-" if value is None else f"{int(value):,}"


def _seconds(value: Any) -> str:
    return "-" if value is None else (f"{value:.4f}" if value < 1 else f"{value:.2f}")


def _mbit(value: Any) -> str:
    return "-" if value is None else f"{value / 1e6:.1f}"


# (label, result field, formatter): the tutorial's figures, in reading order.
CLIENT_ROWS: list[tuple[str, str, Callable[[Any], str]]] = [
    ("bytes requested", "bytes_requested", _int),
    ("bytes send() returned", "bytes_accepted", _int),
    ("send() calls", "send_calls", _int),
    ("EAGAIN errors", "eagain", _int),
    ("seconds inside send()", "send_s", _seconds),
    ("seconds inside socket calls", "blocked_s", _seconds),
    ("seconds, connect to EOF", "wall_s", _seconds),
    ("bytes server confirmed", "bytes_delivered", _int),
    ("goodput, Mbit/s", "goodput_bps", _mbit),
]


TITLE = "socklab: the tutorial's send(), blocking vs non-blocking"


def render(clients: dict[str, dict[str, Any]], server: dict[str, Any] | None, title: str = TITLE) -> str:
    """The summary as text under ``title``: one column per client, then the server's totals."""
    names = list(clients)
    label_w = max(len(label) for label, _, _ in CLIENT_ROWS)
    col_w = max(14, *(len(n) for n in names))
    lines = ["", title, ""]
    lines.append(" " * label_w + "".join(f"  {n:>{col_w}}" for n in names))
    for label, field, fmt in CLIENT_ROWS:
        cells = "".join(f"  {fmt(clients[n].get(field)):>{col_w}}" for n in names)
        lines.append(f"{label:<{label_w}}{cells}")
    if server is not None:
        lines.append("")
        lines.append(
            f"server ({server.get('mode')}): {server.get('connections')} connections, "
            f"{_int(server.get('bytes_received'))} bytes received in all"
        )
        for conn in server.get("per_connection") or []:
            lines.append(f"  from {conn.get('peer')}: {_int(conn.get('bytes_received'))} bytes")
    lines.append("")
    return "\n".join(lines)


def main(argv: list[str]) -> int:
    """Print the summary of the results found in a directory."""
    parser = ArgumentParser(prog="socklab summary", description=__doc__.splitlines()[0])
    parser.add_argument("directory")
    parser.add_argument("--clients", required=True, help="comma-separated result names, one column each")
    parser.add_argument("--server", default="server", help="the server's result name ('' for none)")
    args = parser.parse_args(argv)
    clients = {name: load_result(args.directory, name) for name in args.clients.split(",") if name}
    server = load_result(args.directory, args.server) if args.server else None
    print(render(clients, server), flush=True)
    return 0
