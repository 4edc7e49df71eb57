"""``python -m engine.cli`` runs the medrelay command line."""

from engine.cli.main import main

main()
