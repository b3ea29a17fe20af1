"""``python -m lrcompile`` runs the CLI."""

from lrcompile.cli import main

main()
