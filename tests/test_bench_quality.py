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


@pytest.mark.slow  # ~60 s alone (two quick runs), several times that on a busy machine
def test_quick_run_writes_a_sane_report_and_reuses_standalone(tmp_path):
    out = tmp_path / "q.json"
    proc = _run("--quick", "--variant", "default,macs", "--jobs", "2", "--out", str(out))
    assert proc.returncode == 0, proc.stderr[-2000:]
    result = json.loads(out.read_text())
    assert list(result["variants"]) == ["default", "macs"] and result["rows"] == result["variants"]["default"]["rows"]
    for res in result["variants"].values():
        assert set(res["calib_sweep"]) == {"64", "128", "all"}
        assert all(c["kendall_tau_std"] >= 0 and c["mean_accuracy_std"] >= 0 for c in res["calib_sweep"].values())
    assert -1 <= result["ceiling"]["kendall_tau_seed_to_seed"] <= 1
    # a second run reusing the stand-alone results (runs a and b) and training a third seed
    again = tmp_path / "again.json"
    proc = _run("--quick", "--variant", "default", "--standalone-from", str(out), "--standalone-seeds", "3",
                "--out", str(again))
    assert proc.returncode == 0, proc.stderr[-2000:]
    second = json.loads(again.read_text())
    for old, new in zip(result["standalone"], second["standalone"], strict=True):
        runs = new.pop("standalone_runs_folds")
        assert len(runs) == 3 and runs[:2] == old.pop("standalone_runs_folds")  # reused exactly
        assert new.pop("standalone_mean") == pytest.approx(sum(sum(f) / len(f) for f in runs) / 3)
        old.pop("standalone_mean")
        assert new == old
    assert second["variants"]["default"]["rows"] == result["variants"]["default"]["rows"]  # seeded: reproducible
    ceiling = second["ceiling"]
    assert ceiling["runs"] == 3 and list(ceiling["kendall_tau_pairs"]) == ["a-b", "a-c", "b-c"]
    assert ceiling["kendall_tau_pairs"]["a-b"] == result["ceiling"]["kendall_tau_seed_to_seed"]
    assert -1 <= ceiling["kendall_tau_one_vs_rest_mean"] <= 1
    from scipy.stats import kendalltau

    means = [r["standalone_mean"] for r in json.loads(again.read_text())["standalone"]]
    shared = [r["shared"] for r in second["variants"]["default"]["rows"]]
    got = second["variants"]["default"]["summary"]["kendall_tau_vs_seed_mean"]
    want = kendalltau(shared, means).statistic
    assert got == pytest.approx(0.0 if want != want else want)  # NaN (constant accuracies) reads 0
    rows, summary = result["rows"], result["summary"]
    assert len(rows) == result["meta"]["subnets"] == 4
    macs = [r["macs"] for r in rows]
    assert macs == sorted(macs) and len(set(macs)) == len(macs)  # spread over MACs, smallest first
    for r in rows:
        assert 0 <= r["shared"] <= 1 and 0 <= r["standalone"] <= 1
        assert r["shared_se"] >= 0 and r["standalone_se"] >= 0
        assert r["gap_points"] == pytest.approx((r["shared"] - r["standalone"]) * 100)
    assert all("vs_line_points" in r for r in rows[1:-1]) and "vs_line_points" not in rows[0]
    assert summary["standalone_middle_worst_vs_line_points"] == pytest.approx(
        min(r["standalone_vs_line_points"] for r in rows[1:-1]))
    assert len(result["ceiling"]["middle_worst_vs_line_points_per_run"]) == 2
    assert result["ceiling"]["middle_worst_vs_line_points_per_run"][0] == pytest.approx(
        summary["standalone_middle_worst_vs_line_points"])  # run a is the one the rows show
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
    (["--variant", "default,nope"], "unknown variant 'nope'"),
    (["--variant", "macs,macs"], "a variant is listed twice"),
    (["--jobs", "0"], "--jobs 0: must be 1 to 64"),
    (["--standalone-from", "/nonexistent/q.json"], "--standalone-from /nonexistent/q.json: not a readable"),
    (["--standalone-seeds", "0"], "--standalone-seeds 0: must be 1 to 10"),
    (["--standalone-seeds", "3", "--no-ceiling"], "--no-ceiling means one run"),
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


def test_standalone_from_must_match_the_run(tmp_path, capsys):
    sys.path.insert(0, str(TOOL.parent))
    from bench_quality import parse

    old = tmp_path / "old.json"
    old.write_text(json.dumps({"meta": {"task": "digits", "epochs": 1, "seed": 0, "folds": 3, "subnets": 4},
                               "standalone": []}))
    with pytest.raises(SystemExit):
        parse(["--quick", "--standalone-from", str(old)])  # the default task is digits-hard
    err = capsys.readouterr().err
    assert "task is 'digits' there, 'digits-hard' here" in err and len(err.strip().splitlines()) == 1
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(SystemExit):
        parse(["--quick", "--standalone-from", str(tmp_path / "bad.json")])
    assert "not a readable quality report" in capsys.readouterr().err


def test_shared_folds_matches_subnet_accuracy():
    """The benchmark recalibrates once per subnet and scores every fold: it must equal the
    library's `subnet_accuracy` (which recalibrates per call) fold by fold."""
    sys.path.insert(0, str(TOOL.parent))
    import bench_quality as bq
    from torch.utils.data import DataLoader

    from nestnas.supernet.evaluate import subnet_accuracy

    train_ds, folds = bq._context("digits-hard", 0, 3)
    net = bq._fresh_net(0)
    calib = DataLoader(train_ds, batch_size=bq.CALIB_BATCH, shuffle=True)
    for config, _ in bq.pick_subnets(net, 3, 0):
        got = bq.shared_folds(net, config, folds, calib, 4, seed=7)
        want = [subnet_accuracy(net, config, f, calib, calib_batches=4, seed=7) for f in folds]
        assert got == want


def test_vs_line_is_the_distance_to_the_log_macs_line():
    sys.path.insert(0, str(TOOL.parent))
    import math

    from bench_quality import vs_line

    got = vs_line([0.5, 0.6, 0.9, 1.0], [1, math.e, math.e ** 2, math.e ** 3])
    assert got.tolist() == pytest.approx([-100 / 15, 100 / 15])  # line: 0.5 + k / 6 at log MACs k
    assert vs_line([0.7, 0.7], [10, 20]).size == 0  # no middle
