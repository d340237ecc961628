"""python -m cli: the same as the pa-clip console script."""

import sys

from cli.main import main

sys.exit(main())
