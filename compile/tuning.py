"""One MetaSchedule tuning database shared by every subnet of a front.

Subnets of one supernet share most of their workloads (the same fused conv shapes recur across
configs), so the tasks of all subnets to export are extracted first, deduplicated by the
structural hash of their TIR, and each unique workload is tuned once; workloads the on-disk
database already holds (from an earlier export) are not tuned again. Compiling a subnet then
applies the database to its own tasks.

Search strategy: "evolutionary" (the default) mutates the best schedules found so far and ranks
candidates with an xgboost cost model, one model learning across all workloads of a run; it costs
about 2.5x the time per trial of "replay-trace" (measuring schedules sampled at random from the
design space) and found 1.18x faster code for a CNN subnet at 32 trials per workload (0.238
against 0.282 ms, batch 1). Replay-trace suits small budgets (the quickstart) and needs no xgboost.

Budget: `trials` per workload on average. Every workload gets one search round (or, with
transfer, its nearest tuned relatives' best schedules fitted to its extents: ~2 s against ~15 s
for a round), then the remaining rounds go to the workloads that take the subnets' time. On a
5-subnet CNN front this cut shared tuning from 1719 s to 1134 s, 0.48 of tuning each subnet alone
(tools/bench_compile.py).

Weights are constants of the compiled module, so they are marked layout-free before tasks are
extracted: MetaSchedule may then choose a packed weight layout per workload, and the repacking is
folded into the constants at compile time (TVM's CPU weight prepack, without its separate
parameter-transform function).
"""

from __future__ import annotations

import math
import os
import re
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from nestnas.compile.tvm_util import load_tensor_intrinsics, native_output_to, native_warnings_dropped, require_tvm
from nestnas.errors import BackendUnavailable, ConfigError

STRATEGIES = ("replay-trace", "evolutionary")
CHUNK = 4  # workloads per MetaSchedule call; the time budget is checked between calls
ROUND = 16  # schedules measured per search round of one workload
TRANSPLANT_TOP = 4  # best schedules taken from each of a workload's two nearest tuned relatives
POPULATION = 256  # evolutionary candidates per round; MetaSchedule's 512 doubles the search time here
RUN_TIMEOUT_S = 60.0
MIN_REPEAT_MS = 40  # per measured schedule; MetaSchedule's 100 ms triples tuning time here


@dataclass(frozen=True)
class TuneOptions:
    """`trials` measured schedules per unique workload on average (0: no tuning); `max_seconds`
    stops tuning new workloads once spent (those left untuned keep TVM's default schedule);
    `transfer`: a workload whose relative (the same TIR with other extents) is already tuned
    starts from that relative's best schedules, adapted, instead of a search round."""

    trials: int = 32
    max_seconds: float | None = None
    database: str | os.PathLike | None = None
    strategy: str = "evolutionary"
    seed: int = 0
    transfer: bool = True

    def __post_init__(self) -> None:
        if self.trials < 0:
            raise ConfigError(f"tune_trials must be >= 0, got {self.trials}")
        if self.max_seconds is not None and self.max_seconds <= 0:
            raise ConfigError(f"tune_seconds must be positive, got {self.max_seconds}")
        if self.strategy not in STRATEGIES:
            raise ConfigError(f"tuning strategy {self.strategy!r}; allowed: {list(STRATEGIES)}")
        if self.enabled:
            require_strategy(self.strategy)

    @property
    def enabled(self) -> bool:
        return self.trials > 0


def relax_module(onnx_path: str | os.PathLike, shape: tuple[int, ...], input_name: str,
                 inputs: dict[str, tuple[tuple[int, ...], str]] | None = None) -> Any:
    """The Relax module of an ONNX file (weights bound as constants); a graph of several inputs
    gives `inputs` ({name: (shape, dtype)}) instead of its one float32 `input_name`."""
    import onnx

    require_tvm()
    from tvm.relax.frontend.onnx import from_onnx

    inputs = inputs if inputs is not None else {input_name: (shape, "float32")}
    with native_warnings_dropped():
        return from_onnx(onnx.load(os.fspath(onnx_path)), shape_dict={n: list(s) for n, (s, _) in inputs.items()},
                         dtype_dict={n: d for n, (_, d) in inputs.items()}, keep_params_in_input=False)


