"""Property-based fuzzing of the CLI's user-error contract (issue 14, section 6).

Every document kind nestnas reads (device profiles, fronts, predictors, bundle manifests, search
states, checkpoints' training state) is mutated structurally (a key deleted, a value of another
type, NaN, negative or huge, nested deeper than a reader recurses, the file truncated, non-UTF-8
bytes, another top-level type) and handed to the commands that read it; and every command gets
generated option values (negative, zero, huge, not numbers, empty, folders, missing files, /proc,
unknown choices). Each run must exit 0 or 1, print exactly one `error: ` line when it fails, never a
traceback, and leave its working folder as it was (see tests/fuzz_docs.py).

The CLI runs in this process; the real documents are made once per module. NESTNAS_FUZZ_EXAMPLES=N
runs N examples per test instead of the default few; NESTNAS_FUZZ_COLLECT=1 lists every failure
instead of stopping at the first; `python tools/fuzz_report.py` does both and prints the counts.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from nestnas.supernet.checkpoint import read_payload, write_payload

import fuzz_docs as fz
from fuzz_docs import LEDGER, Mutation, mutations, record, run_cli

EXAMPLES = int(os.environ.get("NESTNAS_FUZZ_EXAMPLES", "0"))


def fuzz(n: int):
    """Hypothesis settings: `n` examples by default (NESTNAS_FUZZ_EXAMPLES overrides), reproducible,
    no example database written into the working tree."""
    return settings(max_examples=EXAMPLES or n, deadline=None, derandomize=True, database=None,
                    suppress_health_check=list(HealthCheck), print_blob=False)


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """One real instance of every document: a 1-epoch transformer checkpoint (with training
    state), a 12-subnet profile with every block, a latency predictor fitted on it, a front and its
    search state from a tiny search, an ONNX-only bundle of the front's knee, and an accuracy
    predictor with its table of 7 measured subnets."""
    root = tmp_path_factory.mktemp("fuzz-world")
    home = root / "home"
    # unsigned bundles, whatever key the user has
    with fz.environ(NESTNAS_HOME=str(home), NESTNAS_BUNDLE_KEY=None, NESTNAS_BUNDLE_KEY_FILE=None):
        w = SimpleNamespace(root=root, home=home, cache=home / "evals.sqlite", ckpt=root / "tr.ckpt",
                            profile=root / "profile.json", pred=root / "pred.json", front=root / "front.json",
                            bundle=root / "bundle", acc=root / "acc.json")
        w.state = w.front.with_name(w.front.name + ".state.json")
        t0 = time.perf_counter()
        _train_briefly(w.ckpt)
        _small_profile(w.profile)
        w.seconds = {"checkpoint and profile": round(time.perf_counter() - t0, 1)}
        steps = [
            ["fit", "--profile", w.profile, "--kind", "lut", "--out", w.pred],
            ["search", *_search_args(w), "--out", w.front],
            ["export", "--front", w.front, "--formats", "onnx", "--batch-size", "1", "--threads", "1",
             "--out", w.bundle],
            ["fit", "--checkpoint", w.ckpt, "--samples", "7", "--out", w.acc],
        ]
        for argv in steps:
            t0 = time.perf_counter()
            outcome = run_cli([*argv, "--json"], root, outputs=[root], timeout=600)
            w.seconds[" ".join(map(str, argv[:2]))] = round(time.perf_counter() - t0, 1)
            assert outcome.rc == 0 and not outcome.problems, (argv, outcome.problems, outcome.stderr)
        w.raw = {name: getattr(w, name).read_bytes() for name in ("profile", "pred", "front", "state", "acc")}
        w.raw["table"] = w.acc.with_suffix(".accuracy.json").read_bytes()
        w.raw["manifest"] = (w.bundle / "manifest.json").read_bytes()
        w.smallest = json.dumps(_smallest_config())
        yield w
    if os.environ.get("NESTNAS_FUZZ_REPORT"):
        fz.write_report(os.environ["NESTNAS_FUZZ_REPORT"])
    print(f"\nfuzz fixtures built in {w.seconds} s\n" + LEDGER.line(), file=sys.stderr)


def _train_briefly(path: Path) -> None:
    """A checkpoint with real training state, as `nestnas train --family transformer --epochs 1`
    writes it, from one epoch of two batches (so that resuming it trains nothing)."""
    from torch.utils.data import DataLoader, Subset

    from nestnas.supernet import SearchSpace, build_supernet
    from nestnas.supernet.data import digits_datasets
    from nestnas.supernet.train import train_supernet

    torch.manual_seed(0)
    train, _ = digits_datasets("transformer", 0)
    net = build_supernet(SearchSpace.transformer(), num_classes=10)
    train_supernet(net, DataLoader(Subset(train, range(128)), batch_size=64), 1, seed=0, checkpoint=path,
                   progress=False)


def _small_profile(path: Path, subnets: int = 12) -> None:
    """The shipped transformer profile of ONNX Runtime cut to its first `subnets` subnets (every
    block kept, so each predictor kind can be fitted)."""
    from nestnas.fileio import write_json
    from nestnas.hw_profiles.devices import SHIPPED

    doc = json.loads((SHIPPED / "xeon-2c-onnxruntime-transformer.json").read_text())
    doc["measurements"] = dict(list(doc["measurements"].items())[:subnets])
    doc["name"] = "fuzz"
    write_json(path, doc)


def _search_args(w) -> list:
    """A search small enough to rerun per example: 8 evaluations, the latency predictor, the
    shared cache (so reruns are cache hits)."""
    return ["--checkpoint", w.ckpt, "--predictor", w.pred, "--evals", "8", "--pop-size", "4", "--cache", w.cache]


def _smallest_config() -> dict:
    from nestnas.supernet import SearchSpace

    return SearchSpace.transformer().smallest().to_dict()


class Workdir:
    """A fresh working folder per example, removed afterwards."""

    def __init__(self, world):
        self.path = Path(tempfile.mkdtemp(prefix="ex-", dir=world.root))

    def __enter__(self) -> Path:
        return self.path

    def __exit__(self, *exc):
        shutil.rmtree(self.path, ignore_errors=True)


def _write(path: Path, m: Mutation) -> Path:
    path.write_bytes(m.data)
    return path


def _identity(kind: str, m: Mutation) -> str:
    return fz.digest(kind, m.data)


# --- 1. mutated documents ----------------------------------------------------------------------


@fuzz(12)
@given(data=st.data())
def test_mutated_profiles_in_devices(world, data):
    """`nestnas devices` lists an unreadable profile among the user's and goes on."""
    m = data.draw(mutations(world.raw["profile"]), label="mutation")
    with Workdir(world) as wd:
        (wd / "home" / "profiles").mkdir(parents=True)
        _write(wd / "home" / "profiles" / "mine.json", m)
        with fz.environ(NESTNAS_HOME=str(wd / "home")):
            outcome = run_cli(["devices", "--json"], wd)
        if outcome.rc != 0 and not outcome.problems:
            outcome.problems.append("one bad user profile made `devices` fail")
        elif outcome.rc == 0:
            rows = json.loads(outcome.stdout)
            if not any(r["origin"] == "shipped" and "error" not in r for r in rows) or \
                    not any(r["path"].endswith("mine.json") for r in rows):
                outcome.problems.append("`devices` dropped a profile")
        record("devices <- profile", _identity("profile", m), outcome, m.what, wd)


