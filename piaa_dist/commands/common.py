"""What the ``piaa-dist`` CLI and the ``jobs/*.py`` scripts share: one parser per command, the
``-v`` flag, logging set-up and the one-line handling of user errors.

A command module (``piaa_dist/commands/<name>.py``) defines ``HELP`` (one line),
``DESCRIPTION`` (what ``piaa-dist <name> --help`` shows a user), ``add_arguments(parser)`` and
``run(args) -> int``. The CLI adds each as a subcommand; a job script builds the very same
parser with :func:`command_parser` (optionally with documented keyword arguments of
``add_arguments``, e.g. another ``--out`` default), so a flag is defined once.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import sys
from types import ModuleType
from typing import Any, Sequence

LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


def command_module(name: str) -> ModuleType:
    """The module of subcommand ``name`` (dashes become underscores)."""
    return importlib.import_module(f"piaa_dist.commands.{name.replace('-', '_')}")


def add_verbose_argument(parser: argparse.ArgumentParser, *, top_level: bool = False) -> None:
    """``-v/--verbose``: debug logging and Ray's own logs in full.

    On a subcommand (or job) parser the default is suppressed, so ``piaa-dist -v train`` and
    ``piaa-dist train -v`` both work and neither resets the other.
    """
    parser.add_argument(
        "-v", "--verbose", action="store_true",
        default=False if top_level else argparse.SUPPRESS,
        help="debug logging, and Ray's own INFO logs (hidden by default; also "
             "PIAA_DIST_RAY_LOGS=full)",
    )


def configure_logging(verbose: bool) -> None:
    """Root logging for a command run: INFO (DEBUG with ``-v``) to stderr.

    Quiet by default: other libraries' INFO chatter
    (:data:`piaa_dist.orchestration.ray_logging.CHATTY_LOGGERS`, here and in Ray's workers) and
    MLflow's ``Downloading artifacts`` progress bars appear only with ``-v``; colour codes (Ray's
    worker-line prefixes and its "[repeated Nx across cluster]" notes) only when the output is a
    terminal. Settings go into the environment (``setdefault``: an operator's explicit value
    wins) before MLflow or Ray is imported, so that they reach the processes started later too.

    ``-v`` also asks for Ray's own logs in full (see :mod:`piaa_dist.orchestration.ray_logging`);
    it is remembered in the environment so that Ray workers and jobs started later see it.
    """
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO, format=LOG_FORMAT,
                        datefmt="%H:%M:%S")
    # MLflow reads these when it is imported / when it downloads (it is not imported yet here).
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "true" if verbose else "false")
    os.environ.setdefault("MLFLOW_LOGGING_LEVEL", "DEBUG" if verbose else "WARNING")
    if not (sys.stdout.isatty() and sys.stderr.isatty()):
        # Ray colours the "(RayTrainWorker pid=...)" prefix of every forwarded line and the
        # note its log de-duplication appends; in a file or a pipe that is escape codes, not
        # colour (and a log file keeps every worker's line anyway).
        os.environ.setdefault("RAY_COLOR_PREFIX", "0")
        os.environ.setdefault("RAY_DEDUP_LOGS", "0")
    from piaa_dist.orchestration.ray_logging import quiet_libraries, set_ray_logs_full

    if verbose:
        set_ray_logs_full(True)
    else:
        quiet_libraries()


def run_command(module: ModuleType, args: argparse.Namespace) -> int:
    """``module.run(args)``; a user error becomes one logged line and exit status 2."""
    try:
        return int(module.run(args) or 0)
    except KeyboardInterrupt:
        return 130
    except Exception as err:  # noqa: BLE001 - known errors become one clear line
        from piaa_dist.errors import USER_ERRORS
        from piaa_dist.redact import redact_text

        if isinstance(err, USER_ERRORS):
            # Last safeguard: a URI password or a secret environment value never reaches the
            # terminal, even from a message that quoted it.
            logging.getLogger("piaa_dist").error("%s", redact_text(str(err)))
            return 2
        raise


def command_parser(name: str, *, prog: str | None = None, **options: Any) -> argparse.ArgumentParser:
    """A stand-alone parser for command ``name`` (what a ``jobs/<name>.py`` script parses).

    Args:
        name: the subcommand.
        prog: program name shown in usage (default ``jobs/<name>.py``).
        **options: keyword arguments of the command's ``add_arguments`` (documented there).
    """
    module = command_module(name)
    parser = argparse.ArgumentParser(
        prog=prog or f"jobs/{name.replace('-', '_')}.py",
        description=getattr(module, "DESCRIPTION", module.HELP),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_verbose_argument(parser)
    module.add_arguments(parser, **options)
    return parser


def job_main(name: str, argv: Sequence[str] | None = None, **options: Any) -> int:
    """Entry point of ``jobs/<name>.py``: the command's own parser, logging and run."""
    args = command_parser(name, **options).parse_args(list(sys.argv[1:] if argv is None else argv))
    configure_logging(getattr(args, "verbose", False))
    return run_command(command_module(name), args)


__all__ = ["LOG_FORMAT", "add_verbose_argument", "command_module", "command_parser",
           "configure_logging", "job_main", "run_command"]
