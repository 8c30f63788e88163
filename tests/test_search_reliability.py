"""Search reliability: LINAS resumes from a state file, a state never shrinks across kills, the
cache path never replaces a user's file, state and front files are validated on read and written
as standard JSON, front and plot are written together, and huge sizes are refused."""

import json
import os
import shutil
import sqlite3
import warnings
from pathlib import Path

import pytest
import torch

from nestnas.cli import main
from nestnas.errors import ArtifactError, ConfigError
from nestnas.search import CacheWarning, EvalCache, Objective, ParetoFront, macs_objective, params_objective, search
from nestnas.supernet import SearchSpace
from nestnas.supernet.checkpoint import save_checkpoint
from nestnas.supernet.transformer import ElasticTransformer

CNN = SearchSpace.mobilenet()
SQLITE_HEADER = b"SQLite format 3\x00"


def cheap_objectives():
    """A real trade-off between exact counts; `capacity` is marked expensive so LINAS fits its
    surrogate to it as it would to accuracy."""
    macs = macs_objective(CNN, num_classes=10, in_channels=1)
    params = params_objective(CNN, num_classes=10, in_channels=1)
    capacity = Objective("capacity", params.fn, "max", "params", "computed", params.context, expensive=True,
                         ideal=2e6)
    return [capacity, macs]


class Killed(Exception):
    """Stands for a kill right after a generation was saved."""


def kill_at(generation: int, state: Path, lengths: list[int]):
    def progress(record):
        lengths.append(len(strict_json(state)["archive"]))  # what the state holds after this save
        if record["generation"] == generation:
            raise Killed
    return progress


def strict_json(path: Path):
    def refuse(name):
        raise AssertionError(f"{path} holds {name}, which is not standard JSON")
    return json.loads(path.read_text(), parse_constant=refuse)


def same_front(a: ParetoFront, b: ParetoFront) -> None:
    assert [c.hash for c in a.evaluated] == [c.hash for c in b.evaluated]
    assert [c.metrics for c in a.evaluated] == [c.metrics for c in b.evaluated]
    assert a.front == b.front and a.hypervolume == b.hypervolume and a.reference == b.reference
    assert len(a.meta["history"]) == len(b.meta["history"])


def one_line_error(capsys, *fragments) -> str:
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert "Traceback" not in err
    for f in fragments:
        assert f in lines[0], lines[0]
    return lines[0]


# --- 1. LINAS with a state file --------------------------------------------------------------------
LINAS = {"algorithm": "linas", "evals": 24, "pop_size": 8, "seed": 0, "inner_evals": 200}


def test_a_killed_linas_search_resumes_to_the_same_front(tmp_path):
    objs = cheap_objectives()
    whole = search(CNN, objs, **LINAS, state=tmp_path / "whole.json")  # used to fail on the first save
    saved = strict_json(tmp_path / "whole.json")
    assert len(saved["batches"]) == len(whole.meta["history"]) >= 3
    assert all(isinstance(v, int) for batch in saved["batches"] for row in batch for v in row)
    state, lengths = tmp_path / "killed.json", []
    with pytest.raises(Killed):
        search(CNN, objs, **LINAS, state=state, progress=kill_at(2, state, lengths))
    resumed = search(CNN, objs, **LINAS, state=state)
    same_front(resumed, whole)
    assert resumed.meta["resumed"] and not whole.meta["resumed"]
    assert strict_json(state)["batches"] == saved["batches"]


def test_linas_from_the_cli_resumes(tmp_path, checkpoint, capsys):
    args = ["search", "--checkpoint", str(checkpoint), "--objectives", "params,macs", "--algorithm", "linas",
            "--evals", "16", "--pop-size", "8", "--inner-evals", "200", "--cache", str(tmp_path / "c.sqlite"),
            "--json"]
    assert main([*args, "--out", str(tmp_path / "f.json")]) == 0, capsys.readouterr().err
    saved = strict_json(tmp_path / "f.json.state.json")
    assert saved["batches"] and saved["settings"]["inner_evals"] == 200
    assert main([*args, "--out", str(tmp_path / "f.json")]) == 0, capsys.readouterr().err  # resumed from it
    assert strict_json(tmp_path / "f.json")["meta"]["resumed"]


# --- 3. a resumed state never holds less -----------------------------------------------------------
NSGA = {"algorithm": "nsga2", "evals": 120, "pop_size": 16, "seed": 2}