@fuzz(10)
@given(data=st.data())
def test_mutated_profiles_in_fit_and_search(world, data):
    m = data.draw(mutations(world.raw["profile"]), label="mutation")
    command = data.draw(st.sampled_from(["fit", "fit", "search"]), label="command")
    with Workdir(world) as wd:
        prof = _write(wd / "profile.json", m)
        if command == "fit":
            argv = ["fit", "--profile", prof, "--kind", "lut", "--out", wd / "pred.json", "--json"]
            outputs = ["pred.json"]
        else:
            argv = ["search", "--checkpoint", world.ckpt, "--profile", prof, "--evals", "8", "--pop-size", "4",
                    "--cache", world.cache, "--out", wd / "f.json", "--json"]
            outputs = ["f.json", "f.json.state.json"]
        outcome = run_cli(argv, wd, outputs)
        record(f"{command} --profile", _identity("profile", m), outcome, m.what, wd)


@fuzz(16)
@given(data=st.data())
def test_mutated_fronts(world, data):
    m = data.draw(mutations(world.raw["front"]), label="mutation")
    command = data.draw(st.sampled_from(["show --json", "show", "show", "export"]), label="command")
    with Workdir(world) as wd:
        front = _write(wd / "front.json", m)
        if command == "export":
            argv = ["export", "--front", front, "--formats", "onnx", "--batch-size", "1", "--threads", "1",
                    "--out", wd / "b", "--json"]
        else:
            argv = [*command.split()[:1], front, *command.split()[1:]]
        outcome = run_cli(argv, wd, outputs=["b"])
        record(command.split()[0], _identity("front", m), outcome, m.what, wd)


@fuzz(12)
@given(data=st.data())
def test_mutated_predictors(world, data):
    m = data.draw(mutations(world.raw["pred"]), label="mutation")
    with Workdir(world) as wd:
        shutil.copy2(world.profile, wd / world.profile.name)  # the predictor names its profile relatively
        pred = _write(wd / "pred.json", m)
        argv = ["search", "--checkpoint", world.ckpt, "--predictor", pred, "--evals", "8", "--pop-size", "4",
                "--cache", world.cache, "--out", wd / "f.json", "--json"]
        outcome = run_cli(argv, wd, outputs=["f.json", "f.json.state.json"])
        record("search --predictor", _identity("pred", m), outcome, m.what, wd)


