"""Shared test set-up: the container package and the orchestrator on sys.path."""

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
for path in (ROOT / "services", ROOT):
    if str(path) not in sys.path:
        sys.path.insert(0, str(path))
