"""`python -m nestnas.compile.verify BUNDLE BACKEND`: load a bundle's artifact in this (fresh)
process, manifest, signature and checksums first, run the check input(s) and print the largest
difference from torch."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np

from nestnas.compile.bundle import CHECK_OUTPUT, check_inputs, load_bundle, read_array, verify_checksums


def main(argv: list[str]) -> int:
    bundle, backend = Path(argv[0]), argv[1]
    manifest = verify_checksums(bundle)
    model = load_bundle(bundle, backend)
    x, want = check_inputs(bundle, manifest), read_array(bundle, manifest, CHECK_OUTPUT)
    print(json.dumps({"backend": backend, "max_abs_diff": float(np.abs(model(x) - want).max())}))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