@fuzz(8)
@given(data=st.data())
def test_mutated_accuracy_tables(world, data):
    """`fit --checkpoint` resumes from the accuracy table beside its output."""
    m = data.draw(mutations(world.raw["table"]), label="mutation")
    with Workdir(world) as wd:
        _write(wd / "acc.accuracy.json", m)
        argv = ["fit", "--checkpoint", world.ckpt, "--samples", "7", "--out", wd / "acc.json", "--json"]
        outcome = run_cli(argv, wd, outputs=["acc.json", "acc.accuracy.json"])
        record("fit --checkpoint <- table", _identity("table", m), outcome, m.what, wd)


@st.composite
def bundle_mutations(draw, raw_manifest: bytes, artifacts: list[str]):
    """A mutated manifest, or the bundle's files tampered with."""
    op = draw(st.sampled_from(["manifest"] * 4 + ["delete", "append", "unlisted", "swap"]))
    if op == "manifest":
        m = draw(mutations(raw_manifest))
        return ("manifest", m.what, m.data, None)
    name = draw(st.sampled_from(artifacts))
    return (op, f"{op} {name}", raw_manifest, name)


def _apply_bundle_mutation(bundle: Path, mutation) -> None:
    op, _, manifest, name = mutation
    (bundle / "manifest.json").write_bytes(manifest)
    if op == "delete":
        (bundle / name).unlink()
    elif op == "append":
        with open(bundle / name, "ab") as f:
            f.write(b"\0")
    elif op == "unlisted":
        (bundle / "extra.bin").write_bytes(b"\0" * 8)
    elif op == "swap":  # point the loaded ONNX file at another artifact, checksums kept consistent
        doc = json.loads(manifest)
        doc["files"]["onnx"] = name
        (bundle / "manifest.json").write_text(json.dumps(doc))


@fuzz(12)
@given(data=st.data())
def test_mutated_bundles_in_bench(world, data):
    artifacts = sorted(json.loads(world.raw["manifest"])["artifacts"])
    mutation = data.draw(bundle_mutations(world.raw["manifest"], artifacts), label="mutation")
    with Workdir(world) as wd:
        bundle = fz.fresh_copy(world.bundle, wd / "b")
        _apply_bundle_mutation(bundle, mutation)
        outcome = run_cli(["bench", bundle, "--threads", "1", "--json"], wd)
        record("bench", fz.digest("bundle", *mutation[:3]), outcome, mutation[1], wd)


KEY_A, KEY_B = "a1" * 32, "b2" * 32
KEY_ENVS = [{}, {"NESTNAS_BUNDLE_KEY": KEY_A}, {"NESTNAS_BUNDLE_KEY": KEY_B}, {"NESTNAS_BUNDLE_KEY": "zz"},
            {"NESTNAS_BUNDLE_KEY": "00" * 8}, {"NESTNAS_BUNDLE_KEY_FILE": "<folder>"},
            {"NESTNAS_BUNDLE_KEY_FILE": "<missing>"}, {"NESTNAS_BUNDLE_KEY_FILE": "/proc/nestnas-fuzz"},
            {"NESTNAS_BUNDLE_KEY_FILE": "<text>"}, {"NESTNAS_BUNDLE_KEY_FILE": "/dev/null"},
            {"NESTNAS_BUNDLE_KEY_FILE": "<fifo>"}]


