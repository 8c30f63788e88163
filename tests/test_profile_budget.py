"""Profiling on a busy host: a time budget that is kept, an ETA with retries, a report that says
how busy the host was, and numeric options bounded before anything is written (issue 14, 4-5)."""

import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from nestnas.cli import main
from nestnas.compile import get_backend, get_runner
from nestnas.errors import ConfigError
from nestnas.hw_profiles import DeviceProfile, profile_device, space_filling_sample
from nestnas.hw_profiles.blocks import all_parts
from nestnas.hw_profiles.budget import BUSY_UNSTABLE_SHARE, ProfilingTimeLimit
from nestnas.supernet import ElasticTransformer, SearchSpace

TINY_TR = SearchSpace.transformer(depth_choices=(1, 2), embed_choices=(16, 32), head_choices=(1, 2),
                                  mlp_ratio_choices=(2.0, 4.0), head_dim=8)  # 40 distinct subnets
BURN = "import time\nend = time.time() + {seconds}\nwhile time.time() < end:\n    pass\n"
REPORT_FIELDS = {"complete", "stopped_by_budget", "max_minutes", "seconds", "done", "total", "measured", "unstable",
                 "retries", "first_attempt_only", "seconds_per_measurement", "load_start", "load_end", "cores",
                 "busy", "busy_reason", "usable"}


def burners(n: int = 2, seconds: float = 40.0) -> list[subprocess.Popen]:
    """`n` processes that keep a core busy each, ending by themselves after `seconds`."""
    return [subprocess.Popen([sys.executable, "-c", BURN.format(seconds=seconds)]) for _ in range(n)]


def stop(procs: list[subprocess.Popen]) -> None:
    for proc in procs:
        proc.kill()
        proc.wait()


def check_report(run: dict) -> None:
    assert set(run) == REPORT_FIELDS
    assert 0 <= run["first_attempt_only"] <= run["unstable"] <= run["measured"] <= run["done"] <= run["total"]
    assert run["cores"] == os.cpu_count()
    assert all(isinstance(run[k], float) for k in ("load_start", "load_end"))  # Linux has load averages
    loaded = max(run["load_start"], run["load_end"]) > run["cores"]
    noisy = run["measured"] >= 4 and run["unstable"] >= BUSY_UNSTABLE_SHARE * run["measured"]
    assert run["busy"] == (loaded or noisy) == (run["busy_reason"] is not None)
    if loaded:
        assert "load average" in run["busy_reason"]


