"""The `tierwriter` command (Click): a plain gRPC client of the orchestrator, plus `up` and
`demo`, which start the services in this process.

Click, not argparse: each option is declared on the command that handles it, with its
environment variable beside it, and shell completion comes with it. The client commands import
only the gRPC client and the protos: `up` and `demo` import the services (the openai SDK,
SQLAlchemy) when they run, so `tierwriter --help` or `jobs list` starts in a fraction of a
second (tests/unit/test_cli_imports.py keeps it so).

One module per group of commands: jobs (generate-batch, jobs …), admin (projects, sites,
users), session (login, logout), local (up, demo); common holds what they share."""

from __future__ import annotations

import sys
from collections.abc import Sequence

import click

# The commands register on the group as their modules load.
from orchestrator_service.cli import admin, jobs, local, session  # noqa: F401
from orchestrator_service.cli.app import cli
from orchestrator_service.cli.common import (
    EXIT_BAD_INPUT,
    EXIT_BUSY,
    EXIT_INCOMPLETE,
    EXIT_INTERRUPTED,
    EXIT_OK,
    EXIT_RUN_FAILED,
    EXIT_UNAUTHENTICATED,
    EXIT_UNAVAILABLE,
    CliError,
    watch_and_print,
)

__all__ = [
    "EXIT_BAD_INPUT",
    "EXIT_BUSY",
    "EXIT_INCOMPLETE",
    "EXIT_INTERRUPTED",
    "EXIT_OK",
    "EXIT_RUN_FAILED",
    "EXIT_UNAUTHENTICATED",
    "EXIT_UNAVAILABLE",
    "cli",
    "main",
    "watch_and_print",
]


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the `tierwriter` console script; returns the exit code."""
    try:
        result = cli.main(args=argv, prog_name="tierwriter", standalone_mode=False)
    except click.ClickException as e:  # a bad option, argument or file: nothing was called
        e.show()
        return EXIT_BAD_INPUT
    except CliError as e:
        print(f"Error: {e}", file=sys.stderr)
        return e.exit_code
    except (KeyboardInterrupt, click.Abort):
        return EXIT_INTERRUPTED
    return int(result or 0)