@fuzz(12)
@given(data=st.data())
def test_bundle_keys_and_signatures_in_bench(world, data):
    """Signed and unsigned bundles (some changed after signing, some with a malformed signature)
    under every kind of key setting: bench runs exactly the bundles the trust model allows, and
    refuses the rest in one line."""
    from nestnas.compile.signing import BundleKey, signed

    env = data.draw(st.sampled_from(KEY_ENVS), label="key")
    signing = data.draw(st.sampled_from(["unsigned", "signed", "signed, then changed", "signature mutated"]),
                        label="bundle")
    trust = data.draw(st.booleans(), label="--trust")
    with Workdir(world) as wd:
        _prepare(wd, world)
        bundle = wd / "b"
        manifest = json.loads(world.raw["manifest"])
        if signing != "unsigned":
            manifest = signed(manifest, BundleKey(bytes.fromhex(KEY_A), "test"))
        if signing.endswith("changed"):
            manifest["threads"] = 3
        if signing == "signature mutated":
            where = data.draw(st.sampled_from(["signature", "signature.algorithm", "signature.key_id",
                                               "signature.value"]), label="field")
            value = data.draw(st.sampled_from(fz.BAD_VALUES), label="value")
            parent = manifest if where == "signature" else manifest["signature"]
            parent[where.split(".")[-1]] = value
            signing += f" ({where} = {value!r:.30})"
        (bundle / "manifest.json").write_text(json.dumps(manifest))
        keys = {"NESTNAS_BUNDLE_KEY": None, "NESTNAS_BUNDLE_KEY_FILE": None,
                **{k: _resolve(v, world, wd) for k, v in env.items()}}
        with fz.environ(**keys):
            outcome = run_cli(["bench", bundle, "--threads", "1", "--json", *(["--trust"] if trust else [])], wd)
        key = env.get("NESTNAS_BUNDLE_KEY")
        usable = key in (KEY_A, KEY_B)
        unsigned = signing == "unsigned" or signing == "signature mutated (signature = None)"
        # without a key only checksums are checked (a malformed signature may be refused); with one,
        # a signature must verify, or the bundle be unsigned and trusted; an unreadable key refuses all
        if not env:
            allowed = {0} if signing in ("unsigned", "signed", "signed, then changed") else {0, 1}
        else:
            allowed = {0} if (signing == "signed" and key == KEY_A) or (unsigned and usable and trust) else {1}
        if outcome.rc in (0, 1) and outcome.rc not in allowed:
            outcome.problems.append("ran a bundle the trust model refuses" if outcome.rc == 0 else
                                    f"refused a bundle the trust model allows: {outcome.stderr.strip()}")
        shown = f"{env or 'no key'}, {signing}{', --trust' if trust else ''}"
        record("bench <- keys", fz.digest(repr((env, signing, trust))), outcome, shown, wd)


@fuzz(12)
@given(data=st.data())
def test_mutated_search_states(world, data):
    m = data.draw(mutations(world.raw["state"]), label="mutation")
    with Workdir(world) as wd:
        state = _write(wd / "s.json", m)
        argv = ["search", *_search_args(world), "--state", state, "--out", wd / "f.json", "--json"]
        outcome = run_cli(argv, wd, outputs=["f.json", "s.json"])
        record("search --state", _identity("state", m), outcome, m.what, wd)


# Checkpoints are safetensors files, not JSON: mutate the payload's plain data (space, spec, training
# state) and save it again, or damage the bytes.
def _payload_mutation(draw, payload: dict):
    plain = {k: payload[k] for k in ("format", "version", "space", "spec", "train")}
    train = dict(plain["train"])
    train.pop("optimizer", None)  # tensors; mutated below as a whole only
    train.pop("scheduler", None)
    view = {**plain, "train": train}
    paths = [p for p in fz.json_paths(view) if p[0] != "model"]
    path = draw(st.sampled_from(paths))
    value = draw(st.sampled_from(["<delete>", *fz.BAD_VALUES[:20]]))
    target = payload
    for k in path[:-1]:
        target = target[k]
    if value == "<delete>":
        del target[path[-1]]
    else:
        target[path[-1]] = value
    return f"{'delete' if value == '<delete>' else 'set'} {'.'.join(map(str, path))}" + \
        ("" if value == "<delete>" else f" = {value!r:.40}")


@fuzz(10)
@given(data=st.data())
def test_mutated_checkpoints(world, data):
    """`train` resumes from the checkpoint's training state; `eval` reads its space and spec."""
    command = data.draw(st.sampled_from(["train", "eval"]), label="command")
    raw = world.ckpt.read_bytes()
    with Workdir(world) as wd:
        ckpt = wd / "c.ckpt"
        if data.draw(st.booleans(), label="bytes"):
            at = data.draw(st.integers(0, len(raw) - 1), label="truncate at")
            ckpt.write_bytes(raw[:at])
            what = f"truncate at byte {at}"
        else:
            payload = read_payload(world.ckpt)
            what = _payload_mutation(data.draw, payload)
            write_payload(ckpt, payload)
        if command == "train":
            argv = ["train", "--family", "transformer", "--epochs", "1", "--out", ckpt, "--json"]
        else:
            argv = ["eval", "--checkpoint", ckpt, "--config", world.smallest, "--json"]
        outcome = run_cli(argv, wd, outputs=["c.ckpt"])
        record(command + " <- checkpoint", fz.digest(command, what), outcome, what, wd)


# --- 2. generated option values --------------------------------------------------------------

# Symbolic values (resolved per working folder, so an input's identity is stable across runs).
# Output paths never name a device node itself: as root, an atomic rename over /dev/full would
# replace the device.
INTS = ["-1", "0", "-0", str(10**12), "9" * 30, "1.5", "0x10", "abc", "", " ", "nan", "1e3"]
FLOATS = ["-1", "0", "nan", "inf", "-inf", "1e309", "abc", "", "1,5", str(10**12), "2"]
# "\udcff" is how Python passes a file name byte that is not UTF-8.
INPUTS = ["<missing>", "<folder>", "<text>", "<empty-file>", "/dev/null", "/proc/self/status",
          "/proc/nestnas-fuzz", "", "<ckpt>", "<front>", "<profile>", "<pred>", "<manifest>", "<folder>/\udcff.json"]