def test_a_state_never_shrinks_across_kills_during_replay(tmp_path):
    objs = cheap_objectives()
    whole = search(CNN, objs, **NSGA)
    state, lengths = tmp_path / "s.json", []
    with pytest.raises(Killed):
        search(CNN, objs, **NSGA, state=state, progress=kill_at(5, state, lengths))
    first = len(lengths)
    with pytest.raises(Killed):  # killed again while replaying the first run's generations
        search(CNN, objs, **NSGA, state=state, progress=kill_at(2, state, lengths))
    with pytest.raises(Killed):  # and once past them
        search(CNN, objs, **NSGA, state=state, progress=kill_at(7, state, lengths))
    assert len(lengths) == first + 2 + 7
    assert lengths == sorted(lengths), lengths  # the archive in the state file never decreased
    assert len(strict_json(state)["history"]) == 7
    resumed = search(CNN, objs, **NSGA, state=state)
    same_front(resumed, whole)


# --- 2. the cache path ---------------------------------------------------------------------------
def snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() if p.is_file() else b"<dir>" for p in sorted(folder.rglob("*"))}


def foreign_database(path: Path, wal: bool) -> None:
    db = sqlite3.connect(path)
    if wal:
        db.execute("PRAGMA journal_mode=WAL")
    db.execute("CREATE TABLE evals (id INTEGER, note TEXT)")  # same table name, another schema
    db.execute("INSERT INTO evals VALUES (1, 'mine')")
    db.commit()
    db.close()


@pytest.mark.parametrize("kind", ["folder", "checkpoint", "text", "sqlite-other-schema", "sqlite-wal-other-schema"])
def test_a_cache_path_that_is_not_a_nestnas_cache_is_refused_and_left_untouched(tmp_path, kind):
    path = tmp_path / "cache"
    if kind == "folder":
        path.mkdir()
        (path / "notes.txt").write_text("keep me")
    elif kind == "checkpoint":
        torch.save({"weights": torch.arange(10)}, path)
    elif kind == "text":
        path.write_text("SQLite is mentioned here, but this is a text file\n" * 20)
    else:
        foreign_database(path, wal=kind.startswith("sqlite-wal"))
    before = snapshot(tmp_path)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # nothing is "recreated"
        with pytest.raises(ConfigError) as err:
            EvalCache(path)
    message = str(err.value)
    assert str(path) in message and "left untouched" in message and "\n" not in message
    what = {"folder": "a folder", "checkpoint": "not a SQLite database", "text": "not a SQLite database"}
    assert what.get(kind, "another schema") in message
    assert snapshot(tmp_path) == before  # byte for byte, no .corrupt, no -wal/-shm left behind


def test_a_cache_path_naming_a_checkpoint_is_refused_from_the_cli(tmp_path, checkpoint, capsys):
    target = tmp_path / "ckpt"
    shutil.copy(checkpoint, target)
    before = snapshot(tmp_path)
    rc = main(["search", "--checkpoint", str(target), "--objectives", "params,macs", "--evals", "8",
               "--pop-size", "4", "--cache", str(target), "--out", str(tmp_path / "f.json")])
    assert rc == 1
    one_line_error(capsys, str(target), "not a SQLite database", "untouched")
    assert snapshot(tmp_path) == before


def test_a_corrupt_cache_is_moved_aside_with_its_wal_and_no_strays(tmp_path):
    good = tmp_path / "good" / "evals.sqlite"
    writer = EvalCache(good)
    writer.put("ctx", {f"h{i}": float(i) for i in range(2000)})
    writer._db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    writer.put("ctx", {"late": 1.0})  # a commit still in the -wal while the writer is open
    copy = tmp_path / "evals.sqlite"
    for suffix in ("", "-wal", "-shm"):
        shutil.copy(f"{good}{suffix}", f"{copy}{suffix}")
    writer.close()
    data = copy.read_bytes()
    copy.write_bytes(data[:4096] + b"\xee" * (len(data) - 4096))  # the header page kept, the rest destroyed
    corrupt, wal = copy.read_bytes(), Path(f"{copy}-wal").read_bytes()
    with pytest.warns(CacheWarning, match="corrupt.*moved to"):
        cache = EvalCache(copy)
    cache.put("ctx", {"h": 1.5})
    assert cache.get("ctx", ["h"]) == {"h": 1.5}
    cache.close()
    names = sorted(p.name for p in tmp_path.iterdir() if p.is_file())
    assert names == ["evals.sqlite", "evals.sqlite.corrupt", "evals.sqlite.corrupt-wal"], names
    assert (tmp_path / "evals.sqlite.corrupt").read_bytes() == corrupt
    assert (tmp_path / "evals.sqlite.corrupt-wal").read_bytes() == wal
    # Corrupt again: the earlier copy is kept, the new one takes a free name.
    copy.write_bytes(SQLITE_HEADER + b"\x10\x00" + b"\xee" * 5000)
    with pytest.warns(CacheWarning, match="corrupt-1"):
        EvalCache(copy).close()
    assert (tmp_path / "evals.sqlite.corrupt").read_bytes() == corrupt
    assert sorted(p.name for p in tmp_path.iterdir() if p.is_file()) == [
        "evals.sqlite", "evals.sqlite.corrupt", "evals.sqlite.corrupt-1", "evals.sqlite.corrupt-wal"]


