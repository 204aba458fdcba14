"""``python -m m3lab``: the ``m3lab`` command line (``m3lab.cli``)."""

from m3lab.cli import entry

entry()