OUTPUTS = ["<folder>", "<text>/x.json", "/proc/nestnas-fuzz/x.json", "/dev/full/x", "", "<under-missing>/x/y.json",
           "<out>/\udcff.json"]
NAMES = ["", "a/b", "..", "x" * 300, "-", "\u00e9\u6f22", "\udcff"]


def _config_values() -> list[str]:
    small = _smallest_config()
    out = ["{", "{}", "[]", "null", "{\"family\": \"transformer\"}", "<folder>", "<missing>", "/dev/null",
           "/proc/self/status", "<text>"]
    for key, value in (("depth", -1), ("depth", "2"), ("depth", 10**12), ("depth", None), ("embed_dim", True),
                       ("num_heads", 3), ("num_heads", [2]), ("mlp_ratios", ["x"] * 4), ("family", "cnn")):
        out.append(json.dumps({**small, key: value}))
    out.append(json.dumps({**small, "depth": fz._DEEP_TOKEN}).replace(json.dumps(fz._DEEP_TOKEN),
                                                                       "[" * fz.DEEP + "]" * fz.DEEP))
    out.append(json.dumps(small).replace('"depth": 2', '"depth": ' + "9" * fz.HUGE_DIGITS))
    return out


# command -> (base argv, {option: values}); the base is valid and cheap to run, the values are
# outside what each option allows or at its edges. Options whose valid values start long work
# (training, tuning) get only values that must be refused.
def _specs() -> dict[str, tuple[list[str], dict[str, list[str]]]]:
    return {
        "train": (["--family", "transformer", "--epochs", "1", "--out", "<ckpt-copy>"], {
            "--out": [v for v in OUTPUTS if not v.startswith(("<under-missing>", "<out>"))],
            "--family": ["rnn", "", "CNN", "cnn,transformer"],
            "--epochs": ["-1", "0", "abc", "", "1.5"], "--sandwich": ["-1", "abc", "", str(10**12)],
            "--grad-accum": ["-1", "0", "abc", str(10**12)], "--batch-size": ["-1", "0", "abc", str(10**12)],
            "--lr": ["-1", "0", "nan", "inf", "abc"], "--seed": ["-1", "9" * 30, "abc"]}),
        "eval": (["--checkpoint", "<ckpt>", "--config", "<smallest>"], {
            "--checkpoint": INPUTS, "--config": _config_values(), "--seed": ["-1", "9" * 30, "abc", ""]}),
        "profile": (["--backend", "onnxruntime", "--family", "transformer", "--samples", "2", "--threads", "1",
                     "--passes", "1", "--no-blocks", "--batch-size", "1", "--out", "<out>/p.json"], {
            "--backend": ["tensorrt", "", "ONNXRUNTIME"], "--family": ["rnn", ""],
            "--resolution": ["", "0", "a,b", "4,,8", "-8", str(10**12), "64"], "--samples": INTS,
            "--name": NAMES, "--out": OUTPUTS, "--batch-size": INTS, "--threads": INTS, "--passes": INTS,
            "--exporter": ["magic", ""], "--max-minutes": ["-1", "0", "nan", "inf", "abc", "1e309"],
            "--seed": ["-1", "9" * 30]}),
        "devices": ([], {}),
        "fit": (["--profile", "<profile>", "--kind", "lut", "--out", "<out>/o.json"], {
            "--profile": INPUTS, "--checkpoint": INPUTS, "--kind": ["magic", "", "accuracy", "AUTO"],
            "--samples": ["-1", "0", "6", "abc", str(10**12)], "--holdout": FLOATS + ["1", "0.999", "0.01"],
            "--out": OUTPUTS, "--seed": ["-1", "9" * 30]}),
        "search": ([*("--checkpoint", "<ckpt>", "--predictor", "<pred>", "--evals", "8", "--pop-size", "4",
                      "--cache", "<cache>"), "--out", "<out>/f.json"], {
            "--checkpoint": INPUTS, "--profile": INPUTS, "--predictor": INPUTS,
            "--objectives": ["", ",", "accuracy", "latency,latency", "magic", "accuracy,latency,macs,params",
                             "accuracy,macs"],
            "--budget": ["latency=", "=5", "latency=abc", "latency=-1", "accuracy>=2", "macs=20Q", "latency=nan",
                         "latency=1e309", "foo=1", "latency<=0", "latency=0.0001"],
            "--evals": INTS, "--pop-size": INTS, "--algorithm": ["magic", "", "random", "linas", "NSGA2"],
            "--inner-evals": ["-1", "0", "abc", str(10**12)],
            "--cache": ["<folder>", "<ckpt-copy>", "<text>", "<text>/x.sqlite", "", "/proc/nestnas-fuzz/c.sqlite"],
            "--state": ["<folder>", "<text>", "<text>/s.json", "/proc/nestnas-fuzz/s.json", "<front-copy>"],
            "--plot": ["<folder>", "<text>/p.png", "/proc/nestnas-fuzz/p.png", "<out>/p.txt", ""],
            "--out": OUTPUTS, "--seed": ["-1", "9" * 30]}),
        "show": (["<front>"], {"": INPUTS}),
        "export": (["--front", "<front>", "--formats", "onnx", "--batch-size", "1", "--threads", "1",
                    "--out", "<out>/b"], {
            "--front": INPUTS,
            "--out": [v for v in OUTPUTS if not v.startswith(("<under-missing>", "<out>"))] + ["<text>"],
            "--checkpoint": [v for v in INPUTS if v != "<ckpt>"], "--pick": ["", "-1", "99", "a", "knee,all", ","],
            "--formats": ["", ",", "onnx,magic", "ONNX"], "--batch-size": ["-1", "0", "abc", str(10**12)],
            "--threads": ["-1", "0", "abc", "9" * 30], "--tune-trials": ["-1", "abc"]}),
        "bench": (["<bundle-copy>"], {
            "": INPUTS, "--threads": ["-1", "0", "abc", "9" * 30], "--calibrate": [v for v in INPUTS
                                                                                 if v != "<profile>"]}),
        "keygen": (["--out", "<out>/k.key"], {"--out": OUTPUTS + ["<text>", "<ckpt-copy>"]}),
        "quickstart": (["--out", "<out>/qs"], {
            "--out": ["<text>", "<text>/x", "/proc/nestnas-fuzz/qs", "/dev/full/x"],
            "--epochs": ["-1", "0", "abc", ""], "--profile-samples": ["7", "0", "-1", "abc"],
            "--search-evals": ["15", "-1", "abc"], "--tune-trials": ["-1", "abc"],
            "--tune-seconds": ["0", "-1", "abc"], "--seed": ["abc", ""]}),
    }


