"""`python -m nestnas.compile.verify BUNDLE BACKEND`: load a bundle's artifact in this (fresh)
process, checksums first, run the check input and print the largest difference from torch."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np

from nestnas.compile.bundle import CHECK_INPUT, CHECK_OUTPUT, load_bundle, verify_checksums


def main(argv: list[str]) -> int:
    bundle, backend = Path(argv[0]), argv[1]
    verify_checksums(bundle, [CHECK_INPUT, CHECK_OUTPUT])
    model = load_bundle(bundle, backend)
    x = np.load(bundle / CHECK_INPUT, allow_pickle=False)
    want = np.load(bundle / CHECK_OUTPUT, allow_pickle=False)
    print(json.dumps({"backend": backend, "max_abs_diff": float(np.abs(model(x) - want).max())}))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
