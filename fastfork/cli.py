"""The ``fastfork`` command: ``fastfork bench`` and ``fastfork run``.

Each subcommand lives in its own module exposing ``add_arguments(parser)`` and
``main(args) -> int``; this module only dispatches, and imports a
subcommand's module only when that subcommand is chosen (``fastfork run``
never loads the benchmark).
"""
import argparse
import importlib
import sys

# subcommand -> (module, one-line help)
SUBCOMMANDS = {
    "bench": ("fastfork.benchmark", "measure fork, reap and exec throughput against the stdlib"),
    "run": ("fastfork.runner",
            "run a command per input item, or command lines, in parallel (as xargs -P)"),
}


def chosen_subcommand(argv):
    """Return the subcommand named in ``argv``, or None if none is (yet).

    The top-level parser has no options taking a value, so the first word
    that is not an option is the subcommand.
    """
    for word in argv:
        if not word.startswith("-"):
            return word if word in SUBCOMMANDS else None
    return None


def build_parser(argv=None):
    """Return the top-level argument parser for ``argv`` (default: sys.argv[1:]).

    Every subcommand is listed; only the chosen one's module is imported to
    add its options.
    """
    chosen = chosen_subcommand(sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(
        prog="fastfork", description="Create, supervise and reap many child processes.")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    subparsers.required = True
    for name, (module_name, help_text) in SUBCOMMANDS.items():
        sub = subparsers.add_parser(name, help=help_text, description=help_text)
        if name == chosen:
            module = importlib.import_module(module_name)
            module.add_arguments(sub)
            sub.set_defaults(handler=module.main)
    return parser


def main(argv=None):
    """Entry point of the console script; returns the exit status."""
    argv = sys.argv[1:] if argv is None else list(argv)
    args = build_parser(argv).parse_args(argv)
    try:
        return args.handler(args)
    except KeyboardInterrupt:
        print("fastfork: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
