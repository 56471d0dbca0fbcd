"""`python -m daemon` is the same as the `mendd` command."""

from daemon.cli import app

app(prog_name="mendd")
