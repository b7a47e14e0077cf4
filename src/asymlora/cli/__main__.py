"""``python -m asymlora.cli`` runs the command line (the tests start sweeps this way)."""
import sys

from asymlora.cli.main import main

sys.exit(main())
