"""The ``fastfork`` command: ``fastfork bench`` and ``fastfork run``.

Each subcommand lives in its own module exposing ``add_arguments(parser)`` and
``main(args) -> int``; this module only dispatches.
"""
import argparse
import importlib
import sys

# subcommand -> (module, one-line help)
SUBCOMMANDS = {
    "bench": ("fastfork.benchmark", "measure fork, reap and exec throughput against the stdlib"),
    "run": ("fastfork.runner", "run a command many times, or commands from stdin, in parallel"),
}


def build_parser():
    """Return the top-level argument parser with every subcommand attached."""
    parser = argparse.ArgumentParser(
        prog="fastfork", description="Create, supervise and reap many child processes.")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    subparsers.required = True
    for name, (module_name, help_text) in SUBCOMMANDS.items():
        module = importlib.import_module(module_name)
        sub = subparsers.add_parser(name, help=help_text, description=help_text)
        module.add_arguments(sub)
        sub.set_defaults(handler=module.main)
    return parser


def main(argv=None):
    """Entry point of the console script; returns the exit status."""
    args = build_parser().parse_args(argv)
    try:
        return args.handler(args)
    except KeyboardInterrupt:
        print("fastfork: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
