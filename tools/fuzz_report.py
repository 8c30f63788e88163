"""Run the CLI fuzz suite (tests/test_fuzz.py) and print how many distinct bad inputs it tried and
how many ended in a traceback, with every contract failure it found (command, input, last line of
the traceback, and the innermost nestnas frame).

    python tools/fuzz_report.py [--examples N] [--json]

Every failure is collected (NESTNAS_FUZZ_COLLECT=1) instead of stopping at the first one; N
examples per test (default: the suite's own few).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--examples", type=int, default=0, help="examples per test (0: the suite's defaults)")
    parser.add_argument("--json", action="store_true", help="print the whole report as JSON")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        report = Path(tmp) / "fuzz.json"
        env = {**os.environ, "NESTNAS_FUZZ_COLLECT": "1", "NESTNAS_FUZZ_REPORT": str(report)}
        if args.examples:
            env["NESTNAS_FUZZ_EXAMPLES"] = str(args.examples)
        proc = subprocess.run([sys.executable, "-m", "pytest", str(REPO / "tests" / "test_fuzz.py"), "-q",
                               "-p", "no:cacheprovider"], cwd=REPO, env=env, capture_output=True, text=True)
        if not report.exists():
            print(proc.stdout[-3000:] + proc.stderr[-3000:], file=sys.stderr)
            return 2
        summary = json.loads(report.read_text())
    if args.json:
        print(json.dumps(summary, indent=2))
    else:
        for f in summary["findings"]:
            print(f"- nestnas {' '.join(f['argv'])}\n  input: {f['input']}\n  {'; '.join(f['problems'])}"
                  + (f"\n  at {f['at']}" if f["at"] else ""))
        print(f"{summary['distinct_bad_inputs']} distinct bad inputs ({summary['exited_0']} harmless), "
              f"{summary['tracebacks']} tracebacks, {summary['contract_failures']} contract failures "
              f"({summary['distinct_failures']} distinct)")
    return 0 if proc.returncode == 0 and not summary["findings"] else 1


if __name__ == "__main__":
    sys.exit(main())
