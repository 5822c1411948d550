"""``python -m ivtrainer.cli``."""

import sys

from ivtrainer.cli import main

sys.exit(main())
