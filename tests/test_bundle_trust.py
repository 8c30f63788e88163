"""Bundle integrity and trust: every loaded file is a checked artifact of a folder that holds
nothing else, manifests are signed with the user's key and checked on load, manifests of another
shape give one line, and export defaults to the formats installed."""

import contextlib
import io
import json
import os
import shutil
import stat
import sys
from pathlib import Path
from unittest import mock

import numpy as np
import pytest
import torch
from torch import nn

import nestnas
from nestnas.cli import main
from nestnas.compile.dynamic import load_dynamic, rewrite
from nestnas.compile.signing import KEY_ENV, KEY_FILE_ENV
from nestnas.errors import ArtifactError, ConfigError
from nestnas.fileio import sha256_file
from nestnas.search.front import Candidate, ParetoFront
from nestnas.search.objectives import macs_objective
from nestnas.supernet.checkpoint import save_checkpoint
from nestnas.supernet.cnn import ElasticCNN

from dynamic_nets import Gate

KEY = "11" * 32
OTHER_KEY = "22" * 32


@contextlib.contextmanager
def tvm_absent():
    """`import tvm` fails, as where the extra is not installed (only that entry is restored:
    restoring all of sys.modules would drop what was imported meanwhile)."""
    saved = sys.modules.get("tvm", KeyError)
    sys.modules["tvm"] = None
    try:
        yield
    finally:
        if saved is KeyError:
            del sys.modules["tvm"]
        else:
            sys.modules["tvm"] = saved


@pytest.fixture(autouse=True)
def no_key(tmp_path, monkeypatch):
    """No key from the user's own environment or home."""
    monkeypatch.setenv("NESTNAS_HOME", str(tmp_path / "home"))
    monkeypatch.delenv(KEY_ENV, raising=False)
    monkeypatch.delenv(KEY_FILE_ENV, raising=False)


