"""Host runtime of a dynamic network saved by nestnas (`nestnas.rewrite(...).save(folder)`).

This file is copied byte for byte into every saved program as ``host.py``; beside it,
``program.py`` holds the model's ``forward`` with its control flow kept and its tensor code
replaced by calls to static subgraphs compiled for ONNX Runtime or TVM. Needs numpy and the
chosen runtime only (no torch, no nestnas)::

    import host
    model = host.load("onnxruntime")   # or "tvm"; checksums verified before anything is loaded
    y = model(x)

nestnas itself imports this module (`nestnas.compile.dynamic_host`) to run and verify the
programs it saves, so what a bundle ships is the code its tests ran.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import tempfile
import warnings
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
FORMAT, VERSION = "nestnas-dynamic", 2
HOST_FILE, PROGRAM_FILE, MANIFEST = "host.py", "program.py", "manifest.json"
BACKENDS = ("onnxruntime", "tvm")


def as_bool(v):
    """A tensor condition as a Python bool (one element: batch size 1)."""
    a = np.asarray(v)
    if a.size != 1:
        raise ValueError(f"a condition on a tensor of {a.size} elements is ambiguous (batch size 1 expected)")
    return bool(a.reshape(-1)[0])


def as_int(v):
    """A tensor used as an index (a ModuleList entry) as a Python int."""
    a = np.asarray(v)
    if a.size != 1:
        raise ValueError(f"an index from a tensor of {a.size} elements is ambiguous (batch size 1 expected)")
    return int(a.reshape(-1)[0])


def aligned(v, dtype, copy=False):
    """`v` as a C-contiguous array of `dtype` (None: its own) at a 64-byte aligned address, as
    TVM takes arrays without a copy; a copy only where `v` is not one already (or `copy`)."""
    a = np.asarray(v, dtype=dtype)
    if not copy and a.flags.c_contiguous and a.ctypes.data % 64 == 0:
        return a
    buf = np.empty(a.nbytes + a.itemsize + 64, np.uint8)  # an item more: an empty view keeps the address
    start = -buf.ctypes.data % 64
    out = buf[start:start + a.nbytes + a.itemsize].view(a.dtype)[:a.size].reshape(a.shape)
    out[...] = a
    return out


def branch(_id, taken):
    """Where a branch is decided (nestnas records coverage here while it runs the model eagerly)."""
    return taken


def flatten(values):
    """The arrays inside `values` (tensors, or tuples and lists of them, or None, as an LSTM's
    state is) and the structure that holds them: "t" for an array, None, or [kind, [items]]."""
    leaves = []

    def spec(v):
        if v is None:
            return None
        if isinstance(v, (tuple, list)):
            return ["tuple" if isinstance(v, tuple) else "list", [spec(x) for x in v]]
        leaves.append(v)
        return "t"
    return leaves, [spec(v) for v in values]


def unflatten(leaves, specs):
    """The values `flatten` took apart, rebuilt from their arrays."""
    items = iter(leaves)

    def build(s):
        if s is None:
            return None
        if s == "t":
            return next(items)
        kind, inner = s
        values = [build(x) for x in inner]
        return tuple(values) if kind == "tuple" else values
    return tuple(build(s) for s in specs)


def key(segment, inputs, params):
    """The subgraph compiled for `segment` at these host values and input shapes (and, where an
    input is a tuple or None, their structure)."""
    return key_of(segment, *flatten(inputs), params)


def key_of(segment, leaves, specs, params):
    """`key` from the arrays and structure `flatten` gave (the runtime flattens once a call)."""
    shapes = ";".join("x".join(str(int(d)) for d in np.shape(v)) for v in leaves)
    structure = "" if all(s == "t" for s in specs) else "|" + json.dumps(specs, separators=(",", ":"))
    return segment + "|" + ",".join(f"{k}={params[k]!r}" for k in sorted(params)) + "|" + shapes + structure


def program_forward(source, filename=PROGRAM_FILE, branch_hook=branch):
    """The `forward` of a program's source, run with the names the host code may use."""
    namespace = {"__bool": as_bool, "__int": as_int, "__branch": branch_hook, "np": np, "math": math,
                 "warnings": warnings, "__name__": "program"}
    exec(compile(source, str(filename), "exec"), namespace)  # noqa: S102 - checked against the manifest
    return namespace["forward"]


def sha256(data):
    return hashlib.sha256(data).hexdigest()


