"""`python -m fac` is the `fac` command."""
import sys

from fac.cli import main

sys.exit(main())
