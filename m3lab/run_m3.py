"""``torchrun -m m3lab.run_m3 ARGS``: the command learners copy. FlagEmbedding's M3 trainer with m3lab's
levers, step recorder and resuming; the runner itself is ``m3lab.train.runner``."""

import sys

from m3lab.train.runner import main

if __name__ == "__main__":
    sys.exit(main())
