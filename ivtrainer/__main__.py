"""``python -m ivtrainer`` (and ``accelerate launch -m ivtrainer``): the ``ivtrainer`` command."""

import sys

from ivtrainer.cli import main

if __name__ == "__main__":
    sys.exit(main())
