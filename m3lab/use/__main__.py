"""``python -m m3lab.use MODEL REQUEST``: a fine-tuned model scored in its own process (``m3lab.use.score``)."""

import sys

from m3lab.use import main

sys.exit(main())
