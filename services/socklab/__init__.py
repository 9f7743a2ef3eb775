"""socklab: the programs that run inside the lab's containers.

Stdlib-only by design: the image must build without network access, so nothing
here may import a third-party package.
"""

__version__ = "0.1.0"

# Every JSON result line a role prints carries this key, so the orchestrator can
# pick result lines out of container logs that also hold human-readable output.
RESULT_KEY = "socklab_result"
RESULT_SCHEMA = 1
