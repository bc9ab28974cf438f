"""The `maskspec` command. Each area registers its own sub-commands; this file only assembles them and turns
user errors into one readable line (exit code 2) instead of a traceback."""

from __future__ import annotations

import importlib
import sys

import typer

from maskspec import __version__
from maskspec.errors import MaskspecError

app = typer.Typer(help="Several tokens per forward pass from a Hugging Face causal LM, with identical output.",
                  no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False)

# Modules that define `register(app)`; an area not built yet is simply absent.
COMMAND_MODULES = ("maskspec.decode.cli", "maskspec.train.cli", "maskspec.train.draft_vocab_cli",
                   "maskspec.bench.cli", "maskspec.bench.acceptance_cli", "maskspec.serve.cli")


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


def main(argv: list[str] | None = None) -> None:
    try:
        app(args=argv, standalone_mode=True)
    except MaskspecError as exc:
        typer.secho(f"error: {exc}", err=True, fg=typer.colors.RED)
        sys.exit(2)
    except KeyboardInterrupt:
        typer.echo("interrupted", err=True)
        sys.exit(130)


if __name__ == "__main__":
    main()
