"""The host runtime of dynamic bundles (`nestnas.compile.dynamic_host`) tested as the module it is,
and saving programs: a bundle ships that module byte for byte and nestnas runs it to check what it
saves; a segment input the ONNX exporter drops is not fed; old bundles, edited programs and failed
writes are one-line errors that leave nothing behind."""

import hashlib
import json
import resource
import shutil
import signal
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from nestnas.compile import dynamic_host
from nestnas.compile.dynamic import load_dynamic, rewrite
from nestnas.errors import ArtifactError, ConfigError, OutputError

import dynamic_nets as dn


class DeviceOnly(nn.Module):
    """The last segment reads `x` only for `.device`: the exporter drops that graph input."""

    def __init__(self):
        super().__init__()
        self.f = nn.Linear(4, 4)

    def forward(self, x):
        y = self.f(x)
        if y.sum() > 0:
            y = -y
        z = torch.zeros([y.size(0), 4]).to(x.device) + y
        return z


@pytest.fixture(scope="module")
def gate(tmp_path_factory):
    torch.manual_seed(0)
    net, x = dn.Gate().eval(), torch.randn(1, 4)
    program = rewrite(net, [(x, 1.0), (x, 0.0)])
    return net, x, program, program.save(tmp_path_factory.mktemp("gate") / "b", backends=("onnxruntime",))


def test_the_bundle_ships_the_runtime_module_byte_for_byte(gate):
    _, _, program, folder = gate
    source = Path(dynamic_host.__file__).read_bytes()
    assert (folder / "host.py").read_bytes() == source
    manifest = json.loads((folder / "manifest.json").read_text())
    assert manifest["artifacts"]["host.py"] == hashlib.sha256(source).hexdigest()
    assert (folder / "program.py").read_text() == program.host_source
    assert manifest["version"] == dynamic_host.VERSION == 2


def test_the_runtime_module_runs_a_saved_program(gate):
    net, x, program, folder = gate
    model = dynamic_host.load("onnxruntime", folder=folder)
    assert sorted(model.run.calls) == sorted(program.records)
    with torch.no_grad():
        for fast in (1.0, 0.0):
            assert np.abs(model(x.numpy(), fast) - net(x, fast).numpy()).max() <= 1e-6
    with pytest.raises(KeyError, match=r"subgraph s0\|\|2x4 was never compiled"):
        model(np.zeros((2, 4), np.float32), 1.0)
    with pytest.raises(ValueError, match=r"backend 'tflite'; allowed: \['onnxruntime', 'tvm'\]"):
        dynamic_host.load("tflite", folder=folder)


def test_the_runtime_refuses_an_edited_program_and_other_versions(gate, tmp_path):
    _, _, _, folder = gate
    copy = Path(shutil.copytree(folder, tmp_path / "copy"))
    program = copy / "program.py"
    original = program.read_bytes()
    program.write_bytes(original + b"\nimport os  # edited\n")
    with pytest.raises(RuntimeError, match="program.py does not match its checksum"):
        dynamic_host.load(folder=copy)
    with pytest.raises(ArtifactError, match="program.py does not match its checksum"):
        load_dynamic(copy)
    program.write_bytes(original)
    manifest = json.loads((copy / "manifest.json").read_text())
    (copy / "manifest.json").write_text(json.dumps({**manifest, "version": 1}))
    with pytest.raises(RuntimeError, match="version 1.*save the program again"):
        dynamic_host.load(folder=copy)
    with pytest.raises(ArtifactError, match="has version 1; this nestnas reads version 2"):
        load_dynamic(copy)


def test_runtime_helpers_refuse_ambiguous_tensors():
    assert dynamic_host.as_bool(np.array([[True]])) is True and dynamic_host.as_bool(torch.tensor(0.0)) is False
    assert dynamic_host.as_int(np.array([3.0])) == 3 and dynamic_host.as_int(torch.tensor([[2]])) == 2
    with pytest.raises(ValueError, match="condition on a tensor of 2 elements is ambiguous"):
        dynamic_host.as_bool(np.zeros(2))
    with pytest.raises(ValueError, match="index from a tensor of 3 elements is ambiguous"):
        dynamic_host.as_int(torch.zeros(3))
    assert dynamic_host.key("s1", (np.zeros((1, 4)), torch.zeros(2, 3)), {"e": 2, "b": 0.5}) == "s1|b=0.5,e=2|1x4;2x3"


@pytest.mark.parametrize("backend", ["onnxruntime", pytest.param("tvm", marks=pytest.mark.tvm)])
def test_an_input_read_only_for_its_device_is_not_fed(tmp_path, backend):
    torch.manual_seed(0)
    net = DeviceOnly().eval()
    xs = [torch.randn(1, 4) for _ in range(8)]
    program = rewrite(net, xs)
    last = program.segments["s2"]
    assert last.inputs == ["y", "x"]
    folder = program.save(tmp_path / "b", backends=(backend,))
    entries = json.loads((folder / "manifest.json").read_text())["subgraphs"]
    entry = next(e for e in entries.values() if e["segment"] == "s2")
    assert entry["inputs"] == ["in0"] and entry["feeds"] == [0]  # y kept, x dropped by the exporter
    compiled = load_dynamic(folder, backend)
    with torch.no_grad():
        worst = max(float(np.abs(compiled(x.numpy()) - net(x).numpy()).max()) for x in xs)
    assert worst <= 1e-6


def test_save_where_it_cannot_write_is_an_output_error_and_leaves_nothing(gate, tmp_path):
    _, _, program, _ = gate
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(OutputError, match=r"out_dir .*file/b: .*file is a file, not a folder"):
        program.save(blocker / "b", backends=("onnxruntime",))
    with pytest.raises(OutputError, match=r"cannot write .*xxx: File name too long"):
        program.save(tmp_path / ("x" * 300), backends=("onnxruntime",))
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "keep").write_text("")
    with pytest.raises(ConfigError, match=r"out_dir .*full: exists and is not empty"):
        program.save(tmp_path / "full", backends=("onnxruntime",))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file", "full"] and blocker.read_text() == "x"


def test_a_write_failing_midway_is_an_output_error_and_leaves_nothing(gate, tmp_path):
    """A file-size limit makes the 7 kB copy of host.py fail after the subgraphs were written, as
    a full disk would."""
    _, _, program, _ = gate
    old_limit, old_handler = resource.getrlimit(resource.RLIMIT_FSIZE), signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (4096, old_limit[1]))
    try:
        with pytest.raises(OutputError, match=r"cannot write .*/b: File too large"):
            program.save(tmp_path / "b", backends=("onnxruntime",))
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, old_limit)
        signal.signal(signal.SIGXFSZ, old_handler)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("shape", [(1, 0), (3, 5), (0,)])
def test_arrays_handed_to_tvm_are_64_byte_aligned_even_when_empty(shape):
    from nestnas.compile.dynamic_host import aligned

    a = np.arange(int(np.prod(shape)), dtype=np.float32).reshape(shape)
    out = aligned(a[::1], np.float32, copy=True)
    assert out.ctypes.data % 64 == 0 and out.shape == shape and np.array_equal(out, a)
