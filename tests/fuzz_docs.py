"""Helpers of the fuzz suite (tests/test_fuzz.py): structured mutations of nestnas documents, an
in-process CLI runner that checks the user-error contract, and a ledger of what was tried.

The contract checked on every run: the command returns 0 or 1 (never raises), a run that fails
prints exactly one line on stderr starting ``error: ``, nothing prints a traceback, and a failed run
changes no file in its working folder (a successful one writes only the outputs it was asked for).
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import math
import os
import shutil
import signal
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Sequence

from hypothesis import strategies as st

# --- the ledger ----------------------------------------------------------------------------

# NESTNAS_FUZZ_COLLECT=1 records contract failures instead of failing the test at the first one,
# so that one run lists them all (see tools/fuzz_report.py).
REPO = Path(__file__).resolve().parents[1]
COLLECT = os.environ.get("NESTNAS_FUZZ_COLLECT") == "1"
TIMEOUT_S = int(os.environ.get("NESTNAS_FUZZ_TIMEOUT", "60"))


@dataclass
class Ledger:
    inputs: set = field(default_factory=set)  # distinct (test, input digest)
    harmless: set = field(default_factory=set)  # of those, the ones that exited 0
    failed: set = field(default_factory=set)  # of those, the ones that broke the contract
    raised: set = field(default_factory=set)  # of those, the ones that ended in a traceback
    findings: list = field(default_factory=list)  # one per distinct failure: test, argv, input, problems

    def summary(self) -> dict[str, Any]:
        return {"distinct_bad_inputs": len(self.inputs), "exited_0": len(self.harmless),
                "tracebacks": len(self.raised), "contract_failures": len(self.failed),
                "distinct_failures": len(self.findings), "findings": self.findings}

    def line(self) -> str:
        s = self.summary()
        return (f"fuzz: {s['distinct_bad_inputs']} distinct bad inputs ({s['exited_0']} harmless, exit 0), "
                f"{s['tracebacks']} tracebacks, {s['contract_failures']} contract failures "
                f"({s['distinct_failures']} distinct)")


LEDGER = Ledger()


def digest(*parts: bytes | str) -> str:
    h = hashlib.sha256()
    for p in parts:
        h.update(p if isinstance(p, bytes) else p.encode())
        h.update(b"\0")
    return h.hexdigest()[:16]


# --- document mutations ----------------------------------------------------------------------

DEEP = 100_000  # deeper than any JSON reader's recursion limit
_DEEP_TOKEN = "\x00nestnas-fuzz-deep\x00"
HUGE_DIGITS = 5000  # beyond Python's 4300-digit limit on int <-> str conversion
_HUGE_TOKEN = "\x00nestnas-fuzz-huge\x00"

# Values of every other type and the edges of numbers. Floats beyond JSON (NaN, Infinity) are
# written as Python's json module writes them.
BAD_VALUES: list[Any] = [
    "x", "", "0", [], {}, None, True, False, 0, -1, 1, 10**12, 10**400, -(10**30), 0.5, -1e308,
    math.nan, math.inf, -math.inf, [None], [[1, 2], [3]], {"a": 1}, {"": None}, ["x"] * 3, "\u2028\udcff",
]


def json_paths(doc: Any, prefix: tuple = (), depth: int = 8) -> list[tuple]:
    """Every path from the root to a node (the root itself excluded), up to `depth` levels."""
    paths = []
    if depth == 0:
        return paths
    items = doc.items() if isinstance(doc, dict) else enumerate(doc) if isinstance(doc, list) else ()
    for k, v in items:
        p = (*prefix, k)
        paths.append(p)
        paths.extend(json_paths(v, p, depth - 1))
    return paths


def _get(doc, path):
    for k in path:
        doc = doc[k]
    return doc


def _dumps(doc: Any) -> bytes:
    text = json.dumps(doc, indent=1, ensure_ascii=False)
    text = text.replace(json.dumps(_DEEP_TOKEN), "[" * DEEP + "]" * DEEP)
    text = text.replace(json.dumps(_HUGE_TOKEN), "9" * HUGE_DIGITS)
    return text.encode("utf-8", "surrogatepass")


@dataclass(frozen=True)
class Mutation:
    what: str  # human-readable: 'delete measurements.3f2a.stable', 'truncate at 812', ...
    data: bytes


@st.composite
def mutations(draw, raw: bytes) -> Mutation:
    """A structured mutation of the JSON document `raw`: a key deleted or misspelt, a value of
    another type (or NaN, negative, huge), a value nested deeper than any reader recurses, the file truncated,
    non-UTF-8 bytes, another top-level type, or an empty file."""
    doc = json.loads(raw)
    paths = json_paths(doc)
    by_depth: dict[int, list[tuple]] = {}
    for p in paths:
        by_depth.setdefault(len(p), []).append(p)
    op = draw(st.sampled_from(["delete", "retype", "retype", "retype", "deep", "rename", "truncate", "bytes",
                               "top", "empty"]))
    if op in ("delete", "retype", "deep", "rename") and paths:
        depth = draw(st.sampled_from(sorted(by_depth)))  # top-level keys as likely as deep leaves
        path = draw(st.sampled_from(by_depth[depth]))
        doc = json.loads(raw)
        parent, key = _get(doc, path[:-1]), path[-1]
        name = ".".join(map(str, path))
        if op == "delete":
            del parent[key]
            return Mutation(f"delete {name}", _dumps(doc))
        if op == "rename" and isinstance(parent, dict):  # a misspelt key: the field missing, an unknown one
            parent[key + "_"] = parent.pop(key)
            return Mutation(f"rename {name} to {key}_", _dumps(doc))
        value = _DEEP_TOKEN if op == "deep" else draw(st.sampled_from([*BAD_VALUES, _HUGE_TOKEN]))
        parent[key] = value
        shown = {_DEEP_TOKEN: f"[...{DEEP} deep]", _HUGE_TOKEN: f"a {HUGE_DIGITS}-digit number"}.get(
            value, repr(value)[:40]) if isinstance(value, str) else repr(value)[:40]
        return Mutation(f"set {name} = {shown}", _dumps(doc))
    if op == "truncate":
        at = draw(st.integers(0, max(len(raw) - 1, 0)))
        return Mutation(f"truncate at byte {at} of {len(raw)}", raw[:at])
    if op == "bytes":
        at = draw(st.integers(0, len(raw)))
        junk = draw(st.sampled_from([b"\xff", b"\xfe\xff", b"\xc3", b"\x80\x80", b"\xed\xa0\x80", b"\x00"]))
        return Mutation(f"insert {junk!r} at byte {at}", raw[:at] + junk + raw[at:])
    if op == "top":
        value = draw(st.sampled_from([[], [doc], "x", 1, None, True, 1.5]))
        return Mutation(f"top level {type(value).__name__}", _dumps(value))
    return Mutation("empty file", b"")


# --- running the CLI -------------------------------------------------------------------------


class FuzzTimeout(BaseException):
    """Raised by the alarm in a run that takes too long (a BaseException, so no `except Exception`
    in the code under test can swallow it)."""


def snapshot(folder: Path) -> dict[str, str]:
    """relative path -> sha256 of every file under `folder` (links and folders by their kind)."""
    seen = {}
    for root, dirs, files in os.walk(folder):
        for name in dirs + files:
            p = Path(root) / name
            rel = str(p.relative_to(folder))
            if p.is_symlink():
                seen[rel] = "link:" + os.readlink(p)
            elif p.is_dir():
                seen[rel] = "dir"
            elif not p.is_file():  # a pipe or device: reading it could block or never end
                seen[rel] = "special"
            else:
                seen[rel] = hashlib.sha256(p.read_bytes()).hexdigest()
    return seen


@dataclass
class Outcome:
    argv: list[str]
    rc: int | None
    stdout: str
    stderr: str
    traceback: str | None
    problems: list[str]


def run_cli(argv: Sequence[Any], folder: Path, outputs: Iterable[str | Path] = (), timeout: int = TIMEOUT_S) -> Outcome:
    """Run `nestnas argv` in this process with `folder` as the working folder and check the
    contract. `outputs` are the paths a successful run may create or change."""
    from nestnas.cli import main

    argv = [str(a) for a in argv]
    folder = Path(folder)
    allowed = {os.path.normpath(os.path.join(folder, o)) for o in outputs}
    before = snapshot(folder)
    # encoded as a UTF-8 terminal's are: stdout strict, stderr backslash-escaping (as Python sets them)
    out = io.TextIOWrapper(io.BytesIO(), encoding="utf-8", errors="strict", write_through=True)
    err = io.TextIOWrapper(io.BytesIO(), encoding="utf-8", errors="backslashreplace", write_through=True)
    rc, tb = None, None
    cwd = os.getcwd()

    def alarm(*_):
        raise FuzzTimeout(f"ran for more than {timeout} s")

    old = signal.signal(signal.SIGALRM, alarm)
    signal.alarm(timeout)
    try:
        os.chdir(folder)
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            rc = main(argv)
    except (Exception, FuzzTimeout, SystemExit) as exc:  # noqa: BLE001 - anything escaping main is a traceback
        tb = "".join(traceback.format_exception(exc))
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)
        os.chdir(cwd)
        _reset_consoles()
    problems = []
    stdout, stderr = (f.buffer.getvalue().decode("utf-8", "replace") for f in (out, err))
    if tb is not None:
        problems.append("raised: " + tb.strip().splitlines()[-1])
    elif "Traceback (most recent call last)" in stderr:
        problems.append("printed a traceback")
    if tb is None and rc not in (0, 1):
        problems.append(f"exit code {rc!r}")
    if rc == 1:
        lines = stderr.strip().splitlines()
        if len(lines) != 1 or not lines[0].startswith("error: "):
            problems.append(f"stderr is not one 'error: ' line: {stderr.strip()[:300]!r}")
    after = snapshot(folder)
    changed = sorted(k for k in set(before) | set(after) if before.get(k) != after.get(k))
    if rc == 0:
        changed = [k for k in changed if not _under(os.path.normpath(os.path.join(folder, k)), allowed)]
    if changed:
        problems.append(f"{'changed' if rc == 0 else 'failed run changed'} {changed[:5]}")
    if rc == 0 and "--json" in argv and "--help" not in argv:
        try:
            json.loads(stdout)
        except ValueError:
            problems.append(f"--json printed no JSON: {stdout[:200]!r}")
    return Outcome(argv, rc, stdout, stderr, tb, problems)


def _reset_consoles() -> None:
    """Drop what a failed print left in the CLI's Rich consoles (a process would exit with it;
    in this one it would be flushed into the next run's output)."""
    from nestnas import cli

    for console in (cli.console, cli.err_console):
        console._buffer.clear()
        console._buffer_index = 0


