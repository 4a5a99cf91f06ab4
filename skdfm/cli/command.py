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
        "files are .skdfm (data, checked when loaded; pickles only with "
        "--allow-pickle); score and evaluate also take exported .onnx / .xml "
        "files. A command replaces files that exist only with --overwrite.",
    )
    parser.add_argument("--version", action="version", version=f"skdfm {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for command in COMMANDS:
        command.add_parser(commands)
    return parser


def _check_files(parser, args) -> None:
    """The files the command line names for writing, checked for every command:
    one that exists is replaced only with --overwrite."""
    overwrite = getattr(args, "overwrite", False)
    if getattr(args, "output", None) is not None:
        check_output(parser, args.output, overwrite=overwrite)
    if getattr(args, "csv", None) is not None:
        check_output(parser, args.csv, flag="--csv", model=False, overwrite=overwrite)
    if getattr(args, "json", None) is not None:
        check_output(parser, args.json, flag="--json", model=False, overwrite=overwrite)
    if getattr(args, "report", None) is not None:
        check_report(parser, args.report, overwrite=overwrite)


def main(argv=None) -> int:
    """Run the ``skdfm`` command; returns the exit code."""
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        # Everything the command line decides is checked before any image is read.
        _check_files(parser, args)
        args.check(parser, args)
    except ModuleNotFoundError as error:
        return _not_installed(args, error)
    try:
        with terminate_as_exception():
            return args.func(args)
    except ModuleNotFoundError as error:
        return _not_installed(args, error)
    except (CommandError, OSError, ValueError, MemoryError) as error:
        say(f"skdfm: error: {describe(error)}")
    except KeyboardInterrupt:
        say("skdfm: interrupted")
        return EXIT_INTERRUPTED
    except Terminated:
        say("skdfm: terminated")
        return EXIT_TERMINATED
    return EXIT_FAILED


def _not_installed(args, error: ModuleNotFoundError) -> int:
    """A package of the training side missing (``skdfm fit`` where only
    skdfm-runtime is installed): one line saying what to install, exit 1; any
    other missing module is a bug, raised."""
    from .._deploy.runtime import needs_full_install

    clear = needs_full_install(f"skdfm {args.command}", error)
    if clear is None:
        raise error
    say(f"skdfm: error: {clear}")
    return EXIT_FAILED
