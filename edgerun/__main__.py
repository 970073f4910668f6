"""`python -m edgerun` is the `edgerun` command."""
from .cli import run

run()