def _under(path: str, allowed: set[str]) -> bool:
    return any(path == a or path.startswith(a + os.sep) for a in allowed)


def record(test: str, identity: str, outcome: Outcome, shown_input: str, folder: Path | None = None) -> None:
    """Count the input; on a contract failure, fail the test (or collect it with
    NESTNAS_FUZZ_COLLECT=1)."""
    LEDGER.inputs.add((test, identity))
    if outcome.rc == 0 and not outcome.problems:
        LEDGER.harmless.add((test, identity))
    if not outcome.problems:
        return
    LEDGER.failed.add((test, identity))
    if outcome.traceback:
        LEDGER.raised.add((test, identity))
    argv = [a.replace(str(folder), ".") if folder else a for a in outcome.argv]
    last = outcome.traceback.strip().splitlines()[-1] if outcome.traceback else None
    where = _culprit(outcome.traceback) if outcome.traceback else None
    finding = {"test": test, "argv": argv, "input": shown_input, "problems": outcome.problems,
               "traceback": last, "at": where}
    if COLLECT:
        key = (test, last or outcome.problems[0][:60], where)
        if not any((f["test"], f["traceback"] or f["problems"][0][:60], f["at"]) == key for f in LEDGER.findings):
            LEDGER.findings.append(finding)
        return
    raise AssertionError(f"nestnas {' '.join(argv)} with {shown_input}: {outcome.problems}\n"
                         f"{outcome.traceback or outcome.stderr}")


def _culprit(tb: str) -> str:
    """The innermost frame of nestnas's own code in a traceback."""
    frames = [line.strip() for line in tb.splitlines() if line.strip().startswith("File ")]
    ours = [f for f in frames if str(REPO) in f and "/tests/" not in f]
    return (ours or frames or ["?"])[-1]


@contextlib.contextmanager
def environ(**values: str | None):
    """Set (or, with None, unset) environment variables for the commands run inside."""
    old = {k: os.environ.get(k) for k in values}
    try:
        for k, v in values.items():
            os.environ.pop(k, None) if v is None else os.environ.__setitem__(k, v)
        yield
    finally:
        for k, v in old.items():
            os.environ.pop(k, None) if v is None else os.environ.__setitem__(k, v)


def write_report(path: str | os.PathLike) -> None:
    Path(path).write_text(json.dumps(LEDGER.summary(), indent=2, default=str) + "\n")


def fresh_copy(src: Path, dst: Path) -> Path:
    if src.is_dir():
        shutil.copytree(src, dst)
    else:
        shutil.copy2(src, dst)
    return dst
