"""The ``qsearch`` command line (typer + rich).

Every command module registers itself on :data:`app`. ``main`` runs the app so that a
:class:`~qsearch.errors.QsearchError` or a usage error prints one clear line and exits with
code 2 — never a traceback.
"""

from __future__ import annotations

import sys

import click
import typer

from typer.exceptions import TyperException

# typer >= 0.16 vendors click, so its usage errors are not click's: both derive from a public
# base (click's ClickException, typer's TyperException) and carry ``format_message``.
_ClickErrors = (click.exceptions.ClickException, TyperException)
_Abort = (click.exceptions.Abort, typer.Abort)
_Exit = (click.exceptions.Exit, typer.Exit)
from rich.console import Console

from qsearch.errors import QsearchError

app = typer.Typer(
    name="qsearch",
    help="Hyperparameter and mixed-precision search for quantization-aware training.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
console = Console()
err_console = Console(stderr=True, soft_wrap=True)  # an error stays one line, never wrapped


def _print_version(value: bool) -> None:
    if value:
        from qsearch import __version__

        print(f"qsearch {__version__}")
        raise typer.Exit()


@app.callback()
def _options(
    version: bool = typer.Option(False, "--version", callback=_print_version, is_eager=True,
                                 help="print the version and exit"),
) -> None:
    pass


def _register_commands() -> None:
    import importlib
    import pkgutil

    import qsearch.cli as pkg

    for mod in pkgutil.iter_modules(pkg.__path__):
        if mod.name.endswith("_cmd"):
            importlib.import_module(f"qsearch.cli.{mod.name}")


def _one_line_warning(message: Warning | str, category: type[Warning], filename: str,
                      lineno: int, file: object = None, line: str | None = None) -> None:
    """Warnings reach the terminal as one ``warning: ...`` line (no source line)."""
    err_console.print(f"[yellow]warning:[/] {message}", highlight=False)


def main(argv: list[str] | None = None) -> int:
    import warnings

    warnings.showwarning = _one_line_warning
    _register_commands()
    command = typer.main.get_command(app)
    try:
        rv = command.main(args=argv, prog_name="qsearch", standalone_mode=False)
    except QsearchError as e:
        err_console.print(f"[bold red]error:[/] {e}", highlight=False)
        return 2
    except _Abort:
        err_console.print("aborted")
        return 130
    except _Exit as e:
        return e.exit_code
    except _ClickErrors as e:
        if not hasattr(e, "format_message"):
            raise
        err_console.print(f"[bold red]error:[/] {e.format_message()}", highlight=False)
        ctx = getattr(e, "ctx", None)
        if ctx is not None:
            err_console.print(f"Try '{ctx.command_path} --help'.", highlight=False)
        return 2
    return rv if isinstance(rv, int) else 0


def entry() -> None:
    sys.exit(main())
