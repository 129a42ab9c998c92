from rlm.cli import entry

entry()