def test_an_empty_file_and_an_empty_database_become_the_cache(tmp_path):
    empty = tmp_path / "empty.sqlite"
    empty.touch()
    blank = tmp_path / "blank.sqlite"
    sqlite3.connect(blank).close()
    for path in (empty, blank):
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            with EvalCache(path) as cache:
                cache.put("c", {"h": 2.0})
        with EvalCache(path) as cache:
            assert cache.get("c", ["h"]) == {"h": 2.0}


# --- 4. state and front files validated on read; standard JSON -----------------------------------
@pytest.fixture(scope="module")
def small_state(tmp_path_factory):
    path = tmp_path_factory.mktemp("state") / "s.json"
    search(CNN, cheap_objectives(), **LINAS, state=path)
    return path


STATE_CASES = {
    "archive": lambda d: {"archive": {r["hash"]: r["metrics"] for r in d["archive"]}},
    "archive.0.metrics.capacity": lambda d: {"archive": [{**d["archive"][0], "metrics": {
        k: str(v) for k, v in d["archive"][0]["metrics"].items()}}, *d["archive"][1:]]},
    "archive.1.hash": lambda d: {"archive": [d["archive"][0], {"metrics": {}}]},
    "batches.0.0": lambda d: {"batches": [[row[:3] for row in d["batches"][0]], *d["batches"][1:]]},
    "batches.1.0": lambda d: {"batches": [d["batches"][0], [[99] * CNN.n_var]]},
    "batches.0": lambda d: {"batches": [7]},
    "history": lambda d: {"history": {"generation": 1}},
    "history.0.generation": lambda d: {"history": [{**d["history"][0], "generation": "1"}, *d["history"][1:]]},
    "history.1.tau_capacity": lambda d: {"history": [d["history"][0], {**d["history"][1], "tau_capacity": "high"},
                                                     *d["history"][2:]]},
    "settings": lambda d: {"settings": ["nsga2"]},
}


@pytest.mark.parametrize("field", list(STATE_CASES))
def test_a_malformed_state_file_gives_one_line_naming_the_field(tmp_path, small_state, field):
    data = json.loads(small_state.read_text())
    path = tmp_path / "state.json"
    path.write_text(json.dumps({**data, **STATE_CASES[field](data)}))
    before = path.read_bytes()
    with pytest.raises(ConfigError) as err:
        search(CNN, cheap_objectives(), **LINAS, state=path)
    assert str(path) in str(err.value) and f"field {field}" in str(err.value), str(err.value)
    assert "\n" not in str(err.value) and path.read_bytes() == before


def test_a_state_file_with_a_bare_nan_is_refused(tmp_path, small_state):
    text = small_state.read_text()
    data = json.loads(text)
    value = json.dumps(data["archive"][0]["metrics"]["macs"])
    path = tmp_path / "state.json"
    path.write_text(text.replace(f'"macs": {value}', '"macs": NaN', 1))
    with pytest.raises(ConfigError, match=r"field archive\.0\.metrics\.macs.*finite"):
        search(CNN, cheap_objectives(), **LINAS, state=path)


@pytest.fixture(scope="module")
def saved_front(tmp_path_factory):
    path = tmp_path_factory.mktemp("front") / "front.json"
    front = search(CNN, cheap_objectives(), algorithm="nsga2", evals=40, pop_size=10, seed=0,
                   constraints=["macs=60M"])
    front.meta["checkpoint"] = {"path": "/nowhere/ckpt", "sha256": "0" * 64}
    front.save(path)
    return path