SPECS = _specs()


@st.composite
def arguments(draw, command: str):
    """(command, overrides, extras): one or two options set to generated values, maybe an unknown
    option or a stray argument, maybe --json."""
    base, options = SPECS[command]
    overrides = []
    if options:
        names = draw(st.lists(st.sampled_from(sorted(options)), min_size=1, max_size=2, unique=True))
        overrides = [(name, draw(st.sampled_from(options[name]))) for name in names]
    extras = draw(st.sampled_from([[], [], [], ["--frobnicate"], ["stray"], ["--json", "--json"], ["--force"],
                                   ["--trust"]]))
    return command, overrides, extras, draw(st.booleans())


def _resolve(token: str, world, wd: Path) -> str:
    for name, value in {
        "<missing>": wd / "missing.json", "<folder>": wd / "sub", "<text>": wd / "notes.txt",
        "<empty-file>": wd / "empty.json", "<ckpt>": world.ckpt, "<front>": world.front,
        "<profile>": world.profile, "<pred>": world.pred, "<manifest>": world.bundle / "manifest.json",
        "<smallest>": world.smallest, "<cache>": world.cache, "<out>": wd / "out",
        "<ckpt-copy>": wd / "c.ckpt", "<front-copy>": wd / "front.json", "<bundle-copy>": wd / "b",
        "<under-missing>": wd / "new", "<fifo>": wd / "fifo",
    }.items():
        token = token.replace(name, str(value))
    return token


def _argv(example, world, wd: Path) -> list[str]:
    command, overrides, extras, as_json = example
    base, _ = SPECS[command]
    argv = [_resolve(t, world, wd) for t in base]
    for name, value in overrides:
        value = _resolve(value, world, wd)
        if name == "":  # the positional argument
            argv[0] = value
        elif name in argv:
            argv[argv.index(name) + 1] = value
        else:
            argv += [name, value]
    return [command, *argv, *extras, *(["--json"] if as_json else [])]


def _prepare(wd: Path, world) -> None:
    (wd / "sub").mkdir()
    (wd / "out").mkdir()
    (wd / "notes.txt").write_text("not a nestnas file\n")
    (wd / "empty.json").write_bytes(b"")
    shutil.copy2(world.ckpt, wd / "c.ckpt")
    shutil.copy2(world.front, wd / "front.json")
    shutil.copytree(world.bundle, wd / "b")
    os.mkfifo(wd / "fifo")  # opening it for reading blocks until a writer comes: none ever does


