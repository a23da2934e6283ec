"""The `lowtide` command: serve the API, run workers, or process one file with no server."""

from lowtide.cli import client, local, models, server  # noqa: F401 - registers their commands on the app
from lowtide.cli.common import app

__all__ = ["app"]
