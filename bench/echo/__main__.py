"""python3 bench/echo [--quick]: the echo benchmark alone, its section of the results printed as JSON."""

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from common import log_to_stderr  # noqa: E402
from echo import __doc__ as DOC, run  # noqa: E402

parser = argparse.ArgumentParser(description=DOC.splitlines()[0])
parser.add_argument("--quick", action="store_true")
print(json.dumps(run(parser.parse_args().quick, log_to_stderr), indent=1))
