"""``python -m ipcbus``: the command line."""

from .cli import main

main()
