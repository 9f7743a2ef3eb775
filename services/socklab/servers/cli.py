"""``python -m socklab server``: the command line, parsed into a ServerConfig, and main."""

from __future__ import annotations

import argparse
from typing import Sequence

from ..cli import ArgumentParser, duration_arg, positive_int, size_arg
from .connection import WORKLOADS
from .lifecycle import Server, ServerConfig
from .strategies import MODES, STRATEGIES


def _port_arg(text: str) -> int:
    try:
        port = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a port number") from None
    if not 0 <= port <= 65535:
        raise argparse.ArgumentTypeError(f"{text!r} is not a port: use 0 to 65535 (0 picks a free one)")
    return port


def _positive_size_arg(text: str) -> int:
    size = size_arg(text)
    if size < 1:
        raise argparse.ArgumentTypeError(f"{text!r} must be at least 1 byte")
    return size


def _positive_duration_arg(text: str) -> float:
    seconds = duration_arg(text)
    if seconds <= 0:
        raise argparse.ArgumentTypeError(f"{text!r} must be longer than zero")
    return seconds


def build_parser() -> ArgumentParser:
    """The ``socklab server`` command line."""
    parser = ArgumentParser(
        prog="socklab server",
        description="Serve TCP connections with one I/O model and print one result line when stopped.")
    parser.add_argument("--mode", required=True, choices=MODES, help="the I/O model")
    parser.add_argument("--port", required=True, type=_port_arg,
                        help="TCP port; 0 picks a free one (printed in the listening line)")
    parser.add_argument("--host", default="0.0.0.0", help="address to listen on (default 0.0.0.0)")
    parser.add_argument("--recv-size", type=_positive_size_arg, default=1024,
                        help="bytes asked for by each receive (default 1024)")
    parser.add_argument("--max-connections", type=positive_int,
                        help="stop after this many connections have finished (default: run until signalled)")
    parser.add_argument("--workload", choices=WORKLOADS, default="bulk",
                        help="echo sends every byte back; the others discard (default bulk)")
    parser.add_argument("--idle-timeout", type=_positive_duration_arg, default=30.0,
                        help="close a connection that moved no bytes for this long (default 30s)")
    parser.add_argument("--backlog", type=positive_int, default=128, help="listen() backlog (default 128)")
    parser.add_argument("--rcvbuf", type=_positive_size_arg, help="SO_RCVBUF for every connection")
    parser.add_argument("--result-file", help="also write the result line to this file")
    return parser


def parse_args(argv: Sequence[str]) -> tuple[ServerConfig, str | None]:
    """The server's configuration and result file from its command line."""
    args = build_parser().parse_args(list(argv))
    config = ServerConfig(
        mode=args.mode, host=args.host, port=args.port, recv_size_bytes=args.recv_size,
        max_connections=args.max_connections, workload=args.workload,
        idle_timeout_s=args.idle_timeout, backlog=args.backlog, rcvbuf_bytes=args.rcvbuf)
    return config, args.result_file


def main(argv: Sequence[str]) -> int:
    """``python -m socklab server ...``: serve until the stop condition, print the result, return 0."""
    config, result_file = parse_args(argv)
    Server(config, STRATEGIES[config.mode]()).serve(result_file)
    return 0
