"""``python -m engine.cli`` runs the medrelay command line."""

from engine.cli import main

main()
