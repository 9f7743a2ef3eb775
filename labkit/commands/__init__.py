"""lab.py's commands, a module each; :mod:`labkit.cli` parses the command line and dispatches here."""
