"""File-system errors and limits: a full disk, a read-only or forbidden folder, an output under a
file or under /proc give one line naming the path, exit code 1 and no partial output; every
output path is checked before long work starts; genuine bugs keep their traceback.

Real file systems where the machine allows (a small tmpfs, a read-only mount, sysfs, an
RLIMIT_FSIZE subprocess); tests that need `mount` are skipped where it is not permitted."""

import errno
import io
import json
import os
import resource
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from rich.console import Console

from nestnas.cli import main
from nestnas.errors import NestnasError, OutputError
from nestnas.fileio import check_output, check_outputs, write_json
from nestnas.progress import SearchProgress, StageBar

SHIPPED = Path(__file__).resolve().parents[1] / "hw_profiles" / "data" / "xeon-2c-onnxruntime-transformer.json"


def one_line(capsys, argv, *fragments):
    """Run the CLI in process; assert exit 1 and exactly one `error: ` line holding `fragments`."""
    assert main([str(a) for a in argv]) == 1
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    for fragment in fragments:
        assert str(fragment) in lines[0], lines[0]
    return lines[0]


def tree(folder: Path) -> dict:
    """Every file under `folder` (hidden ones too) with its bytes."""
    return {str(p.relative_to(folder)): p.read_bytes() if p.is_file() else None for p in sorted(folder.rglob("*"))}


def _mount(folder: Path, options: str) -> bool:
    folder.mkdir(parents=True, exist_ok=True)
    return subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(folder)],
                          capture_output=True).returncode == 0


def _umount(folder: Path) -> None:
    if subprocess.run(["umount", str(folder)], capture_output=True).returncode != 0:
        subprocess.run(["umount", "-l", str(folder)], capture_output=True)


@pytest.fixture
def small_disk(tmp_path):
    """A 64 KiB tmpfs: writes past it fail with ENOSPC for real."""
    folder = tmp_path / "small"
    if not _mount(folder, "size=64k"):
        pytest.skip("mounting a tmpfs is not permitted here")
    yield folder
    _umount(folder)


@pytest.fixture
def readonly_dir(tmp_path):
    """A folder nothing can be created in, even by root: a read-only tmpfs (EROFS), else an
    immutable folder (chattr +i, EPERM)."""
    folder = tmp_path / "ro"
    if _mount(folder, "ro,size=64k"):
        yield folder
        _umount(folder)
        return
    if subprocess.run(["chattr", "+i", str(folder)], capture_output=True).returncode != 0:
        pytest.skip("neither a read-only mount nor chattr +i is available")
    yield folder
    subprocess.run(["chattr", "-i", str(folder)], capture_output=True)


@pytest.fixture
def no_training(monkeypatch):
    """Fail the test if supernet training starts: output checks must come first."""
    def refuse(*args, **kwargs):
        raise AssertionError("training started before the output path was checked")

    monkeypatch.setattr("nestnas.supernet.train.train_supernet", refuse)
    monkeypatch.setattr("nestnas.quickstart.train_supernet", refuse)


# 1. the writers: one error naming the path, nothing left behind

def test_full_disk_write_names_the_path_and_leaves_the_old_file(small_disk):
    path = small_disk / "front.json"
    write_json(path, {"old": True})
    before = tree(small_disk)
    with pytest.raises(OutputError) as info:
        write_json(path, {"data": ["x" * 1000] * 200})  # 200 KB on a 64 KiB disk
    assert str(info.value) == f"cannot write {path}: No space left on device"
    assert info.value.errno == errno.ENOSPC and info.value.filename == str(path)
    assert isinstance(info.value, OSError)  # callers catching OSError still do
    assert tree(small_disk) == before  # old content kept, the temporary file removed


def test_full_disk_checkpoint_is_an_output_error_not_a_torch_runtime_error(small_disk):
    from nestnas.supernet import SearchSpace, build_supernet
    from nestnas.supernet.checkpoint import save_checkpoint

    net = build_supernet(SearchSpace.for_family("transformer"), num_classes=10)
    with pytest.raises(OutputError, match="No space left on device"):
        save_checkpoint(net, small_disk / "x.ckpt")
    assert tree(small_disk) == {}


def test_cli_full_disk_is_one_line(small_disk, monkeypatch, capsys):
    # Training replaced by its first checkpoint save: the real writer on a really full disk.
    from nestnas.supernet.checkpoint import save_checkpoint

    monkeypatch.setattr("nestnas.supernet.train.train_supernet",
                        lambda net, *a, checkpoint, **k: save_checkpoint(net, checkpoint))
    out = small_disk / "x.ckpt"
    one_line(capsys, ["train", "--family", "transformer", "--out", out],
             f"error: cannot write {out}: No space left on device")
    assert tree(small_disk) == {}