class LoadError(RuntimeError):
    """A subgraph the runtime cannot load (`key` names it, `why` is the runtime's first line)."""

    def __init__(self, key, exc):
        self.key, self.why = key, (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        super().__init__(f"subgraph {key}: {self.why}")


class Subgraphs:
    """Every compiled subgraph of a saved program, callable by `key`."""

    def __init__(self, folder, manifest, backend, threads, session_options=None):
        if backend not in BACKENDS:
            raise ValueError(f"backend {backend!r}; allowed: {list(BACKENDS)}")
        self.folder, self.backend = Path(folder), backend
        self.sums = manifest["artifacts"]
        self.threads = threads or manifest.get("threads") or 1
        self.session_options = session_options
        self.calls = {}
        self.trees = {k: entry.get("out_tree") for k, entry in manifest["subgraphs"].items()}
        for k, entry in manifest["subgraphs"].items():
            try:
                self.calls[k] = self._load(entry)
            except Exception as exc:  # noqa: BLE001 - the runtimes raise their own types
                raise LoadError(k, exc) from exc

    def read(self, name):
        """The bytes of artifact `name`, refused unless they match the manifest's checksum."""
        data = (self.folder / name).read_bytes()
        if self.sums.get(name) != sha256(data):
            raise RuntimeError(f"{name} does not match its checksum in manifest.json; refusing to load it")
        return data

    def _load(self, entry):
        feeds = entry["feeds"]  # the inputs the exported graph kept (an input used for .device is dropped)
        dtypes = [np.dtype(d) for d in entry["dtypes"]]
        if self.backend == "onnxruntime":
            import onnxruntime as ort

            opts = self.session_options
            if opts is None:
                opts = ort.SessionOptions()
                opts.intra_op_num_threads, opts.log_severity_level = self.threads, 3
            session = ort.InferenceSession(self.read(entry["onnx"]), opts, providers=["CPUExecutionProvider"])
            names = entry["inputs"]

            def call(inputs):
                feed = {n: np.asarray(inputs[i], dtype=d) for n, i, d in zip(names, feeds, dtypes)}
                return tuple(session.run(None, feed))
            return call
        import tvm
        from tvm import relax

        fd, private = tempfile.mkstemp(suffix=".so")
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(self.read(entry["tvm"]))
            lib = tvm.runtime.load_module(private)
        finally:
            os.unlink(private)  # the loaded mapping outlives the name
        main = relax.VirtualMachine(lib, tvm.cpu())["main"]
        n_out = len(entry["outputs"])
        from_dlpack = tvm.runtime.from_dlpack

        # DLPack both ways: tvm.runtime.tensor() and .numpy() copy through TVM's C API, ~150 us a
        # call for a 4-float subgraph against ~5 us. Inputs are passed without a copy when
        # 64-byte aligned (TVM's requirement); outputs are copied into aligned arrays of their own
        # (the next subgraph takes them as they are; nothing aliases the module's memory).
        def call(inputs):
            out = main(*[from_dlpack(aligned(inputs[i], d)) for i, d in zip(feeds, dtypes)])
            outs = [out] if n_out == 1 and hasattr(out, "shape") else list(out)
            return tuple(aligned(np.from_dlpack(o), None, copy=True) for o in outs)
        return call

    def __call__(self, segment, inputs, params):
        leaves, specs = flatten(inputs)
        k = key_of(segment, leaves, specs, params)
        call = self.calls.get(k)
        if call is None:
            raise KeyError(f"subgraph {k} was never compiled: the example inputs given to rewrite() "
                           "never reached this branch or shape")
        out = call(leaves)
        tree = self.trees.get(k)
        return unflatten(out, tree) if tree else out


def read_manifest(folder):
    """The manifest of a saved program, refused when it is of another format or version."""
    path = Path(folder) / MANIFEST
    manifest = json.loads(path.read_text())
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT or manifest.get("version") != VERSION:
        found = manifest.get("version") if isinstance(manifest, dict) else None
        raise RuntimeError(f"{path}: not a {FORMAT} manifest of version {VERSION} (version {found!r}); "
                           "save the program again with this nestnas")
    return manifest


class Model:
    """The dynamic network on one backend: numpy in, numpy out. `run` calls the subgraphs."""

    def __init__(self, backend="onnxruntime", threads=None, folder=HERE, session_options=None):
        folder = Path(folder)
        manifest = read_manifest(folder)
        self.run = Subgraphs(folder, manifest, backend, threads, session_options)
        self.forward = program_forward(self.run.read(PROGRAM_FILE).decode(), folder / PROGRAM_FILE)

    def __call__(self, *args, **kwargs):
        return self.forward(self.run, *args, **kwargs)


def load(backend="onnxruntime", threads=None, folder=HERE):
    """The program saved in `folder` (by default the one this file was saved into)."""
    return Model(backend, threads, folder)
