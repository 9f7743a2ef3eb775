#!/usr/bin/env python3
"""socklab's orchestrator: python lab.py {run,check,list,doctor,report,link,clean} ...

Thin on purpose: everything lives in labkit/ (and the container side in services/).
"""

import sys
from pathlib import Path

_ROOT = Path(__file__).resolve().parent
sys.path[:0] = [str(_ROOT / "services"), str(_ROOT)]

from labkit.cli import main  # noqa: E402  (the path above must come first)

if __name__ == "__main__":
    sys.exit(main())