def test_a_busy_host_keeps_the_budget_and_the_profile_resumes(tmp_path):
    path, budget_s, slack_s = tmp_path / "busy.json", 2.4, 10.0
    seen: list[str] = []
    # the exporter's one-time import (seconds when cold) is not what the slack is for
    get_backend("onnxruntime", threads=1).build(torch.nn.Linear(2, 2).eval(), torch.randn(1, 2))
    procs = burners()
    try:
        t0 = time.perf_counter()
        partial = profile_device(TINY_TR, "onnxruntime", 8, 0, out=path, threads=1, passes=2, batch_size=4,
                                 max_minutes=budget_s / 60, progress=lambda stage, done, total: seen.append(stage))
        elapsed = time.perf_counter() - t0
    finally:
        stop(procs)
    assert elapsed <= budget_s + slack_s  # stopped after the measurement during which the budget ran out
    run = partial.meta["last_run"]
    check_report(run)
    assert run["stopped_by_budget"] and not run["complete"] and 1 <= run["measured"] == run["done"] < run["total"]
    assert run["total"] == 2 * (8 + len(all_parts(ElasticTransformer(TINY_TR))))
    saved = DeviceProfile.load(path)
    assert saved.meta["complete"] is False and saved.meta["last_run"] == run
    assert sum(len(m["passes"]) for t in (saved.measurements, saved.blocks) for m in t.values()) == run["done"]
    passes = [p for t in (saved.measurements, saved.blocks) for m in t.values() for p in m["passes"]]
    assert run["retries"] == sum(p["attempts"] - 1 for p in passes)  # the report counts what the file holds
    assert run["unstable"] == sum(not p["stable"] for p in passes)
    assert seen and all("s/measurement incl." in s and "budget ends" in s for s in seen)

    # quiet now, no budget (healing what the busy run flagged is tested below)
    done = profile_device(TINY_TR, "onnxruntime", 8, 0, out=path, threads=1, passes=2, remeasure_unstable=False)
    assert done.batch_size == 4
    again = done.meta["last_run"]
    check_report(again)
    assert done.meta["complete"] and again["complete"] and again["done"] == again["total"] == run["total"]
    assert again["max_minutes"] is None and not again["stopped_by_budget"]
    assert again["measured"] == again["total"] - run["done"]  # nothing measured twice
    assert set(done.measurements) == {TINY_TR.config_hash(c) for c in space_filling_sample(TINY_TR, 8, 0)}
    assert set(done.blocks) == set(all_parts(ElasticTransformer(TINY_TR)))
    for table in ("measurements", "blocks"):
        for key, m in getattr(saved, table).items():
            assert getattr(done, table)[key]["passes"][:len(m["passes"])] == m["passes"]
            assert len(getattr(done, table)[key]["passes"]) == 2
    assert DeviceProfile.load(path).meta["complete"] is True

    # a run short of time measures what is missing before healing flagged records, and keeps them meanwhile
    data = json.loads(path.read_text())
    flagged = sorted(data["measurements"])[0]
    data["measurements"][flagged].update(stable=False, timestamp="flagged")
    path.write_text(json.dumps(data))
    short = profile_device(TINY_TR, "onnxruntime", 8, 0, out=path, threads=1, passes=2, max_minutes=1e-5)
    assert short.measurements[flagged]["timestamp"] == "flagged" and len(short.measurements) == 8
    to_heal = sum(not m["stable"] for t in ("measurements", "blocks") for m in data[t].values())
    assert short.meta["last_run"]["total"] == run["total"] + 2 * to_heal and not short.meta["complete"]


def test_retries_stop_when_half_the_budget_is_gone():
    budget = ProfilingTimeLimit(0.01, max_attempts=2)  # 0.6 s
    assert budget.attempts_cap() == 2 and not budget.spent()
    time.sleep(0.35)
    assert budget.attempts_cap() == 1 and not budget.spent()
    time.sleep(0.3)
    assert budget.spent() and budget.stopped
    assert ProfilingTimeLimit(None, 2).attempts_cap() == 2

    # the runner takes the lower cap for one call: an unstable first attempt comes back flagged
    x = torch.randn(2, 8)
    model = get_backend("onnxruntime", threads=1).build(torch.nn.Linear(8, 8).eval(), x)
    runner = get_runner("onnxruntime", target_rel_ci=1e-12, max_seconds=0.05, min_repeats=6)  # never stable
    assert runner.measure(model, x.numpy()).attempts == 2
    once = runner.measure(model, x.numpy(), max_attempts=1)
    assert once.attempts == 1 and not once.stable
    with pytest.raises(ConfigError, match="max_attempts=0"):
        runner.measure(model, x.numpy(), max_attempts=0)


def run_cli(capsys, *args):
    code = main(["profile", "--family", "transformer", "--threads", "1", *map(str, args)])
    out, err = capsys.readouterr()
    return code, out, err


@pytest.mark.parametrize("option, value, allowed", [
    ("--samples", 10**12, "allowed: 2 to 10000"), ("--samples", 1, "allowed: 2 to 10000"),
    ("--passes", 10**6, "allowed: 1 to 10"), ("--passes", 0, "allowed: 1 to 10"),
    ("--batch-size", 10**9, "allowed: 1 to 1024"), ("--threads", 0, "allowed: 1 to 256"),
    ("--max-minutes", 0, "allowed: more than 0"), ("--max-minutes", "nan", "allowed: more than 0"),
    ("--max-minutes", 10**9, "at most 10080"),
])
def test_numeric_options_are_bounded_before_anything_is_written(tmp_path, capsys, option, value, allowed):
    out = tmp_path / "p.json"
    code, _, err = run_cli(capsys, option, value, "--out", out)
    assert code == 1 and err.strip().startswith("error: ") and len(err.strip().splitlines()) == 1, err
    assert option in err and allowed in err and "Traceback" not in err
    assert list(tmp_path.iterdir()) == []