def _check_arguments(world, example) -> None:
    with Workdir(world) as wd:
        _prepare(wd, world)
        argv = _argv(example, world, wd)
        # a successful run may write what its output options name (train: the checkpoint it resumes)
        outputs = ["out"] + [argv[i + 1] for i, a in enumerate(argv[:-1]) if a in OUTPUT_OPTIONS]
        outcome = run_cli(argv, wd, outputs=outputs)
        shown = " ".join(f"{n} {v!r}" for n, v in example[1]) + " " + " ".join(example[2])
        record(f"args {example[0]}", fz.digest(repr(example)), outcome, shown.strip(), wd)


OUTPUT_OPTIONS = {"--out", "--plot", "--state", "--tune-db"}
CHEAP = ["eval", "devices", "fit", "search", "show", "bench", "keygen"]
COSTLY = ["train", "profile", "export", "quickstart"]  # refused values only, but a slip costs a run


@fuzz(40)
@given(data=st.data())
def test_generated_arguments(world, data):
    command = data.draw(st.sampled_from(CHEAP), label="command")
    _check_arguments(world, data.draw(arguments(command), label="arguments"))


@fuzz(16)
@given(data=st.data())
def test_generated_arguments_of_long_commands(world, data):
    command = data.draw(st.sampled_from(COSTLY), label="command")
    _check_arguments(world, data.draw(arguments(command), label="arguments"))


# --- 3. what the fuzzing found, kept as plain regression cases ---------------------------------


def _deep(raw: bytes, key: str) -> Mutation:
    doc = json.loads(raw)
    doc[key] = fz._DEEP_TOKEN
    return Mutation(f"set {key} = [...{fz.DEEP} deep]", fz._dumps(doc))


def test_deeply_nested_documents_give_one_line(world):
    """json.loads raised RecursionError (not JSONDecodeError) past ~1000 levels: a traceback from
    every command that reads a document."""
    with Workdir(world) as wd:
        shutil.copy2(world.profile, wd / world.profile.name)
        bundle = fz.fresh_copy(world.bundle, wd / "b")
        cases = {
            "profile": (wd / "p.json", "batch_size",
                        lambda p: ["fit", "--profile", p, "--kind", "lut", "--out", wd / "o.json"]),
            "front": (wd / "front.json", "meta", lambda p: ["show", p]),
            "pred": (wd / "pred.json", "seed", lambda p: ["search", *_search_args(world)[:2], "--predictor", p,
                                                          "--evals", "8", "--pop-size", "4", "--out", wd / "f.json"]),
            "state": (wd / "s.json", "archive", lambda p: ["search", *_search_args(world), "--state", p,
                                                           "--out", wd / "f.json"]),
            "manifest": (bundle / "manifest.json", "name", lambda p: ["bench", bundle]),
        }
        for kind, (path, key, argv) in cases.items():
            m = _deep(world.raw[kind], key)
            _write(path, m)
            outcome = run_cli(argv(path), wd)
            record(f"regression: deep {kind}", _identity(kind, m), outcome, m.what, wd)
            assert outcome.rc == 1 and "nested" in outcome.stderr, (kind, outcome.stderr)


def test_number_literals_beyond_the_digit_limit_give_one_line(world):
    """Python refuses int literals of more than 4300 digits with a ValueError that is not a
    JSONDecodeError."""
    doc = json.loads(world.raw["front"])
    doc["reference"][next(iter(doc["reference"]))] = fz._HUGE_TOKEN
    m = Mutation(f"a {fz.HUGE_DIGITS}-digit reference", fz._dumps(doc))
    with Workdir(world) as wd:
        outcome = run_cli(["show", _write(wd / "front.json", m)], wd)
        record("regression: huge number", _identity("front", m), outcome, m.what, wd)
        assert outcome.rc == 1 and "front.json" in outcome.stderr, outcome.stderr


@pytest.mark.parametrize("config", ["deep", "huge"])
def test_inline_configs_nested_deeply_or_with_huge_numbers_give_one_line(world, config):
    text = next(v for v in _config_values()[-2:] if (v.startswith('{"family"') and
                                                      ("[[[" in v) == (config == "deep")))
    with Workdir(world) as wd:
        outcome = run_cli(["eval", "--checkpoint", world.ckpt, "--config", text], wd)
        record("regression: --config", fz.digest("config", text), outcome, config, wd)
        assert outcome.rc == 1 and "config" in outcome.stderr, outcome.stderr


def test_output_names_that_are_not_utf8_are_printed_without_a_traceback(world):
    """A file name byte that is not UTF-8 reaches Python as a lone surrogate; printing the path
    after writing the file raised UnicodeEncodeError on a strict UTF-8 stdout."""
    with Workdir(world) as wd:
        for argv in (["fit", "--profile", world.profile, "--kind", "lut", "--out", wd / "\udcff.json"],
                     ["keygen", "--out", wd / "\udcff.key"]):
            outcome = run_cli(argv, wd, outputs=[argv[-1]])
            record("regression: non-UTF-8 name", fz.digest(*map(str, argv[:-1])), outcome, "--out \\xff", wd)
            assert outcome.rc == 0 and "\\udcff" in outcome.stdout.replace("\n", ""), outcome.stdout


