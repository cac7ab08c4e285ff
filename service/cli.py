"""The `xaiserve` command: a thin layer over the library (one module per subcommand in
`commands/`). Errors end in one line and exit 2."""

from __future__ import annotations

import argparse
import sys

from .commands import COMMANDS
from .commands.common import EXIT_INTERRUPTED, os_error_line

DESCRIPTION = ("Export image classifiers to OpenVINO with an in-graph saliency map, serve them "
               "over gRPC (KServe v2 and explanations), explain, evaluate and benchmark them. "
               "Errors end in one line and exit 2.")

def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="xaiserve", description=DESCRIPTION)
    sub = parser.add_subparsers(dest="verb", required=True)
    for command in COMMANDS:
        command.add_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.run(args)
    except KeyboardInterrupt as exc:  # Ctrl-C (or SIGTERM where raised): one line
        print(f"xaiserve {args.verb}: {str(exc) or 'interrupted'}", file=sys.stderr)
        return EXIT_INTERRUPTED
    except OSError as exc:  # a file the command could not read or write: one line, not a trace
        print(f"xaiserve {args.verb}: error: {os_error_line(exc)}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