def test_samples_are_bounded_by_the_space():
    with pytest.raises(ConfigError, match="^n_samples 41 is out of range; allowed: 2 to 40"):
        profile_device(TINY_TR, "onnxruntime", 41, 0)


def test_cli_exit_code_says_whether_an_incomplete_profile_is_usable(tmp_path, capsys):
    out = tmp_path / "p.json"
    common = ("--no-blocks", "--passes", 1, "--out", out)
    # the budget runs out before the first subnet: one error line, and the chosen batch is kept for a rerun
    code, _, err = run_cli(capsys, "--samples", 12, "--max-minutes", 0.0005, *common)
    assert code == 1 and len(err.strip().splitlines()) == 1, err
    assert err.strip().startswith("error: the 0.0005-minute budget ran out after 0 of 12 measurements")
    assert "rerun the same command to continue" in err and "nothing usable yet" in err
    assert DeviceProfile.load(out).meta["complete"] is False

    code, stdout, err = run_cli(capsys, "--samples", 7, "--json", *common)  # resumed, completed
    summary = json.loads(stdout)
    assert code == 0 and summary["complete"] and summary["subnets"] == 7 and "budget ran out" not in err
    assert REPORT_FIELDS <= set(summary)

    code, stdout, err = run_cli(capsys, "--samples", 12, "--max-minutes", 0.0005, "--json", *common)
    summary = json.loads(stdout)
    assert code == 0 and not summary["complete"] and summary["usable"] and summary["subnets"] >= 7
    warning = [line for line in err.splitlines() if "budget ran out" in line]
    assert len(warning) == 1 and warning[0].startswith("warning: the 0.0005-minute budget ran out")
    assert "subnets are usable" in warning[0] and math.isfinite(summary["seconds"])


def test_fit_warns_that_a_profile_is_incomplete(tmp_path, capsys):
    import nestnas.hw_profiles as hw

    shipped = Path(hw.__file__).parent / "data" / "xeon-2c-onnxruntime-transformer.json"
    data = json.loads(shipped.read_text())
    for complete, warned in ((True, False), (False, True)):
        data.setdefault("meta", {})["complete"] = complete
        path = tmp_path / f"p{complete}.json"
        path.write_text(json.dumps(data))
        out = tmp_path / f"pred{complete}.json"
        assert main(["fit", "--profile", str(path), "--out", str(out), "--kind", "ensemble", "--json"]) == 0
        err = capsys.readouterr().err
        assert ("is incomplete" in err) == warned, err
        assert out.is_file()
    assert DeviceProfile.load(tmp_path / "pFalse.json").complete is False
    assert DeviceProfile.load(shipped).complete is True  # no flag: from before budgets


def test_library_errors_name_parameters_and_the_cli_names_options(tmp_path, capsys):
    """The library speaks of its parameters; the command line maps them to its options."""
    from nestnas.compile.bundle import check_formats
    from nestnas.compile.signing import keygen

    with pytest.raises(ConfigError, match="^formats: unknown format 'tflite'"):
        check_formats(("onnx", "tflite"))
    key = tmp_path / "k.key"
    keygen(key)
    with pytest.raises(ConfigError, match=r"^path .* exists; pass force=True"):
        keygen(key)
    proc = subprocess.run([sys.executable, "-m", "nestnas", "keygen", "--out", str(key)],
                          capture_output=True, text=True)
    assert proc.returncode == 1 and proc.stderr.startswith(f"error: --out {key} exists; pass --force to replace it")
    capsys.readouterr()
    assert main(["profile", "--family", "transformer", "--samples", "100000", "--out", str(tmp_path / "p.json")]) == 1
    assert capsys.readouterr().err.startswith("error: --samples 100000 is out of range; allowed: 2 to ")
