"""The ``async-ckpt`` command line (also ``python -m async_ckpt``); the user's guide is
docs/cli.md.

This module owns the entry point: it builds the command group, runs it, and turns every failure
into one line on stderr and an exit code (`common.EXIT_*`). The commands live one per module:
``ls`` (listing.py), ``inspect`` (inspection.py), ``verify`` (verify.py), ``diff`` (diff.py),
``gc`` (cleanup.py), ``export`` (export.py), ``import`` (importer.py); shared plumbing in
common.py (roots, options, steps, errors), output.py (tables, JSON, progress bars) and state.py
(what a checkpoint holds). ``import async_ckpt`` never imports this package, and Click, rich and
safetensors (the ``cli`` extra) are imported only when a command runs.
"""
from __future__ import annotations

import logging
import os
import re
import sys
from typing import Any


def _one_line(text: str) -> str:
    return re.sub(r"\s*\n\s*", "; ", str(text).strip())


def _fail(message: str, code: int) -> int:
    print(f"async-ckpt: error: {_one_line(message)}", file=sys.stderr)
    return code


def build() -> Any:
    """The click group with every command."""
    import click

    from .cleanup import gc
    from .diff import diff
    from .export import export
    from .importer import import_
    from .inspection import inspect
    from .listing import ls
    from .verify import verify

    @click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
    @click.version_option(package_name="async_ckpt", prog_name="async-ckpt")
    @click.option("--debug", is_flag=True, help="show tracebacks and the library's info logs")
    def cli(debug: bool) -> None:
        """Look after async_ckpt checkpoints on local disk or any URL the library reads
        (s3://...: pass --storage-option key=value, or use the usual AWS credentials).

        \b
        Example:
          async-ckpt ls ./checkpoints
          async-ckpt verify ./checkpoints --all
          async-ckpt export ./checkpoints --component model --to model.safetensors
        """
        logging.basicConfig(level=logging.INFO if debug else logging.WARNING,
                            format="async-ckpt: %(levelname)s: %(message)s")
        if debug:
            os.environ["ASYNC_CKPT_DEBUG"] = "1"

    for command in (ls, inspect, verify, diff, gc, export, import_):
        cli.add_command(command)
    return cli


def main(argv: list[str] | None = None) -> int:
    """Run the command line with `argv` (default: sys.argv[1:]); the exit status."""
    args = sys.argv[1:] if argv is None else list(argv)
    debug = "--debug" in args or bool(os.environ.get("ASYNC_CKPT_DEBUG"))
    try:
        import click
    except ImportError as exc:
        return _fail(f"the async-ckpt command needs the cli extra ({exc.name} is missing): "
                     "pip install 'async_ckpt[cli]'", 3)
    from ..errors import (CheckpointError, InvalidArgumentError, StorageConfigError,
                          StorageUnavailableError, translate_storage_error)
    from ..storage import StorageError
    from .common import EXIT_FAILED, EXIT_STORAGE, EXIT_USAGE, CliError

    try:
        result = build().main(args=args, prog_name="async-ckpt", standalone_mode=False)
        return result if isinstance(result, int) else 0
    except click.exceptions.Exit as exc:
        return exc.exit_code
    except click.exceptions.Abort:
        return _fail("aborted", 130)
    except click.UsageError as exc:
        where = exc.ctx.command_path if exc.ctx is not None else "async-ckpt"
        return _fail(f"{where}: {exc.format_message()} (see {where} --help)", EXIT_USAGE)
    except click.ClickException as exc:
        return _fail(exc.format_message(), exc.exit_code)
    except KeyboardInterrupt:
        return _fail("interrupted", 130)
    except BaseException as exc:  # noqa: BLE001 - every failure ends as one line and a status
        if debug:
            import traceback
            traceback.print_exc()
        if isinstance(exc, StorageError):
            exc = translate_storage_error(exc)
        if isinstance(exc, CliError):
            return _fail(str(exc), exc.code)
        if isinstance(exc, (StorageConfigError, StorageUnavailableError)):
            return _fail(str(exc), EXIT_STORAGE)
        if isinstance(exc, InvalidArgumentError):
            return _fail(str(exc), EXIT_USAGE)
        if isinstance(exc, CheckpointError):
            return _fail(str(exc), EXIT_FAILED)
        if isinstance(exc, (PermissionError, ConnectionError, TimeoutError)):
            return _fail(f"{type(exc).__name__}: {exc}", EXIT_STORAGE)
        if isinstance(exc, OSError):
            return _fail(f"{exc}", EXIT_FAILED)
        if isinstance(exc, SystemExit):
            return exc.code if isinstance(exc.code, int) else EXIT_FAILED
        return _fail(f"internal error: {type(exc).__name__}: {exc} (rerun with --debug for the "
                     "traceback, and please report it)", EXIT_FAILED)
