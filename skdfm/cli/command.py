"""The ``skdfm`` command line: one parser, each command's checks, and ``main``."""

from __future__ import annotations

import argparse

from .._core.files import Terminated, terminate_as_exception
from . import demo, evaluate, export, fit, score
from .options import (
    EXIT_FAILED,
    EXIT_INTERRUPTED,
    EXIT_TERMINATED,
    CommandError,
    check_output,
    check_report,
    describe,
    say,
)

__all__ = ["build_parser", "main"]

COMMANDS = (demo, fit, score, export, evaluate)


def build_parser() -> argparse.ArgumentParser:
    from .. import __version__

    parser = argparse.ArgumentParser(
        prog="skdfm",
        description="Deep Feature Modeling (DFM) anomaly detection: fit on images "
        "of good parts, score new ones, localise defects.",
        epilog="Exit codes: 0 done; 1 failed; 2 bad command line; 3 done, some "
        "images skipped (listed on stderr); 130 interrupted; 143 terminated. Model "
        "files are .skdfm (data, checked when loaded); pickles only with "
        "--allow-pickle.",
    )
    parser.add_argument("--version", action="version", version=f"skdfm {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for command in COMMANDS:
        command.add_parser(commands)
    return parser


def _check_files(parser, args) -> None:
    """The files the command line names for writing, checked for every command."""
    if getattr(args, "output", None) is not None:
        check_output(parser, args.output)
    if getattr(args, "csv", None) is not None:
        check_output(parser, args.csv, flag="--csv", model=False)
    if getattr(args, "json", None) is not None:
        check_output(parser, args.json, flag="--json", model=False)
    if getattr(args, "report", None) is not None:
        check_report(parser, args.report)


def main(argv=None) -> int:
    """Run the ``skdfm`` command; returns the exit code."""
    parser = build_parser()
    args = parser.parse_args(argv)
    # Everything the command line decides is checked before any image is read.
    _check_files(parser, args)
    args.check(parser, args)
    try:
        with terminate_as_exception():
            return args.func(args)
    except (CommandError, OSError, ValueError, MemoryError) as error:
        say(f"skdfm: error: {describe(error)}")
    except KeyboardInterrupt:
        say("skdfm: interrupted")
        return EXIT_INTERRUPTED
    except Terminated:
        say("skdfm: terminated")
        return EXIT_TERMINATED
    return EXIT_FAILED
