"""The `diffscm` command: `demo`, `counterfactual`, `evaluate`, `evaluate-scm` and `serve`.

The top floor of the package: the commands only parse arguments, call the library and turn its exceptions into an
`error:` line and exit status 2.
"""

import argparse
import sys

from . import counterfactual, demo, evaluate, serve


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="diffscm", description="Counterfactual images with Diff-SCM.")
    commands = parser.add_subparsers(dest="command", required=True)
    for module in (demo, counterfactual, evaluate, serve):
        module.add_commands(commands)
    return parser


def main(argv: list[str] | None = None):
    args = build_parser().parse_args(argv)
    try:
        args.func(args)
    except (ValueError, TypeError, OSError, RuntimeError, NotImplementedError) as error:
        sys.exit(f"error: {error}")


if __name__ == "__main__":
    main()
