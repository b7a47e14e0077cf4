"""The statistics of a sweep live in ``asymlora.sweep.stats``; this name stays for code that
imports them from here."""
from asymlora.sweep.stats import *  # noqa: F401,F403
from asymlora.sweep.stats import __all__  # noqa: F401
