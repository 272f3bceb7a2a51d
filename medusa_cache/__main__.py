"""``python -m medusa_cache`` (also what torchrun launches)."""

import sys

from .cli import main

sys.exit(main())
