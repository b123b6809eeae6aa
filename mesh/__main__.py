"""`python -m mesh` is the `mesh` command."""

from .cli import main

main()
