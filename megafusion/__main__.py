"""`python -m megafusion ...` is the `megafusion` command (what launchers use with --module / -m)."""

import sys

from megafusion.cli import main

sys.exit(main())