def test_an_accuracy_table_entry_of_another_shape_gives_one_line(world):
    """`fit --checkpoint` resumes from its accuracy table; an accuracy that is no number ended in
    TypeError when the table was fitted."""
    doc = json.loads(world.raw["table"])
    entry = next(iter(doc["entries"].values()))
    entry["accuracy"] = {"": None}
    m = Mutation("an entry's accuracy = {'': None}", fz._dumps(doc))
    with Workdir(world) as wd:
        _write(wd / "acc.accuracy.json", m)
        outcome = run_cli(["fit", "--checkpoint", world.ckpt, "--samples", "7", "--out", wd / "acc.json"], wd)
        record("regression: accuracy table", _identity("table", m), outcome, m.what, wd)
        assert outcome.rc == 1 and "accuracy" in outcome.stderr, outcome.stderr


@pytest.mark.parametrize("where", ["<fifo>", "<folder>"])
def test_a_key_file_that_is_no_regular_file_gives_one_line(world, where):
    """A key file naming a pipe blocked forever, and /dev/zero was read until memory ran out
    (MemoryError): only a regular file is read, and only its first 4 KiB."""
    with Workdir(world) as wd:
        _prepare(wd, world)
        with fz.environ(NESTNAS_BUNDLE_KEY=None, NESTNAS_BUNDLE_KEY_FILE=_resolve(where, world, wd)):
            outcome = run_cli(["bench", wd / "b", "--threads", "1"], wd, timeout=20)
        record("regression: key file", fz.digest("key file", where), outcome, where, wd)
        assert outcome.rc == 1 and "not a regular file" in outcome.stderr, outcome.stderr


def test_a_deeply_nested_user_profile_is_listed_as_unreadable(world):
    with Workdir(world) as wd:
        (wd / "home" / "profiles").mkdir(parents=True)
        m = _deep(world.raw["profile"], "blocks")
        _write(wd / "home" / "profiles" / "deep.json", m)
        with fz.environ(NESTNAS_HOME=str(wd / "home")):
            outcome = run_cli(["devices", "--json"], wd)
        record("regression: devices deep", _identity("profile", m), outcome, m.what, wd)
        rows = {Path(r["path"]).name: r for r in json.loads(outcome.stdout)}
        assert "error" in rows["deep.json"] and "nested" in rows["deep.json"]["error"]


def test_a_profile_spec_beyond_memory_gives_one_line(world):
    """A profile's `spec` (the supernet's widths) of 10**12 tried to allocate 256 TB."""
    for key, value in (("token_dim", 10**12), ("num_classes", 10**12), ("token_dim", 0)):
        doc = json.loads(world.raw["profile"])
        doc["spec"][key] = value
        m = Mutation(f"set spec.{key} = {value}", fz._dumps(doc))
        with Workdir(world) as wd:
            path = _write(wd / "p.json", m)
            outcome = run_cli(["fit", "--profile", path, "--kind", "lut", "--out", wd / "o.json"], wd)
            record("regression: profile spec", _identity("profile", m), outcome, m.what, wd)
            assert outcome.rc == 1 and "spec" in outcome.stderr, outcome.stderr


@pytest.mark.parametrize("seed", ["-1", str(2**32), "9" * 30])
def test_seeds_outside_what_the_generators_take_give_one_line(world, seed):
    """sklearn and numpy take seeds in [0, 2**32 - 1]; others ended in InvalidParameterError."""
    with Workdir(world) as wd:
        shutil.copy2(world.ckpt, wd / "c.ckpt")
        for argv in (["fit", "--profile", world.profile, "--kind", "lut", "--out", wd / "o.json"],
                     ["train", "--family", "transformer", "--epochs", "1", "--out", wd / "c.ckpt"],
                     ["eval", "--checkpoint", world.ckpt, "--config", world.smallest]):
            outcome = run_cli([*argv, "--seed", seed], wd)
            record("regression: seed", fz.digest(argv[0], seed), outcome, f"--seed {seed}", wd)
            assert outcome.rc == 1 and "--seed" in outcome.stderr, outcome.stderr


def test_the_fuzzed_commands_left_the_real_documents_alone(world):
    """Runs read the module's real documents directly (checkpoint, profile, predictor, front,
    bundle); none may have changed them."""
    for name in ("profile", "pred", "front", "acc"):
        assert getattr(world, name).read_bytes() == world.raw[name], name
    assert (world.bundle / "manifest.json").read_bytes() == world.raw["manifest"]
    assert sorted(p.name for p in world.bundle.iterdir()) == sorted(
        ["manifest.json", *json.loads(world.raw["manifest"])["artifacts"]])
