"""`python -m fmnist`: the command line (fmnist.cli)."""

import sys

from fmnist.cli import main

sys.exit(main())
