"""``python -m serve RUN_DIR [options]``: the same as ``phiclip serve``."""

import sys

from serve.cli import main

sys.exit(main())
