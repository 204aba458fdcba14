from m3lab.cli import entry

entry()
