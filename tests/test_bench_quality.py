"""tools/bench_supernet.py --quality (issue 20): the --quick run end to end, and its one-line option errors."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

TOOL = Path(__file__).resolve().parents[1] / "tools" / "bench_supernet.py"


def _run(*args: str, timeout: int = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(TOOL), "--quality", *args], capture_output=True, text=True,
                          timeout=timeout)


@pytest.mark.slow  # ~25 s alone, several times that on a busy machine
def test_quick_run_writes_a_sane_report(tmp_path):
    out = tmp_path / "q.json"
    proc = _run("--quick", "--out", str(out))
    assert proc.returncode == 0, proc.stderr[-2000:]
    result = json.loads(out.read_text())
    rows, summary = result["rows"], result["summary"]
    assert len(rows) == result["meta"]["subnets"] == 4
    macs = [r["macs"] for r in rows]
    assert macs == sorted(macs) and len(set(macs)) == len(macs)  # spread over MACs, smallest first
    for r in rows:
        assert 0 <= r["shared"] <= 1 and 0 <= r["standalone"] <= 1
        assert r["shared_se"] >= 0 and r["standalone_se"] >= 0
        assert r["gap_points"] == pytest.approx((r["shared"] - r["standalone"]) * 100)
    assert all("vs_line_points" in r for r in rows[1:-1]) and "vs_line_points" not in rows[0]
    for key in ("kendall_tau", "spearman_rho", "kendall_tau_top_half"):
        assert -1 <= summary[key] <= 1
    assert summary["worst_gap_points"] <= summary["mean_gap_points"]
    assert len(summary["targets"]) == 3 and all(isinstance(v, bool) for v in summary["targets"].values())
    assert "Kendall tau" in proc.stdout


@pytest.mark.parametrize("args, words", [
    (["--task", "cifar"], "unknown task 'cifar'"),
    (["--variant", "nope"], "unknown variant 'nope'"),
    (["--subnets", "2"], "--subnets 2: must be 3 to"),
    (["--subnets", "5000"], "--subnets 5000: must be 3 to"),
    (["--folds", "1"], "--folds 1: must be 2 to 20"),
    (["--folds", "99"], "--folds 99: must be 2 to 20"),
])
def test_bad_options_are_one_line_errors(args, words, capsys):
    sys.path.insert(0, str(TOOL.parent))
    from bench_quality import parse

    with pytest.raises(SystemExit) as exc:
        parse(["--quality", *args])
    err = capsys.readouterr().err
    assert exc.value.code == 2 and words in err
    assert len(err.strip().splitlines()) == 1, err


def test_bad_option_through_bench_supernet_is_one_line():
    proc = _run("--task", "cifar", timeout=120)
    assert proc.returncode == 2 and "unknown task 'cifar'" in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1 and "Traceback" not in proc.stderr, proc.stderr
