import sys
from pathlib import Path

# Test helpers (the dynamic-network suite) import as top-level modules under --import-mode=importlib.
sys.path.insert(0, str(Path(__file__).parent))