def _drop(d: dict, key: str) -> dict:
    return {k: v for k, v in d.items() if k != key}


FRONT_CASES = {
    "objectives.0.ideal": lambda d: {"objectives": [_drop(d["objectives"][0], "ideal"), d["objectives"][1]]},
    "objectives.1.direction": lambda d: {"objectives": [d["objectives"][0], {**d["objectives"][1],
                                                                             "direction": "lower"}]},
    "objectives": lambda d: {"objectives": []},
    "reference": lambda d: {"reference": {"capacity": d["reference"]["capacity"]}},
    "reference.macs": lambda d: {"reference": {**d["reference"], "macs": "big"}},
    "budgets.0.op": lambda d: {"budgets": [{**d["budgets"][0], "op": "<"}]},
    "evaluated.0.metrics": lambda d: {"evaluated": [_drop(d["evaluated"][0], "metrics"), *d["evaluated"][1:]]},
    "evaluated.1.metrics.capacity": lambda d: {"evaluated": [d["evaluated"][0], {
        **d["evaluated"][1], "metrics": {**d["evaluated"][1]["metrics"], "capacity": "1e6"}}, *d["evaluated"][2:]]},
    "evaluated.2.metrics": lambda d: {"evaluated": [*d["evaluated"][:2], {
        **d["evaluated"][2], "metrics": {"capacity": 1.0}}, *d["evaluated"][3:]]},  # no macs: the budget's too
    "evaluated.0.hash": lambda d: {"evaluated": [{**d["evaluated"][0], "hash": 12}, *d["evaluated"][1:]]},
    "front.0": lambda d: {"front": [len(d["evaluated"]) + 5]},
    "front.1": lambda d: {"front": [d["front"][0], "1"]},
    "meta.anchors": lambda d: {"meta": {**d["meta"], "anchors": ["largest", "smallest"]}},
    "meta.checkpoint": lambda d: {"meta": {**d["meta"], "checkpoint": "/nowhere/ckpt"}},
    "meta.budgets.0": lambda d: {"meta": {**d["meta"], "budgets": [3]}},
    "evaluated": lambda d: {"evaluated": None},
}


@pytest.mark.parametrize("field", list(FRONT_CASES))
def test_a_malformed_front_gives_one_line_naming_the_field(tmp_path, saved_front, field):
    data = json.loads(saved_front.read_text())
    path = tmp_path / "front.json"
    path.write_text(json.dumps({**data, **FRONT_CASES[field](data)}))
    with pytest.raises(ArtifactError) as err:
        ParetoFront.load(path)
    assert str(path) in str(err.value) and f"field {field}" in str(err.value), str(err.value)
    assert "\n" not in str(err.value)


@pytest.mark.parametrize("field", ["objectives.0.ideal", "evaluated.0.metrics", "meta.anchors"])
def test_show_and_export_of_a_malformed_front_give_one_line(tmp_path, saved_front, field, capsys):
    data = json.loads(saved_front.read_text())
    path = tmp_path / "front.json"
    path.write_text(json.dumps({**data, **FRONT_CASES[field](data)}))
    assert main(["show", str(path)]) == 1
    one_line_error(capsys, str(path), f"field {field}")
    assert main(["export", "--front", str(path), "--out", str(tmp_path / "b"), "--formats", "onnx"]) == 1
    one_line_error(capsys, str(path), f"field {field}")
    assert not (tmp_path / "b").exists()


def test_fronts_and_states_are_standard_json(tmp_path, saved_front, small_state):
    front = ParetoFront.load(saved_front)
    front.meta["history"][0]["tau_capacity"] = float("nan")  # an undefined statistic
    front.meta["spread"] = float("inf")
    path = tmp_path / "front.json"
    front.save(path)
    data = strict_json(path)  # no bare NaN / Infinity
    assert data["meta"]["history"][0]["tau_capacity"] is None and data["meta"]["spread"] is None
    back = ParetoFront.load(path)
    assert back.meta["history"][0]["tau_capacity"] is None
    assert [c.metrics for c in back.evaluated] == [c.metrics for c in front.evaluated]
    strict_json(small_state)
    assert "NaN" not in small_state.read_text()