def prepare(mod: Any, target: Any) -> Any:
    """Legalise and fuse (the form whose fused TIR functions are the tuning tasks)."""
    tvm = require_tvm()
    from tvm import relax

    with target, native_warnings_dropped():
        return tvm.transform.Sequential([relax.transform.DecomposeOpsForInference(),
                                         relax.transform.CanonicalizeBindings(),
                                         relax.pipeline.zero_pipeline(),
                                         relax.transform.AttachAttrLayoutFreeBuffers()])(mod)


def extract_tasks(prepared: Any, target: Any) -> list[Any]:
    require_tvm()
    from tvm.s_tir import meta_schedule as ms

    return list(ms.relax_integration.extract_tasks(prepared, target, module_equality="structural"))


def task_key(task: Any) -> str:
    return _structural_key(task.dispatched[0])


class TuningDatabase:
    """A MetaSchedule JSON database in a folder, reused across exports."""

    def __init__(self, path: str | os.PathLike):
        require_tvm()
        from tvm.s_tir import meta_schedule as ms

        self.path = Path(path)
        try:
            (self.path / "logs").mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise ConfigError(f"tuning database folder {self.path} cannot be created: {exc.strerror}") from None
        try:
            self.db = ms.database.JSONDatabase(work_dir=os.fspath(self.path), module_equality="structural")
        except Exception as exc:  # noqa: BLE001 - TVM's own error type
            why = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
            raise ConfigError(f"tuning database {self.path} cannot be read ({why}); move it aside or give "
                              "another folder") from None

    def has(self, task: Any) -> bool:
        mod = task.dispatched[0]
        return bool(self.db.has_workload(mod)) and len(self.db.get_top_k(self.db.commit_workload(mod), 1)) > 0

    def tune(self, tasks_per_module: list[list[Any]], options: TuneOptions,  # noqa: C901
             progress: Callable[[str, int, int], None] | None = None) -> dict[str, Any]:
        """Tune the unique workloads among `tasks_per_module` not yet in the database.

        The budget is `options.trials` measured schedules per workload on average, spent in
        rounds of up to ROUND: every workload gets one round (or, with `options.transfer`, a
        transplant of its nearest tuned relatives' best schedules, which costs no search), then
        the remaining rounds go to the workloads where the subnets spend their time (best latency
        so far x calls, as a share of each subnet's total, summed over subnets), so that a 50 us
        depthwise conv is not tuned as briefly as a 0.2 us one."""
        from tvm.s_tir import meta_schedule as ms

        total = sum(len(t) for t in tasks_per_module)
        unique: dict[str, Any] = {}
        calls: list[dict[str, float]] = []  # per module: workload -> calls
        for tasks in tasks_per_module:
            calls.append({})
            for task in tasks:
                key = task_key(task)
                unique.setdefault(key, task)
                calls[-1][key] = calls[-1].get(key, 0.0) + float(task.weight)
        weights = {k: sum(c.get(k, 0.0) for c in calls) for k in unique}
        # Heaviest workloads first (FLOPs x occurrences): under a time budget they gain the most.
        todo = sorted((k for k, t in unique.items() if not self.has(t)), key=lambda k: -_cost(unique[k], weights[k]))
        first = min(options.trials, ROUND)
        extra = (options.trials - first) * len(todo) // ROUND
        report = {"total_tasks": total, "unique_tasks": len(unique), "reused_from_database": len(unique) - len(todo),
                  "tuned": 0, "skipped_for_time": 0, "trials_per_task": options.trials, "strategy": options.strategy,
                  "trials": 0, "transplanted": 0, "extra_rounds": {}, "seconds": 0.0, "database": str(self.path)}
        if not options.enabled or not todo:
            return report
        start = time.perf_counter()
        load_tensor_intrinsics()
        # The builder, runner and cost model serve every MetaSchedule call of the run. The runner's
        # worker process (slow to start: it imports TVM) is kept for the whole run; its timeout is
        # generous because that import takes well over MetaSchedule's default 30 s on two busy cores.
        with native_output_to(self.path / "logs" / "console.log"):
            runner = ms.runner.LocalRunner(timeout_sec=RUN_TIMEOUT_S, evaluator_config=ms.runner.EvaluatorConfig(
                number=3, repeat=1, min_repeat_ms=MIN_REPEAT_MS, enable_cpu_cache_flush=False))
        session = _Session(self, options, _in_process_builder(), runner, _cost_model(options.strategy))
        session.index_database()
        rounds_total = len(todo) + extra
        tuning_start = time.perf_counter()  # the budget is for tuning, not for setting up

        def out_of_time() -> bool:
            return options.max_seconds is not None and time.perf_counter() - tuning_start > options.max_seconds

        # Cold workloads are searched in chunks of a few per MetaSchedule call (the time budget is
        # checked in between); a workload whose relative waits in the current chunk waits for it.
        cold: list[str] = []
        waiting: list[str] = []
        queue = list(todo)

        def search_cold() -> None:
            if cold:
                report["trials"] += session.run([unique[k] for k in cold], first)
                report["tuned"] += len(cold)
                cold.clear()
                queue[:0] = waiting  # their relatives are tuned now
                waiting.clear()
                if progress:
                    progress("tuning", report["tuned"], rounds_total)

        while queue or cold:
            if out_of_time():
                report["skipped_for_time"] = len(queue) + len(cold) + len(waiting)
                break
            if not queue or len(cold) == CHUNK:
                search_cold()
                continue
            k = queue.pop(0)
            measured = session.transplant(unique[k]) if options.transfer else 0
            if measured:
                report["trials"] += measured
                report["transplanted"] += 1
                report["tuned"] += 1
                if progress:
                    progress("tuning", report["tuned"], rounds_total)
            elif options.transfer and any(session.related(unique[k], unique[c]) for c in cold):
                waiting.append(k)
            else:
                cold.append(k)
        if extra and not report["skipped_for_time"]:
            share = time_shares({k: self.best_seconds(unique[k]) for k in todo}, calls)
            rounds = allocate_rounds(share, extra, cap=max(1, 4 * options.trials // ROUND - 1))
            report["extra_rounds"] = {k: r for k, r in rounds.items() if r}
            done = len(todo)
            for r in sorted(set(rounds.values()) - {0}, reverse=True):
                group = sorted((k for k in rounds if rounds[k] == r), key=lambda k: -share[k])
                for at in range(0, len(group), CHUNK):
                    if out_of_time():
                        break
                    chunk = group[at:at + CHUNK]
                    report["trials"] += session.run([unique[k] for k in chunk], r * ROUND)
                    done += r * len(chunk)
                    if progress:
                        progress("tuning", done, rounds_total)
        report["seconds"] = time.perf_counter() - start
        return report

    def best_seconds(self, task: Any) -> float | None:
        """Mean run time of the best measured schedule of `task`'s workload."""
        top = self.db.get_top_k(self.db.commit_workload(task.dispatched[0]), 1)
        if not top or not top[0].run_secs:
            return None
        secs = [float(s) for s in top[0].run_secs]
        return sum(secs) / len(secs)

    def compile(self, prepared: Any, target: Any) -> Any:
        """Build a prepared module with the database's best schedules applied."""
        tvm = require_tvm()
        from tvm import relax

        with target, self.db, tvm.transform.PassContext(opt_level=3), native_warnings_dropped():
            mod = tvm.transform.Sequential([relax.transform.MetaScheduleApplyDatabase(),
                                            relax.transform.SplitLayoutRewritePreproc(),  # weight repacking...
                                            relax.transform.FoldConstant()])(prepared)  # ...done once, here
            return tvm.compile(mod, target=target)


@dataclass
class _Session:
    """What every MetaSchedule call of one tuning run shares."""

    database: TuningDatabase
    options: TuneOptions
    builder: Any
    runner: Any
    cost_model: Any  # one model for the whole run: it learns across workloads
    families: dict[str, dict[str, tuple[list[int], Any]]] = field(default_factory=dict)  # tuned, by family
    _known: dict[str, tuple[str, list[int]]] = field(default_factory=dict)  # structural key -> family, dims

    def family_of(self, mod: Any) -> tuple[str, str, list[int]]:
        """(structural key, family, dims) of a workload; printing its TIR is done once per workload."""
        key = _structural_key(mod)
        if key not in self._known:
            self._known[key] = _family(mod)
        return (key, *self._known[key])

    def index_database(self) -> None:
        """Group the workloads the database holds by family (their TIR with extents erased)."""
        for record in self.database.db.get_all_tuning_records():
            self._add(record.workload.mod)

    def _add(self, mod: Any) -> None:
        key, family, dims = self.family_of(mod)
        self.families.setdefault(family, {})[key] = (dims, mod)

    def related(self, a: Any, b: Any) -> bool:
        return self.family_of(a.dispatched[0])[1] == self.family_of(b.dispatched[0])[1]

    def transplant(self, task: Any) -> int:
        """Measure the best schedules of `task`'s two nearest tuned relatives, their tile sizes
        fitted to its extents (transfer-tuning), and record them; returns the number measured
        (0: no relative, or none of their schedules applies)."""
        from tvm.s_tir import Schedule
        from tvm.s_tir import meta_schedule as ms

        mod = task.dispatched[0]
        key, family, dims = self.family_of(mod)
        relatives = [(d, m) for k, (d, m) in self.families.get(family, {}).items() if k != key and len(d) == len(dims)]
        relatives.sort(key=lambda r: sum(abs(math.log1p(a) - math.log1p(b)) for a, b in zip(r[0], dims)))
        db = self.database.db
        traces = [rec.trace for _, rel in relatives[:2]
                  for rec in db.get_top_k(db.commit_workload(rel), TRANSPLANT_TOP)]
        if not traces:
            return 0
        with native_output_to(self.database.path / "logs" / "console.log"):
            context = ms.TuneContext(mod=mod, target=task.target, space_generator="post-order-apply",
                                     task_name=task.task_name, num_threads=1)
        schedules = []
        for trace in traces:
            sch = Schedule(mod)
            try:
                trace.apply_to_schedule(sch, remove_postproc=True, decision_provider=_fit_tiles(sch))
                sch.enter_postproc()
                if all(p.apply(sch) for p in context.space_generator.postprocs):
                    schedules.append(sch)
            except Exception:  # noqa: BLE001 - a schedule that does not fit is simply not used
                continue
        if not schedules:
            return 0
        built = self.builder.build([ms.builder.BuilderInput(sch.mod, task.target) for sch in schedules])
        runs = [(sch, ms.arg_info.ArgInfo.from_entry_func(sch.mod, remove_preproc=True), b)
                for sch, b in zip(schedules, built) if b.error_msg is None]
        futures = self.runner.run([ms.runner.RunnerInput(b.artifact_path, "cpu", args) for _, args, b in runs])
        workload = db.commit_workload(mod)
        measured = 0
        for (sch, args, _), future in zip(runs, futures):
            result = future.result()
            if result.error_msg is None and result.run_secs:
                db.commit_tuning_record(ms.database.TuningRecord(sch.trace, workload, list(result.run_secs),
                                                                 task.target, args))
                measured += 1
        if measured:
            self._add(mod)
        return measured

    def run(self, tasks: list[Any], trials: int) -> int:
        """Measure `trials` more schedules for each of `tasks` (MetaSchedule keeps going from the
        best the database holds); returns the number measured."""
        from tvm.s_tir import meta_schedule as ms

        work_dir = os.fspath(self.database.path)
        before = sum(_count(self.database, t) for t in tasks)
        # MetaSchedule logs its task tables to the terminal (from Python and C++); they belong
        # in the database's logs/ folder only.
        with native_output_to(self.database.path / "logs" / "console.log"):
            contexts, task_weights = ms.relax_integration.extracted_tasks_to_tune_contexts(
                tasks, work_dir, strategy=_strategy(self.options.strategy), num_threads=os.cpu_count() or 1,
                seed=self.options.seed)
            ms.tune_tasks(tasks=contexts, task_weights=task_weights, work_dir=work_dir,
                          max_trials_global=trials * len(tasks), max_trials_per_task=trials,
                          num_trials_per_iter=min(trials, ROUND), database=self.database.db,
                          builder=self.builder, runner=self.runner, cost_model=self.cost_model)
        for t in tasks:
            self._add(t.dispatched[0])
        return sum(_count(self.database, t) for t in tasks) - before


def time_shares(best: dict[str, float | None], calls: list[dict[str, float]]) -> dict[str, float]:
    """Workload -> its share of each subnet's time (best seconds x calls over the subnet's total),
    summed over subnets; each subnet counts once, whatever its size. A workload of `best` with no
    measured schedule (None: every candidate failed to build or run) takes no time."""
    seconds = {k: v or 0.0 for k, v in best.items()}
    share = {k: 0.0 for k in best}
    for c in calls:
        spent = {k: seconds.get(k, 0.0) * n for k, n in c.items()}
        whole = sum(spent.values())
        for k in best:
            if k in c and whole > 0:
                share[k] += spent[k] / whole
    return share


def allocate_rounds(share: dict[str, float], rounds: int, cap: int) -> dict[str, int]:
    """Split `rounds` among keys in proportion to `share` (highest averages, so the k-th round
    of a key is worth share/k), at most `cap` each; keys with no share get none."""
    given = {k: 0 for k in share}
    for _ in range(rounds):
        open_keys = [k for k in share if share[k] > 0 and given[k] < cap]
        if not open_keys:
            break
        k = max(open_keys, key=lambda k: share[k] / (given[k] + 1))
        given[k] += 1
    return given


def _structural_key(mod: Any) -> str:
    import tvm_ffi

    return f"{tvm_ffi.structural_hash(mod):016x}"


def _family(mod: Any) -> tuple[str, list[int]]:
    """A workload's family (its TIR with every number erased) and its numbers (extents mostly)."""
    text = mod["main"].script()
    return re.sub(r"\d+", "#", text), [int(n) for n in re.findall(r"T\.int64\((\d+)\)", text)]


def _fit_tiles(sch: Any) -> Callable:
    """A decision provider that fits a relative's tile sizes to this workload's loop extents:
    inner factors are kept where they divide what is left (else the largest divisor below them),
    and the outermost takes the rest."""

    def provide(inst: Any, inputs: list, attrs: list, decision: Any) -> Any:
        if inst.kind.name != "SamplePerfectTile":
            return decision
        rest = int(sch.get(inputs[0]).extent)
        old = [int(f) for f in decision]
        new = [1] * len(old)
        for i in range(len(old) - 1, 0, -1):
            new[i] = max(f for f in range(1, min(old[i], rest) + 1) if rest % f == 0)
            rest //= new[i]
        new[0] = rest
        return new

    return provide


def _count(database: TuningDatabase, task: Any) -> int:
    mod = task.dispatched[0]
    return len(database.db.get_top_k(database.db.commit_workload(mod), 1 << 20))


def require_strategy(strategy: str) -> None:
    """Raise `BackendUnavailable` (with the install hint) when `strategy` needs xgboost and it is missing."""
    if strategy == "evolutionary":
        try:
            import xgboost  # noqa: F401
        except ImportError:
            raise BackendUnavailable("TVM tuning strategy 'evolutionary' needs xgboost: pip install 'nestnas[tvm]' "
                                     "(or choose the 'replay-trace' strategy)") from None


def _strategy(name: str) -> Any:
    from tvm.s_tir import meta_schedule as ms

    if name == "evolutionary":
        return ms.search_strategy.EvolutionarySearch(population_size=POPULATION, init_min_unmeasured=POPULATION // 4,
                                                     genetic_num_iters=3)
    return name


def _cost_model(strategy: str) -> Any:
    from tvm.s_tir import meta_schedule as ms

    if strategy != "evolutionary":
        return ms.cost_model.RandomModel()
    # One xgboost thread: its OpenMP workers would otherwise spin on the cores the runner measures on.
    return ms.cost_model.XGBModel(config=ms.cost_model.xgb_model.XGBConfig(nthread=1), num_tuning_cores=1)


def _in_process_builder() -> Any:
    """A MetaSchedule builder that compiles candidates in this process.

    MetaSchedule's LocalBuilder starts fresh worker processes for every batch of candidates, and
    each worker imports TVM first: about 13 s per batch on two cores against 0.05-0.3 s for the
    build itself. Candidates are TIR functions produced by MetaSchedule's own verified schedule
    rules, so building them here trades crash isolation for a 10-50x faster tuning loop; running
    them stays in the runner's worker process."""
    import tvm
    from tvm.ir.utils import derived_object
    from tvm.s_tir.meta_schedule.builder import BuilderResult, PyBuilder
    from tvm.s_tir.meta_schedule.builder.local_builder import default_build, default_export

    @derived_object
    class InProcessBuilder(PyBuilder):
        def build(self, build_inputs):
            results = []
            for item in build_inputs:
                try:
                    with warnings.catch_warnings():  # default_build calls TVM's deprecated build()
                        warnings.simplefilter("ignore", DeprecationWarning)
                        built = default_build(item.mod, item.target, None)
                    results.append(BuilderResult(default_export(built), None))
                except (tvm.error.TVMError, RuntimeError, ValueError) as exc:
                    results.append(BuilderResult(None, f"in-process build failed: {exc}"))
            return results

    return InProcessBuilder()



def _cost(task: Any, weight: float) -> float:
    from tvm.s_tir.analysis import estimate_tir_flops

    try:
        return float(estimate_tir_flops(task.dispatched[0])) * weight
    except Exception:  # noqa: BLE001 - an estimate only orders the work
        return 0.0
