"""`python -m chatd` is the `chatd` command."""

from .cli import main

main()
