"""`python -m ddm ...` is the `ddm` command."""

import sys

from ddm.app.cli import main

sys.exit(main())
