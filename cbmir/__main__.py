"""`python -m cbmir` runs the command line."""

from cbmir.cli import app

app()
