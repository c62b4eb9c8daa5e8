"""``python -m fused_ckpt.bench``: the benchmark suites (see :mod:`fused_ckpt.bench`)."""
import sys

from ._main import main

if __name__ == "__main__":
    sys.exit(main())