def _limit_file_size():
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # stays ignored across exec: writes fail with EFBIG
    resource.setrlimit(resource.RLIMIT_FSIZE, (64 << 10, 64 << 10))


def test_file_size_limit_write_names_the_path(tmp_path):
    # No mount needed: RLIMIT_FSIZE makes the kernel refuse the write (EFBIG) in a child process.
    path = tmp_path / "profile.json"
    path.write_text('{"old": true}')
    code = ("import sys\nfrom nestnas.fileio import write_json\nfrom nestnas.errors import OutputError\n"
            "try:\n    write_json(sys.argv[1], ['x' * 1000] * 200)\n"
            "except OutputError as exc:\n    print(exc)\n    sys.exit(3)\n")
    proc = subprocess.run([sys.executable, "-c", code, str(path)], capture_output=True, text=True,
                          preexec_fn=_limit_file_size, timeout=60)
    assert proc.returncode == 3, proc.stderr
    assert proc.stdout.strip() == f"cannot write {path}: File too large"
    assert tree(tmp_path) == {"profile.json": b'{"old": true}'}


def test_read_only_folder_is_one_line(readonly_dir, capsys):
    with pytest.raises(OutputError, match=f"cannot write {readonly_dir / 'p.json'}: "):
        write_json(readonly_dir / "p.json", {})
    line = one_line(capsys, ["fit", "--profile", SHIPPED, "--out", readonly_dir / "p.json"],
                    f"--out {readonly_dir / 'p.json'}", f"cannot create files in {readonly_dir}")
    assert "Read-only file system" in line or "Operation not permitted" in line
    assert tree(readonly_dir) == {}


def test_permission_denied_is_one_line(capsys):
    # sysfs refuses new files even to root (EACCES): a real permission error without chmod.
    if not Path("/sys/kernel").is_dir():
        pytest.skip("no sysfs")
    with pytest.raises(OutputError, match="cannot write /sys/kernel/x.json: Permission denied"):
        write_json("/sys/kernel/x.json", {})
    one_line(capsys, ["train", "--out", "/sys/kernel/x.ckpt"], "--out /sys/kernel/x.ckpt",
             "cannot create files in /sys/kernel (Permission denied)")


def test_output_under_a_file_or_under_proc(tmp_path, capsys, monkeypatch, no_training):
    monkeypatch.chdir(tmp_path)
    Path("somefile").write_text("mine")
    with pytest.raises(OutputError, match="cannot write somefile/x.json: somefile is a file, not a folder"):
        write_json("somefile/x.json", {})
    one_line(capsys, ["train", "--out", "somefile/x.ckpt"], "--out somefile/x.ckpt: somefile is a file, not a folder")
    one_line(capsys, ["train", "--out", "somefile/a/b/x.ckpt"], "somefile is a file, not a folder")
    one_line(capsys, ["train", "--out", "/proc/x.ckpt"], "--out /proc/x.ckpt", "cannot create files in /proc")
    assert tree(tmp_path) == {"somefile": b"mine"}


def test_fit_out_given_a_folder(tmp_path, capsys):
    (tmp_path / "keep.txt").write_text("mine")
    one_line(capsys, ["fit", "--profile", SHIPPED, "--out", tmp_path],
             f"--out {tmp_path} is a folder; give a file name")
    assert tree(tmp_path) == {"keep.txt": b"mine"}


# 2. every output path checked before long work starts

def test_quickstart_out_naming_a_file_fails_before_training(tmp_path, capsys, no_training):
    file = tmp_path / "results"
    file.write_text("mine")
    one_line(capsys, ["quickstart", "--out", file], f"--out {file} is a file; give a folder")
    from nestnas.quickstart import run_quickstart

    with pytest.raises(OutputError, match="is a file; give a folder"):
        run_quickstart(file)
    one_line(capsys, ["quickstart", "--out", "/proc/nestnas-qs"], "cannot create files in /proc")
    assert file.read_text() == "mine"


def test_train_out_unwritable_fails_before_training(tmp_path, capsys, no_training):
    one_line(capsys, ["train", "--out", tmp_path], f"--out {tmp_path} is a folder")
    one_line(capsys, ["train", "--out", "/proc/1/x.ckpt"], "--out /proc/1/x.ckpt", "cannot create files in /proc/1")


