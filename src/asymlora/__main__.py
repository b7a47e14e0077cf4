"""``python -m asymlora`` runs the command line, as the ``asymlora`` command does."""
import sys

from asymlora.cli.main import main

sys.exit(main())
