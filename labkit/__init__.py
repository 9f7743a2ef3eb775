"""labkit: the orchestrator's library behind `lab.py`.

The pure core — experiment files (:mod:`labkit.config`), case expansion
(:mod:`labkit.matrix`), the `expect.check` language (:mod:`labkit.expr`) and
statistics over results (:mod:`labkit.stats`) — does no I/O beyond reading a
config file: no Docker, no subprocesses, no sockets.
"""
