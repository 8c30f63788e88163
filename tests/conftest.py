import sys
from pathlib import Path

import pytest

# Test helpers (the dynamic-network suite) import as top-level modules under --import-mode=importlib.
sys.path.insert(0, str(Path(__file__).parent))

TVM_SKIP_REASON = "needs the tvm extra: pip install 'nestnas[tvm]'"


def pytest_configure(config):
    config.addinivalue_line("markers", f"tvm: {TVM_SKIP_REASON} (skipped without it; the rest of the module runs)")


def tvm_installed() -> bool:
    try:
        import tvm  # noqa: F401
    except ImportError:
        return False
    return True


def pytest_collection_modifyitems(config, items):
    # one rule for every module: a test (or a parameter, via pytest.param(..., marks=pytest.mark.tvm))
    # marked `tvm` is skipped where `import tvm` fails; tvm is imported only if such a test was collected
    marked = [item for item in items if item.get_closest_marker("tvm") is not None]
    if marked and not tvm_installed():
        skip = pytest.mark.skip(reason=TVM_SKIP_REASON)
        for item in marked:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def has_tvm() -> bool:
    """For a test whose ONNX Runtime part runs everywhere and whose TVM part needs the extra."""
    return tvm_installed()
