"""`python -m distill3d` runs the CLI."""

import sys

from .cli import main

sys.exit(main())
