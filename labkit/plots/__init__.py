"""The plots of a run (or of several, side by side), drawn from loaded runs alone.

- :mod:`.extract`: what a plot shows, taken from a run (traces, summary, matrix); pure.
- :mod:`.kit`: the drawing kit: colour per mode, style per run, figure, legend, save.
- :mod:`.kinds`: the registry of plot kinds that report and compare draw; each kind's
  extraction and drawing are in :mod:`.timeline`, :mod:`.bars`, :mod:`.latency`,
  :mod:`.queue`, :mod:`.tseq`.
"""

from .kinds import PLOT_KINDS, PlotFile, PlotKind, draw_plots
from .kit import MAX_RUNS, MODE_COLOURS, RUN_STYLE_NAMES, mode_colour

__all__ = ["MAX_RUNS", "MODE_COLOURS", "PLOT_KINDS", "PlotFile", "PlotKind", "RUN_STYLE_NAMES", "draw_plots",
           "mode_colour"]
