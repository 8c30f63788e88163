"""The few TVM touch points, imported lazily: TVM is an optional extra, so nothing here may
import it at module load, and a missing install becomes one clear `BackendUnavailable`."""

from __future__ import annotations

import contextlib
import os
import sys
import tempfile
import threading
from typing import Any, Iterator

from nestnas.errors import BackendUnavailable

_MISSING = "backend 'tvm' needs the tvm extra: pip install 'nestnas[tvm]'"
_pool = threading.local()  # TVM's thread pool is per calling thread; so is our record of its size
_SHARE_ALL_CORES = -3  # tvm::runtime::threading::ThreadGroup::kSpecifyThreadShareAllCore


def require_tvm() -> Any:
    """Import and return the `tvm` module, or raise `BackendUnavailable`."""
    try:
        import tvm
    except (ImportError, OSError) as exc:  # OSError: a wheel whose shared library cannot load
        raise BackendUnavailable(_MISSING) from exc
    return tvm


def host_target(threads: int) -> Any:
    """LLVM target for this machine's CPU, with `num-cores` set to the thread budget (used by
    MetaSchedule when tuning; the runtime pool is set separately by `use_threads`)."""
    tvm = require_tvm()
    cpu = tvm.target.codegen.llvm_get_system_cpu()
    return tvm.target.Target({"kind": "llvm", "mcpu": cpu, "num-cores": threads})


def use_threads(threads: int) -> None:
    """Size the TVM runtime thread pool of the calling thread to `threads` workers sharing all
    allowed cores (no pinning, so a busy core does not stall one worker).

    Needed because TVM's default halves `hardware_concurrency()` on x86 (it assumes
    hyper-threading) and ignores the target's `num-cores`. The pool is shared by every model run
    from that thread, so this is called before each run and skipped when it already has the
    requested size.
    """
    if getattr(_pool, "threads", None) == threads:
        return
    tvm = require_tvm()
    cpus = [str(c) for c in sorted(os.sched_getaffinity(0))] if hasattr(os, "sched_getaffinity") else []
    cpus = cpus or [str(c) for c in range(os.cpu_count() or 1)]
    tvm.get_global_func("runtime.config_threadpool")(_SHARE_ALL_CORES, threads, cpus)
    _pool.threads = threads


@contextlib.contextmanager
def native_warnings_dropped() -> Iterator[None]:
    """Drop the warnings TVM's C++ code writes straight to file descriptor 2 while compiling
    (e.g. "Fast mode segfaults when there are out-of-bounds indices" for every constant Gather,
    "Unknown pragma pragma_scope"); any other line written meanwhile is passed on to stderr.
    Profiling compiles hundreds of subnets, so these would otherwise flood the terminal."""
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile() as log:
        os.dup2(log.fileno(), 2)
        try:
            yield
        finally:
            os.dup2(saved, 2)
            os.close(saved)
            log.seek(0)
            kept = [line for line in log.read().decode(errors="replace").splitlines(keepends=True)
                    if "Warning:" not in line]
            if kept:
                sys.stderr.write("".join(kept))


@contextlib.contextmanager
def native_output_to(path: str | os.PathLike) -> Iterator[None]:
    """Append everything written to file descriptors 1 and 2 meanwhile (MetaSchedule's task
    tables and C++ log lines) to `path` instead of the terminal."""
    sys.stdout.flush()
    sys.stderr.flush()
    saved = [os.dup(1), os.dup(2)]
    with open(path, "ab") as log:
        os.dup2(log.fileno(), 1)
        os.dup2(log.fileno(), 2)
        try:
            yield
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            for fd, old in zip((1, 2), saved):
                os.dup2(old, fd)
                os.close(old)


def load_tensor_intrinsics() -> None:
    """Import TVM's tensor intrinsics (MetaSchedule imports them before any tuning) quickly.

    They are ~250 TVMScript functions, each parsed after an `inspect.stack()` whose
    `inspect.getmodule` scans all of `sys.modules` per frame: 23-40 s on two cores. Frames and
    code objects map to their module through their file only, so memoising that lookup for the
    duration of the import gives the same answers in ~3 s."""
    if "tvm.s_tir.tensor_intrin" in sys.modules:
        return
    import inspect

    require_tvm()
    original = inspect.getmodule
    by_file: dict[tuple[str, str | None], Any] = {}

    def getmodule(obj, _filename=None):
        code = obj.f_code if inspect.isframe(obj) else obj if inspect.iscode(obj) else None
        if code is None:
            return original(obj, _filename)
        key = (code.co_filename, _filename)
        if key not in by_file:
            by_file[key] = original(obj, _filename)
        return by_file[key]

    inspect.getmodule = getmodule
    try:
        import tvm.s_tir.tensor_intrin  # noqa: F401
    finally:
        inspect.getmodule = original