def run_cli(*args):
    """`nestnas ARGS` in this process: (exit code, stdout, stderr)."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main([str(a) for a in args])
    return code, out.getvalue(), err.getvalue()


def one_line_error(result, *fragments):
    code, _, err = result
    lines = err.strip().splitlines()
    assert code == 1 and len(lines) == 1 and lines[0].startswith("error: "), err
    for f in fragments:
        assert f in lines[0], lines[0]
    return lines[0]


@pytest.fixture(scope="module")
def made(tmp_path_factory):
    """One signed ONNX bundle exported by `nestnas export` with the default formats where TVM is
    not installed, and the front and checkpoint it came from."""
    root = tmp_path_factory.mktemp("trust")
    torch.manual_seed(0)
    net = ElasticCNN(num_classes=10, in_channels=1).eval()
    ckpt = root / "cnn.ckpt"
    save_checkpoint(net, ckpt)
    config = net.space.canonical(net.space.smallest())
    macs = macs_objective(net.space, **net.spec())
    cand = Candidate(config, net.space.config_hash(config), {"macs": float(macs.evaluate([config])[0])}, (), ("macs",))
    front = ParetoFront.from_archive(net.space, [macs.describe()], [], {"macs": 1e9}, [cand],
                                     {"checkpoint": {"path": str(ckpt)}})
    front_path = root / "front.json"
    front.save(front_path)
    bundle = root / "bundle"
    env = {"NESTNAS_HOME": str(root / "home"), KEY_ENV: KEY}
    with mock.patch.dict(os.environ, env), tvm_absent():
        result = run_cli("export", "--front", front_path, "--pick", "0", "--out", bundle, "--json")
    return {"net": net, "front": front_path, "bundle": bundle, "result": result, "root": root}


def copy(made, tmp_path, name="b"):
    out = tmp_path / name
    shutil.copytree(made["bundle"], out)
    return out


def manifest_of(folder):
    return json.loads((folder / "manifest.json").read_text())


def write_manifest(folder, manifest):
    (folder / "manifest.json").write_text(json.dumps(manifest))


# --- export defaults, umask, input shape --------------------------------------------------------

def test_default_formats_are_the_installed_ones_and_the_note_names_the_extra(made):
    code, out, err = made["result"]
    assert code == 0, err
    notes = err.strip().splitlines()
    assert len(notes) == 1 and notes[0].startswith("note: ") and "pip install 'nestnas[tvm]'" in notes[0], err
    manifest = manifest_of(made["bundle"])
    assert manifest["formats"] == ["onnx"] and json.loads(out)["manifests"][0]["formats"] == ["onnx"]


def test_explicit_tvm_without_the_extra_is_one_line(made, tmp_path):
    with tvm_absent():
        line = one_line_error(run_cli("export", "--front", made["front"], "--formats", "onnx,tvm", "--out",
                                      tmp_path / "x"), "--formats tvm", "pip install 'nestnas[tvm]'")
        with pytest.raises(nestnas.BackendUnavailable, match="nestnas\\[tvm\\]"):
            nestnas.export(made["net"].extract(), tmp_path / "y", input_shape=(1, 1, 8, 8), formats=("tvm",))
    assert "Traceback" not in line and not (tmp_path / "x").exists() and not (tmp_path / "y").exists()


def test_bundle_folders_get_the_users_umask(made):
    mask = os.umask(0)
    os.umask(mask)
    assert stat.S_IMODE(made["bundle"].stat().st_mode) == 0o777 & ~mask


def test_a_wrong_input_shape_names_the_shape_the_module_takes(made, tmp_path):
    module = made["net"].extract()
    with pytest.raises(ConfigError, match=r"input_shape \(1, 3, 8, 8\) does not fit.*Conv2d, takes \(N, 1, H, W\)"):
        nestnas.export(module, tmp_path / "a", input_shape=(1, 3, 8, 8), formats=("onnx",))
    with pytest.raises(ConfigError, match="positive integers"):
        nestnas.export(module, tmp_path / "a", input_shape=(1, 0, 8), formats=("onnx",))
    encoder = nn.Sequential(nn.Linear(6, 4))
    with pytest.raises(ConfigError, match=r"Linear, takes \(\.\.\., 6\)"):
        nestnas.export(encoder, tmp_path / "a", input_shape=(2, 5), formats=("onnx",))
    assert not (tmp_path / "a").exists()


# --- every loaded file is a checked artifact ----------------------------------------------------

def test_an_unlisted_file_in_the_bundle_is_refused(made, tmp_path):
    b = copy(made, tmp_path)
    nestnas.load(b)  # signed, and no key here to check it: checksums only
    (b / "notes.txt").write_text("hello")
    with pytest.raises(ArtifactError, match="notes.txt is in the folder but not a listed artifact"):
        nestnas.load(b)
    one_line_error(run_cli("bench", b), "notes.txt", "not a listed artifact")


def test_files_onnx_must_name_a_listed_artifact(made, tmp_path):
    b = copy(made, tmp_path)
    shutil.copy(b / "model.onnx", b / "evil.onnx")  # any unchecked model: the old loader ran it
    m = manifest_of(b)
    m["files"]["onnx"] = "evil.onnx"
    write_manifest(b, m)
    with pytest.raises(ArtifactError, match="files.onnx is 'evil.onnx', which is not a listed artifact"):
        nestnas.load(b)
    one_line_error(run_cli("bench", b), "evil.onnx")


def test_a_model_dropped_from_the_artifacts_and_then_changed_is_refused(made, tmp_path):
    b = copy(made, tmp_path)
    m = manifest_of(b)
    del m["artifacts"]["model.onnx"]
    write_manifest(b, m)
    (b / "model.onnx").write_bytes((b / "model.onnx").read_bytes()[:-8])
    with pytest.raises(ArtifactError, match="model.onnx"):
        nestnas.load(b)
    one_line_error(run_cli("bench", b), "model.onnx")


def test_a_listed_file_missing_is_refused(made, tmp_path):
    b = copy(made, tmp_path)
    (b / "check_output.npy").unlink()
    with pytest.raises(ArtifactError, match="check_output.npy is listed in manifest.json but missing"):
        nestnas.load(b)


# --- manifests of another shape: one line -------------------------------------------------------

def _without(key):
    return lambda m: m.pop(key)


def _set(path, value):
    def edit(m):
        *head, last = path
        for k in head:
            m = m[k]
        m[last] = value
    return edit


def _artifact(name):
    def edit(m):
        m["artifacts"][name] = m["artifacts"]["check_input.npy"]
    return edit


@pytest.mark.parametrize("edit, fragment", [
    (_without("formats"), "field formats"),
    (_without("input"), "field input"),
    (_set(["measured"], "fast"), "field measured"),
    (_set(["input", "shape"], [1, "1", 8, 8]), "field input.shape.1"),
    (_set(["files", "onnx"], "check_input.npy"), "a onnx artifact ends in .onnx"),
    (_artifact("../outside.npy"), "no path, no '..'"),
    (_artifact("/etc/passwd"), "no path, no '..'"),
    (_set(["artifacts", "model.onnx"], "not a checksum"), "field artifacts.model.onnx"),
])
def test_a_manifest_of_another_shape_is_one_line(made, tmp_path, edit, fragment):
    b = copy(made, tmp_path)
    m = manifest_of(b)
    edit(m)
    write_manifest(b, m)
    with pytest.raises(ArtifactError, match="bundle manifest"):
        nestnas.load(b)
    one_line_error(run_cli("bench", b), str(b / "manifest.json"), fragment)


def test_a_checked_file_the_runtime_cannot_load_is_one_line(made, tmp_path):
    b = copy(made, tmp_path)
    shutil.copy(b / "check_input.npy", b / "model.onnx")
    m = manifest_of(b)
    m["artifacts"]["model.onnx"] = sha256_file(b / "model.onnx")
    write_manifest(b, m)
    with pytest.raises(ArtifactError, match="ONNX Runtime cannot load model.onnx"):
        nestnas.load(b)
    one_line_error(run_cli("bench", b), "ONNX Runtime cannot load model.onnx")


# --- signatures ---------------------------------------------------------------------------------

def test_export_signs_and_load_checks_the_signature(made, tmp_path, monkeypatch):
    b = copy(made, tmp_path)
    assert manifest_of(b)["signature"]["algorithm"] == "hmac-sha256"
    monkeypatch.setenv(KEY_ENV, KEY)
    model = nestnas.load(b)
    x = np.load(b / "check_input.npy")
    np.testing.assert_allclose(model(x), np.load(b / "check_output.npy"), atol=1e-4, rtol=0)
    # whoever edits a model can fix its checksum, but not the signature
    m = manifest_of(b)
    m["accuracy"] = {"value": 0.99}
    write_manifest(b, m)
    with pytest.raises(ArtifactError, match="signature does not match"):
        nestnas.load(b)
    with pytest.raises(ArtifactError, match="signature does not match"):
        nestnas.load(b, trust=True)  # trust accepts unsigned bundles, never a bad signature
    one_line_error(run_cli("bench", b, "--trust"), "signature does not match")
    write_manifest(b, {k: v for k, v in m.items() if k != "signature"})
    with pytest.raises(ArtifactError, match="not signed and a bundle key is configured"):
        nestnas.load(b)
    one_line_error(run_cli("bench", b), "not signed", "--trust")
    nestnas.load(b, trust=True)
    monkeypatch.setenv(KEY_ENV, OTHER_KEY)
    c = copy(made, tmp_path, "c")
    with pytest.raises(ArtifactError, match="signed with another key"):
        nestnas.load(c)
    monkeypatch.delenv(KEY_ENV)
    nestnas.load(b)  # no key configured: unsigned bundles load on their checksums


def test_bench_trusts_an_unsigned_bundle_only_when_told(made, tmp_path, monkeypatch):
    b = copy(made, tmp_path)
    write_manifest(b, {k: v for k, v in manifest_of(b).items() if k != "signature"})
    monkeypatch.setenv(KEY_ENV, KEY)
    one_line_error(run_cli("bench", b, "--json"), "not signed")
    code, out, err = run_cli("bench", b, "--trust", "--json")
    assert code == 0, err
    row = json.loads(out)["rows"][0]  # re-measured, beside the figure the bundle was exported with
    assert json.loads(out)["signature"] == "unsigned" and row["p10_ms"] <= row["median_ms"] <= row["p90_ms"]
    assert row["manifest_ms"] == manifest_of(b)["measured"]["onnxruntime"]["median_ms"]


def test_keygen_writes_a_private_key_that_export_and_load_use(made, tmp_path, monkeypatch):
    home = Path(os.environ["NESTNAS_HOME"])
    code, out, err = run_cli("keygen", "--json")
    assert code == 0, err
    path = home / "bundle.key"
    assert json.loads(out)["key_file"] == str(path)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600 and len(path.read_text().strip()) == 64
    first = path.read_text()
    one_line_error(run_cli("keygen"), "exists", "--force")
    assert path.read_text() == first
    b = copy(made, tmp_path)
    with pytest.raises(ArtifactError, match="signed with another key"):  # made with KEY, not this one
        nestnas.load(b)
    code, _, err = run_cli("keygen", "--force")
    assert code == 0 and path.read_text() != first and stat.S_IMODE(path.stat().st_mode) == 0o600
    named = tmp_path / "k"
    named.write_text(KEY + "\n")
    monkeypatch.setenv(KEY_FILE_ENV, str(named))
    nestnas.load(b)  # the named key file wins over the default one
    monkeypatch.setenv(KEY_ENV, "not hex")
    with pytest.raises(ConfigError, match="hex digits"):
        nestnas.load(b)
    one_line_error(run_cli("bench", b), "NESTNAS_BUNDLE_KEY", "hex digits")


# --- dynamic bundles ----------------------------------------------------------------------------

@pytest.fixture
def dynamic(tmp_path, monkeypatch):
    monkeypatch.setenv(KEY_ENV, KEY)
    torch.manual_seed(0)
    x = torch.randn(1, 4)
    program = rewrite(Gate().eval(), [(x, 1.0), (x, 0.0)])
    return program.save(tmp_path / "dyn", backends=("onnxruntime",)), x


def test_dynamic_bundles_are_signed_and_hold_only_their_artifacts(dynamic, tmp_path, monkeypatch):
    folder, x = dynamic
    manifest = manifest_of(folder)
    assert "signature" in manifest
    assert load_dynamic(folder)(x.numpy(), 0.0).shape == (1, 4)
    (folder / "__pycache__").mkdir()  # what importing host.py leaves
    load_dynamic(folder)
    # host.py is code: an edit with its checksum fixed passes the checksum, not the signature
    host = folder / "host.py"
    host.write_text(host.read_text() + "\nimport os  # edited\n")
    manifest["artifacts"]["host.py"] = sha256_file(host)
    write_manifest(folder, manifest)
    with pytest.raises(ArtifactError, match="signature does not match"):
        load_dynamic(folder)
    write_manifest(folder, {k: v for k, v in manifest.items() if k != "signature"})
    with pytest.raises(ArtifactError, match="not signed"):
        load_dynamic(folder)
    load_dynamic(folder, trust=True)
    monkeypatch.delenv(KEY_ENV)
    (folder / "g999.onnx").write_bytes(b"")
    with pytest.raises(ArtifactError, match="g999.onnx is in the folder but not a listed artifact"):
        load_dynamic(folder)
    (folder / "g999.onnx").unlink()
    manifest.pop("subgraphs")
    write_manifest(folder, manifest)
    with pytest.raises(ArtifactError, match="field subgraphs"):
        load_dynamic(folder)


def test_a_dynamic_subgraph_must_be_a_listed_artifact(dynamic, monkeypatch):
    folder, _ = dynamic
    monkeypatch.delenv(KEY_ENV)
    manifest = manifest_of(folder)
    entry = next(iter(manifest["subgraphs"].values()))
    shutil.copy(folder / entry["onnx"], folder / "copy.onnx")
    entry["onnx"] = "copy.onnx"
    write_manifest(folder, manifest)
    with pytest.raises(ArtifactError, match="not a listed .onnx artifact"):
        load_dynamic(folder)