def test_profile_out_checked_before_measuring(tmp_path, capsys, monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("profiling started before the output path was checked")

    monkeypatch.setattr("nestnas.hw_profiles.profiler.profile_device", refuse)
    (tmp_path / "f").write_text("mine")
    one_line(capsys, ["profile", "--family", "transformer", "--samples", "2", "--out", tmp_path / "f" / "p.json"],
             f"--out {tmp_path / 'f' / 'p.json'}: {tmp_path / 'f'} is a file, not a folder")
    one_line(capsys, ["profile", "--family", "transformer", "--out", tmp_path], "is a folder; give a file name")


def test_search_checks_out_plot_state_and_cache_first(tmp_path, capsys):
    # The checkpoint does not exist: each output option is refused before it is even read.
    (tmp_path / "f").write_text("mine")
    base = ["search", "--checkpoint", tmp_path / "missing.ckpt", "--profile", SHIPPED]
    for option in ("--out", "--plot", "--state", "--cache"):
        given = {"--out": tmp_path / "front.json", option: tmp_path / "f" / "x"}
        argv = base + [a for kv in given.items() for a in kv]
        one_line(capsys, argv, f"{option} {tmp_path / 'f' / 'x'}: {tmp_path / 'f'} is a file, not a folder")
        given[option] = tmp_path  # a folder where a file is wanted
        one_line(capsys, base + [a for kv in given.items() for a in kv], f"{option} {tmp_path} is a folder")
    assert tree(tmp_path) == {"f": b"mine"}


def test_export_checks_out_and_tuning_database_first(tmp_path, capsys):
    (tmp_path / "f").write_text("mine")
    base = ["export", "--front", tmp_path / "missing.json"]
    one_line(capsys, base + ["--out", tmp_path / "f"], f"--out {tmp_path / 'f'} is a file; give a folder")
    one_line(capsys, base + ["--out", tmp_path / "f" / "b"], f"{tmp_path / 'f'} is a file, not a folder")
    one_line(capsys, base + ["--out", tmp_path / "b", "--tune-db", tmp_path / "f"], "--tune-db", "is a file")
    one_line(capsys, base + ["--out", "/proc/bundle"], "--out /proc/bundle", "cannot create files in /proc")
    assert tree(tmp_path) == {"f": b"mine"}


def test_check_output_creates_nothing(tmp_path):
    target = tmp_path / "a" / "b" / "c.json"
    assert check_output(target, "--out") == target
    check_output(tmp_path / "new-bundle", "--out", kind="dir")
    check_output(tmp_path, "--out", kind="dir")
    check_outputs({"--out": target, "--plot": None})
    assert tree(tmp_path) == {}
    with pytest.raises(ValueError):
        check_output(target, "--out", kind="folder")


def test_full_disk_is_caught_before_work(small_disk):
    # A full disk still lets an empty file be created: the check writes a byte.
    filler = small_disk / "filler"
    with pytest.raises(OSError), open(filler, "wb") as f:
        while True:
            f.write(b"\0" * 4096)
            f.flush()
    with pytest.raises(OutputError, match=f"--out {small_disk / 'x.json'}: cannot write in {small_disk} "
                                          r"\(No space left on device\)"):
        check_output(small_disk / "x.json", "--out")
    assert sorted(p.name for p in small_disk.iterdir()) == ["filler"]


# 3. only path errors and NestnasErrors become one line; bugs keep their traceback

def test_read_error_names_the_file(capsys):
    # A real read error (EIO on /proc/self/mem); Python's read errors carry no file name.
    one_line(capsys, ["show", "/proc/self/mem"], "/proc/self/mem cannot be read: Input/output error")


def test_bugs_keep_their_traceback(monkeypatch, capsys):
    def broken(*args, **kwargs):
        raise raised

    monkeypatch.setattr("nestnas.hw_profiles.devices.list_profiles", broken)
    for raised in (ValueError("a bug"), KeyError("bug"), OSError(errno.EIO, "Input/output error")):
        with pytest.raises(type(raised)):
            main(["devices"])
    raised = PermissionError(errno.EACCES, "Permission denied", "/root/profiles/x.json")
    one_line(capsys, ["devices"], "error: /root/profiles/x.json: Permission denied")
    raised = OSError(errno.ENOSPC, "No space left on device", "/data/x.json")
    one_line(capsys, ["devices"], "error: cannot write /data/x.json: No space left on device")


# the progress bar of a failed job leaves stderr to the error line

@pytest.mark.parametrize("bar", [lambda c: StageBar("profile", True, c), lambda c: SearchProgress(True, 10, c)])
def test_failed_job_leaves_no_progress_bar(bar):
    buffer = io.StringIO()
    with pytest.raises(OutputError), bar(Console(file=buffer)) as b:
        if isinstance(b, StageBar):
            b("subnets", 3, 10)
        raise OutputError("cannot write x: No space left on device")
    assert buffer.getvalue() == ""
    with bar(Console(file=buffer)):
        pass
    assert buffer.getvalue() != ""  # a finished job still shows its bar's last state


def test_output_error_is_a_nestnas_error():
    exc = OutputError("cannot write /x: No space left on device", "/x", errno.ENOSPC)
    assert isinstance(exc, NestnasError) and isinstance(exc, OSError)
    assert str(exc) == "cannot write /x: No space left on device" and json.dumps(str(exc))
    assert os.strerror(exc.errno) == "No space left on device"