def test_a_front_with_a_bare_nan_metric_is_refused(tmp_path, saved_front):
    data = json.loads(saved_front.read_text())
    data["evaluated"][0]["metrics"]["macs"] = float("nan")
    path = tmp_path / "front.json"
    path.write_text(json.dumps(data))  # Python writes a bare NaN
    with pytest.raises(ArtifactError, match=r"field evaluated\.0\.metrics\.macs.*finite"):
        ParetoFront.load(path)


# --- 5. front and plot: both or neither ---------------------------------------------------------
def test_a_failing_plot_leaves_no_front(tmp_path):
    macs = cheap_objectives()[1]
    front = search(CNN, [macs], evals=12, pop_size=6, seed=0)  # one objective: nothing to plot
    out, png = tmp_path / "front.json", tmp_path / "front.png"
    with pytest.raises(ConfigError, match="two objectives"):
        front.save(out, plot=png)
    assert sorted(os.listdir(tmp_path)) == []
    two = search(CNN, cheap_objectives(), evals=12, pop_size=6, seed=0)
    two.save(out, plot=png)
    assert png.read_bytes()[:4] == b"\x89PNG" and ParetoFront.load(out).to_dict() == two.to_dict()


@pytest.mark.parametrize("where", ["plot-inside-out", "plot-is-out", "state-is-plot", "plot-under-proc"])
def test_output_paths_are_checked_before_the_search(tmp_path, checkpoint, capsys, where):
    out = tmp_path / "f.json"
    plot, state = {"plot-inside-out": (out / "p.png", None), "plot-is-out": (out, None),
                   "state-is-plot": (tmp_path / "p.png", tmp_path / "p.png"),
                   "plot-under-proc": (Path("/proc/nestnas-plot.png"), None)}[where]
    args = ["search", "--checkpoint", str(checkpoint), "--objectives", "params,macs", "--evals", "8", "--pop-size",
            "4", "--cache", str(tmp_path / "c.sqlite"), "--out", str(out), "--plot", str(plot)]
    assert main(args + (["--state", str(state)] if state else [])) == 1
    one_line_error(capsys, "--plot")
    assert sorted(os.listdir(tmp_path)) == []  # no front, no state, no cache: the search never started


# --- 6. huge sizes -------------------------------------------------------------------------------
@pytest.mark.parametrize("option, value, bound", [("pop_size", 10**12, "100000"), ("evals", 10**12, "1000000")])
def test_huge_sizes_are_refused_with_the_allowed_range(option, value, bound):
    with pytest.raises(ConfigError, match=rf"{option} {value} is too large; allowed: at most "
                                          rf"{bound} \(a larger run would not fit in memory\)"):
        search(CNN, cheap_objectives(), **{"evals": 10**12 if option == "pop_size" else value,
                                           "pop_size": value if option == "pop_size" else 40})


def test_sizes_beyond_a_small_space_are_refused():
    tiny = SearchSpace.transformer(depth_choices=(1,), embed_choices=(16,), head_choices=(1, 2),
                                   mlp_ratio_choices=(2.0,))
    assert tiny.size() == 2
    obj = Objective("depth", lambda cs: [c.depth for c in cs], "min", "", "computed", "d")
    with pytest.raises(ConfigError, match="pop_size 4 is too large; allowed: at most 2 .the space has 2 distinct"):
        search(tiny, [obj], evals=8, pop_size=4)


def test_huge_sizes_from_the_cli_give_one_line(tmp_path, checkpoint, capsys):
    args = ["search", "--checkpoint", str(checkpoint), "--objectives", "params,macs",
            "--cache", str(tmp_path / "c.sqlite"), "--out", str(tmp_path / "f.json")]
    assert main(args + ["--pop-size", str(10**12), "--evals", str(10**12)]) == 1
    one_line_error(capsys, "--pop-size 1000000000000 is too large", "at most")
    assert main(args + ["--evals", str(10**12)]) == 1
    one_line_error(capsys, "--evals 1000000000000 is too large", "at most 22113", "distinct subnets")
    assert not (tmp_path / "f.json").exists() and not (tmp_path / "f.json.state.json").exists()


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """An untrained transformer supernet's checkpoint (MACs and params need no training)."""
    torch.manual_seed(0)
    net = ElasticTransformer(SearchSpace.transformer(), num_classes=10, num_tokens=8, token_dim=8)
    path = tmp_path_factory.mktemp("ckpt") / "tr.ckpt"
    save_checkpoint(net, path)
    return path
