"""The `maskspec` command. Each area registers its own sub-commands; this file only assembles them and turns
user errors into one readable line (exit code 2) instead of a traceback."""

from __future__ import annotations

import contextlib
import importlib
import os
import sys
import warnings
from collections.abc import Iterator

import typer

try:  # typer carries its own copy of click; the parse errors are its classes
    from typer._click import exceptions as click_errors
except ImportError:  # older typer: plain click
    from click import exceptions as click_errors

from maskspec.version import __version__
from maskspec.errors import MaskspecError

app = typer.Typer(help="Several tokens per forward pass from a Hugging Face causal LM, with identical output.",
                  no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False)

# Modules that define `register(app)`; an area not built yet is simply absent.
COMMAND_MODULES = ("maskspec.decode.cli", "maskspec.train.cli", "maskspec.train.draft_vocab_cli",
                   "maskspec.bench.cli", "maskspec.bench.acceptance_cli", "maskspec.bench.tune",
                   "maskspec.serve.cli")


def _version_callback(value: bool) -> None:
    if value:
        typer.echo(f"maskspec {__version__}")
        raise typer.Exit()


@app.callback()
def _root(version: bool = typer.Option(False, "--version", callback=_version_callback, is_eager=True,
                                       help="Print the version and exit.")) -> None:
    pass


for _name in COMMAND_MODULES:
    try:
        _module = importlib.import_module(_name)
    except ModuleNotFoundError as _exc:
        if _exc.name != _name:
            raise
        continue
    _module.register(app)


def _one_line(message: str) -> str:
    return " ".join(str(message).split())


_PACKAGE_FOLDER = os.path.dirname(os.path.abspath(__file__)) + os.sep


@contextlib.contextmanager
def _own_warnings_as_lines() -> Iterator[None]:
    """maskspec's own warnings are notes to the user: one `warning:` line, without the file, line number and source
    line Python adds. Warnings raised elsewhere (torch, transformers) keep their usual form."""
    previous = warnings.showwarning

    def show(message, category, filename, lineno, file=None, line=None):
        if os.path.abspath(str(filename)).startswith(_PACKAGE_FOLDER):
            typer.secho(f"warning: {_one_line(message)}", err=True, fg=typer.colors.YELLOW)
        else:
            previous(message, category, filename, lineno, file, line)

    warnings.showwarning = show
    try:
        yield
    finally:
        warnings.showwarning = previous


def main(argv: list[str] | None = None) -> None:
    try:
        with _own_warnings_as_lines():
            code = app(args=argv, standalone_mode=False, prog_name="maskspec")
    except click_errors.NoArgsIsHelpError as exc:  # plain `maskspec`: the help text
        typer.echo(exc.ctx.get_help() if exc.ctx is not None else "usage: maskspec COMMAND --help", err=True)
        sys.exit(2)
    except click_errors.UsageError as exc:  # a bad option or argument, as one line (click's own format is a box)
        command = exc.ctx.command_path if exc.ctx is not None else "maskspec"
        typer.secho(f"error: {_one_line(exc.format_message())} (see `{command} --help`)", err=True,
                    fg=typer.colors.RED)
        sys.exit(2)
    except MaskspecError as exc:
        typer.secho(f"error: {_one_line(exc)}", err=True, fg=typer.colors.RED)
        sys.exit(2)
    except (KeyboardInterrupt, typer.Abort):
        typer.echo("interrupted", err=True)
        sys.exit(130)
    except click_errors.ClickException as exc:  # e.g. a file option that cannot be opened
        typer.secho(f"error: {_one_line(exc.format_message())}", err=True, fg=typer.colors.RED)
        sys.exit(exc.exit_code)
    except OSError as exc:  # the file system refused mid-run (a full disk, a folder made read-only): one line
        where = f"{exc.filename}: " if exc.filename else ""
        typer.secho(f"error: {where}{_one_line(exc.strerror or exc)}", err=True, fg=typer.colors.RED)
        sys.exit(1)
    sys.exit(code if isinstance(code, int) else 0)


if __name__ == "__main__":
    main()
