"""``python -m vlmtune.serve RUN_DIR [options]``: the same as ``vlmtune serve``."""

import sys

from vlmtune.serve.cli import main

sys.exit(main())
