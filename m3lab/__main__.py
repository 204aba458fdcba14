import sys

from m3lab.cli import main

sys.exit(main())
