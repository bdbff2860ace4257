"""The ``rsavq`` command line: one parser tree for the library, the service and its client.

Results go to stdout (JSON, or text for ``generate`` and the key commands); progress bars and logs
go to stderr; an ``RSAVQError`` is one line on stderr and exit status 2. The command line sits on
top of every layer: it runs the library, serves the API in-process, and starts the workers and
the generation server as processes by their own command lines (it never imports ``worker``).
"""

from __future__ import annotations

import argparse
import json
import logging
import sys

from rsavq_core.errors import RSAVQError
from service.cli import library, remote, servers


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="rsavq",
        description="RSAVQ quantization: the library on its own, the job service, and its client.",
        epilog="`rsavq COMMAND --help` shows a command's options.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND", title="commands")
    servers.register(sub)
    remote.register(sub)
    library.register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    # Servers log what they do; the other commands print results, not library chatter.
    verbose = getattr(args, "verbose", False) or args.command in servers.LOGGING_COMMANDS
    logging.basicConfig(
        level=logging.INFO if verbose else logging.WARNING,
        stream=sys.stderr,
        format="%(levelname)s %(name)s: %(message)s",
    )
    try:
        result = args.func(args)
    except RSAVQError as exc:
        sys.stderr.write(f"rsavq: error: {exc}\n")
        return 2
    if result is not None:  # a server returns None when it stops
        sys.stdout.write(result if isinstance(result, str) else json.dumps(result, indent=2, default=str))
        sys.stdout.write("\n")
    return 0
