"""``python -m visual_search ...`` is ``visual-search ...`` (where the console script is not on
PATH, e.g. ``ray job submit --working-dir . -- python -m visual_search embed ...``)."""

import sys

from visual_search.cli import main

sys.exit(main())
