"""Normalization layers: torch eager vs torch.compile vs normlab (see ``normlab.bench``).

    PYTHONPATH=. python benchmarks/norms.py [--quick] [--markdown] [--threads N] [--layers A,B]
"""

from __future__ import annotations

import sys

from normlab.bench import main

if __name__ == "__main__":
    sys.exit(main())
