"""The Python side of benchmarks/gpu_run.sh: the dry run's checks, the GPU-test runner and the
short summary printed last.

    python -m benchmarks.gpu_run check SPEC...        one check per argument (below); exit 1 on any error
    python -m benchmarks.gpu_run tests --res DIR --call N --budget-s S [--jobs J] [--rest] [PATH...]
    python -m benchmarks.gpu_run summary --res DIR

`tests` runs the `gpu`-marked tests under PATH (default tests/) in J pytest processes at once until
S seconds have passed. They are collected once, ordered most telling first (PRIORITY) and dealt
round-robin to the processes, so that whatever the budget cuts is the tail of the order. This module is also
the pytest plugin of those processes (-p benchmarks.gpu_run): each runs the tests named in its
file, and appends each test's outcome to another as it finishes, so that a process stopped at the
deadline loses nothing that ran.
Every collected test with no outcome is then named as not run, in DIR/gpu_tests.txt and on
stdout. --rest runs only what the earlier calls of the same run (the same DIR) did not report.

`summary` reads DIR (run_id, results.csv, gpu_tests.txt) and prints the GPU tests' counts, the op
medians and the step table of benchmarks/report.py for the run.

Check specs (the words of one argument):
  file PATH...              the files exist              module NAME...   the modules import
  command NAME...           on PATH                      int NAME VALUE   a whole number >= 0
  steps CASES PROVIDERS     benchmarks/steps.py selects something on CUDA from these names
  profile CASE PROVIDERS    benchmarks/profile_step.py takes them for a CUDA run
  attention CASES           benchmarks/test_bench_attention.py knows the case names
  ops NAMES                 benchmarks/test_bench_<name>.py exists for each
  tests PATH...             the paths and the PRIORITY files exist
  stages WANTED KNOWN       every wanted stage (comma-separated) is a known one
  unset NAME...             the variables are not set (the script sets them per stage)
  knobs                     every MAE_FAST_* variable set here is one the sources read
"""
from __future__ import annotations

import argparse
import importlib
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PLUGIN = "benchmarks.gpu_run"
LOG_VAR = "MAE_FAST_GPU_TESTS_LOG"  # where the plugin appends "nodeid, outcome, seconds, message" lines
SELECT_VAR = "MAE_FAST_GPU_TESTS_SELECT"  # a file of node ids: the plugin runs those alone, in that order
# the most telling first: the compiled kernels are the ones used, the ops at ViT shapes, model
# parity and no host sync; the slow sweeps last
PRIORITY = ["tests/ops/test_extension.py", "tests/ops/test_add_layer_norm.py", "tests/ops/test_attention.py",
            "tests/models/test_models.py", "tests/ops/test_patchify.py", "tests/ops/test_masked_mse_loss.py",
            "tests/test_package.py", "tests/train/test_faults.py", "tests/ops/test_tokens.py",
            "tests/ops/test_fuzz.py"]
RANK = {"passed": 0, "xfailed": 0, "skipped": 1, "xpassed": 2, "failed": 3, "error": 4}
GRACE_S = 10  # after the deadline's SIGINT, for pytest to stop the test in flight and write its summary


# ----------------------------------------------------------------------------- pytest plugin

def _log(nodeid: str, outcome: str, seconds: float = 0.0, message: str = "") -> None:
    path = os.environ.get(LOG_VAR)
    if not path:
        return
    message = " ".join(str(message).split())[:300]
    with open(path, "a") as f:
        f.write(f"{nodeid}\t{outcome}\t{seconds:.2f}\t{message}\n")


def _message(report) -> str:
    crash = getattr(report.longrepr, "reprcrash", None)
    if crash is not None:
        return crash.message
    if isinstance(report.longrepr, tuple):  # a skip: (file, line, reason)
        return report.longrepr[-1]
    lines = str(report.longrepr or "").strip().splitlines()
    return lines[-1] if lines else ""


def pytest_collectreport(report):
    if report.failed:
        _log(report.nodeid, "collect-error", 0.0, _message(report))


def pytest_collection_modifyitems(config, items):
    """Keeps the tests named in the SELECT_VAR file, in its order (node ids compared as collected:
    a parametrized id that the command line would not parse still selects its test)."""
    path = os.environ.get(SELECT_VAR)
    if not path:
        return
    order = {n: i for i, n in enumerate(Path(path).read_text().splitlines())}
    dropped = [item for item in items if item.nodeid not in order]
    items[:] = sorted((item for item in items if item.nodeid in order), key=lambda item: order[item.nodeid])
    if dropped:
        config.hook.pytest_deselected(items=dropped)


def pytest_collection_finish(session):
    if session.config.option.collectonly:
        for item in session.items:
            _log(item.nodeid, "collected")


def pytest_runtest_logreport(report):
    if report.when != "call" and report.passed:
        return
    outcome = report.outcome
    if hasattr(report, "wasxfail"):
        outcome = "xfailed" if report.skipped else "xpassed"
    elif report.when != "call" and report.failed:
        outcome = "error"
    _log(report.nodeid, outcome, report.duration, _message(report) if not report.passed else "")


# ----------------------------------------------------------------------------- outcomes

def read_log(path: Path) -> list[tuple[str, str, float, str]]:
    rows = []
    if path.is_file():
        for line in path.read_text().splitlines():
            parts = line.split("\t")
            if len(parts) == 4:
                rows.append((parts[0], parts[1], float(parts[2] or 0), parts[3]))
    return rows


def outcomes(files) -> dict[str, tuple[str, float, str]]:
    """{nodeid: (outcome, seconds, message)}, the worst outcome of a test's phases."""
    out: dict[str, tuple[str, float, str]] = {}
    for path in files:
        for nodeid, outcome, sec, msg in read_log(path):
            old = out.get(nodeid)
            if old is None or RANK.get(outcome, 0) >= RANK.get(old[0], 0):
                out[nodeid] = (outcome, sec + (old[1] if old else 0.0), msg or (old[2] if old else ""))
    return out


def priority(nodeid: str) -> int:
    path = nodeid.split("::", 1)[0]
    return PRIORITY.index(path) if path in PRIORITY else len(PRIORITY)


def deal(nodeids: list[str], jobs: int) -> list[list[str]]:
    """The tests in priority order (stable), dealt round-robin to at most `jobs` groups."""
    ordered = sorted(nodeids, key=priority)
    n = max(1, min(jobs, len(ordered)))
    return [ordered[i::n] for i in range(n)] if ordered else []


# ----------------------------------------------------------------------------- the runner

def _stop(procs, already_signalled: bool) -> None:
    if not already_signalled:
        for p in procs:
            if p.poll() is None:
                p.send_signal(signal.SIGINT)
    end = time.monotonic() + GRACE_S
    while any(p.poll() is None for p in procs) and time.monotonic() < end:
        time.sleep(0.2)
    for p in procs:
        if p.poll() is None:
            p.kill()
            p.wait()


def _timeout_args(per_test_s: int) -> list[str]:
    if per_test_s <= 0:
        return []
    try:
        importlib.import_module("pytest_timeout")
    except ImportError:
        return []
    return [f"--timeout={per_test_s}"]


def run_tests(res: Path, call: int, budget_s: float, jobs: int, rest: bool, paths: list[str],
              per_test_s: int = 120, python: str = sys.executable) -> int:
    t0 = time.monotonic()
    end = t0 + budget_s
    d = res / "gpu_tests"
    d.mkdir(parents=True, exist_ok=True)
    for f in [*d.glob("call*.tsv"), *d.glob("call*.select")]:  # a new run; with --rest, this call's earlier tries
        if not rest or f.name.startswith(f"call{call}-"):
            f.unlink()
    earlier = sorted(d.glob("call*-job*.tsv"))
    logs = res / "logs"
    logs.mkdir(parents=True, exist_ok=True)

    collect_log = d / f"call{call}-collect.tsv"
    env = {**os.environ, LOG_VAR: str(collect_log)}
    cmd = [python, "-m", "pytest", "--collect-only", "-q", "-m", "gpu", "-p", "no:cacheprovider", "-p", PLUGIN,
           *paths]
    print(f"[gpu-tests] collecting: {' '.join(cmd[1:])}", flush=True)
    try:
        with open(logs / f"call{call}-gpu-tests-collect.log", "w") as f:
            subprocess.run(cmd, env=env, stdout=f, stderr=subprocess.STDOUT,
                           timeout=max(20.0, min(120.0, 0.6 * budget_s)))
    except subprocess.TimeoutExpired:
        print("[gpu-tests] collection timed out", flush=True)
    except KeyboardInterrupt:
        print("[gpu-tests] interrupted while collecting", flush=True)
        return 1
    collected = read_log(collect_log)
    ids = [n for n, o, _, _ in collected if o == "collected"]
    if not ids and not any(o == "collect-error" for _, o, _, _ in collected):
        print(f"[gpu-tests] nothing collected (see {logs / f'call{call}-gpu-tests-collect.log'})", flush=True)
        return 1
    done = set(outcomes(earlier)) if rest else set()
    todo = [n for n in ids if n not in done]
    groups = deal(todo, jobs)
    left = end - time.monotonic()
    print(f"[gpu-tests] {len(ids)} collected, {len(done & set(ids))} reported by earlier calls, {len(todo)} to run "
          f"in {len(groups)} processes, {left:.0f} s left", flush=True)

    wrapper = ("import signal, sys, pytest; signal.signal(signal.SIGINT, signal.default_int_handler); "
               "sys.exit(pytest.main(sys.argv[1:]))")  # a background process may start with SIGINT ignored
    procs, interrupted = [], False
    for i, group in enumerate(groups):
        select = d / f"call{call}-job{i}.select"
        select.write_text("".join(f"{n}\n" for n in group))
        env = {**os.environ, LOG_VAR: str(d / f"call{call}-job{i}.tsv"), SELECT_VAR: str(select)}
        modules = list(dict.fromkeys(n.split("::", 1)[0] for n in group))
        args = ["-q", "-m", "gpu", "-p", "no:cacheprovider", "-p", PLUGIN, "-rfE", "--durations=5",
                *_timeout_args(per_test_s), *modules]
        with open(logs / f"call{call}-gpu-tests-job{i}.log", "w") as f:
            procs.append(subprocess.Popen([python, "-c", wrapper, *args], env=env, stdout=f, stderr=subprocess.STDOUT))
    try:
        while any(p.poll() is None for p in procs) and time.monotonic() < end:
            time.sleep(0.5)
    except KeyboardInterrupt:  # the stage's timeout: the whole process group has the SIGINT
        interrupted = True
    cut = any(p.poll() is None for p in procs)
    if cut:
        print(f"[gpu-tests] the budget ({budget_s:.0f} s) is spent: stopping the processes still running", flush=True)
    _stop(procs, interrupted)
    for i, p in enumerate(procs):
        print(f"[gpu-tests] process {i}: rc {p.returncode}, {len(groups[i])} tests, log "
              f"{logs / f'call{call}-gpu-tests-job{i}.log'}", flush=True)

    mine = outcomes(sorted(d.glob(f"call{call}-job*.tsv")))
    text, bad = render(ids, collected, outcomes(sorted(d.glob("call*-job*.tsv"))), mine, call, time.monotonic() - t0,
                       len(groups), "the time budget" if cut else "")
    (res / "gpu_tests.txt").write_text(text)
    print(text, flush=True)
    return 1 if bad else 0


def render(ids, collected, all_outcomes, mine, call, seconds, nproc, why_cut) -> tuple[str, bool]:
    """The report of the GPU tests of the run so far; (text, whether anything failed in this call)."""
    counts: dict[str, int] = {}
    for outcome, _, _ in all_outcomes.values():
        counts[outcome] = counts.get(outcome, 0) + 1
    errors = [(n, m) for n, o, _, m in collected if o == "collect-error"]
    not_run = [n for n in ids if n not in all_outcomes]
    head = (f"GPU tests (pytest -m gpu), run so far (call {call}: {len(mine)} run in {nproc} processes in "
            f"{seconds:.0f} s): {len(ids)} collected; "
            + ", ".join(f"{counts.get(k, 0)} {k}" for k in ("passed", "failed", "error", "skipped"))
            + "".join(f", {counts[k]} {k}" for k in ("xfailed", "xpassed") if counts.get(k))
            + f"; {len(errors)} collection errors; {len(not_run)} not run"
            + (f" ({why_cut})" if not_run and why_cut else ""))
    lines = [head]
    failing = [(n, o, m) for n, (o, _, m) in all_outcomes.items() if o in ("failed", "error", "xpassed")]
    if failing:
        lines += ["", "failed:"] + [f"  {o.upper():7s} {n}  -- {m}" for n, o, m in failing]
    if errors:
        lines += ["", "collection errors (their tests are not counted above):"] + [f"  {n}  -- {m}" for n, m in errors]
    slow = sorted(all_outcomes.items(), key=lambda kv: -kv[1][1])[:5]
    if slow:
        lines += ["", "slowest:"] + [f"  {s:7.1f} s  {n}" for n, (_, s, _) in slow]
    if not_run:
        lines += ["", "not run:"] + [f"  {n}" for n in not_run]
    bad = any(o in ("failed", "error", "xpassed") for o, _, _ in mine.values()) or bool(errors)
    return "\n".join(lines) + "\n", bad


# ----------------------------------------------------------------------------- checks

def _knobs_read() -> set[str]:
    """Every MAE_FAST_* name the sources mention (not the tests': they name wrong ones on purpose)."""
    names = set()
    for folder in ("mae_fast", "benchmarks", "kernels"):
        for path in (ROOT / folder).rglob("*"):
            if path.suffix in (".py", ".sh") and path.is_file():
                names.update(re.findall(r"MAE_FAST_[A-Z0-9_]+", path.read_text(errors="replace")))
    for path in (ROOT / "setup.py", ROOT / "Makefile"):
        if path.is_file():
            names.update(re.findall(r"MAE_FAST_[A-Z0-9_]+", path.read_text(errors="replace")))
    return names


def check_one(words: list[str]) -> list[str]:
    """Problems with one spec (empty: fine); prints what it checked."""
    kind, args = words[0], words[1:]
    if kind == "file":
        return [f"no file {a}" for a in args if not (ROOT / a).is_file()]
    if kind == "module":
        bad = []
        for a in args:
            try:
                importlib.import_module(a)
            except Exception as e:  # noqa: BLE001 -- any import failure is the finding
                bad.append(f"module {a} does not import: {type(e).__name__}: {e}")
        return bad
    if kind == "command":
        return [f"command {a} not found on PATH" for a in args if shutil.which(a) is None]
    if kind == "int":
        name, value = args
        return [] if re.fullmatch(r"\d+", value) else [f"{name}={value!r}: not a whole number of seconds / jobs"]
    if kind == "steps":
        from benchmarks import steps as S

        cases, providers = args
        try:
            pairs = S.selected(False, cuda=True, cases=cases, providers=providers)
        except ValueError as e:
            return [str(e)]
        if not pairs:
            return [f"cases {cases} x providers {providers} select nothing on CUDA"]
        print(f"  steps: {', '.join(f'{c.name}/{p}' for c, p in pairs)}")
        notes = [p for _, p in pairs if p == "vit_pytorch"]
        if notes:
            print("  note: vit_pytorch needs the vit-pytorch package: skipped with the reason where it is missing")
        named = [p for p in providers.split(",") if p]
        dropped = [p for p in named if p not in {p for _, p in pairs}]
        return [f"providers {dropped} run on none of the cases {cases}"] if dropped else []
    if kind == "profile":
        from benchmarks import profile_step

        case, providers = args
        try:
            case, order = profile_step.check_args(case, [p for p in providers.split(",") if p], cuda=True)
        except ValueError as e:
            return [f"profile: {e}"]
        print(f"  profile: {case.name}: {', '.join(order)}")
        return []
    if kind == "attention":
        saved = os.environ.pop("MAE_FAST_BENCH_ATTENTION_CASES", None)  # read at the suite's import
        try:
            from benchmarks import test_bench_attention as A
        finally:
            if saved is not None:
                os.environ["MAE_FAST_BENCH_ATTENTION_CASES"] = saved
        try:
            cases = A.selected_cases(args[0], cuda=True)
        except ValueError as e:
            return [str(e)]
        print(f"  attention: {', '.join(f'{k} {v}' for k, v in cases.items())}")
        return [] if cases else ["attention: no case selected"]
    if kind == "ops":
        return [f"op suite {op}: no file benchmarks/test_bench_{op}.py" for op in args[0].split(",")
                if op and not (ROOT / "benchmarks" / f"test_bench_{op}.py").is_file()]
    if kind == "tests":
        bad = [f"no test path {a}" for a in args if not (ROOT / a.split("::")[0]).exists()]
        return bad + [f"benchmarks/gpu_run.py PRIORITY: no file {p}" for p in PRIORITY if not (ROOT / p).is_file()]
    if kind == "stages":
        wanted, known = ([s for s in a.split(",") if s] for a in args)
        bad = [s for s in wanted if s not in known + ["all"]]
        return [f"MAE_FAST_GPU_STAGES: unknown {bad}; stages of this call: {known}"] if bad else []
    if kind == "unset":
        return [f"{a} is set ({os.environ[a]!r}); the script sets it per stage: use the stage knobs (--help)"
                for a in args if a in os.environ]
    if kind == "knobs":
        known = _knobs_read()
        bad = sorted(k for k in os.environ if k.startswith("MAE_FAST_") and k not in known)
        return [f"{k} is set, but nothing reads it (a typo?)" for k in bad]
    return [f"unknown check {kind!r}"]


def check(specs: list[str]) -> int:
    problems = []
    for spec in dict.fromkeys(specs):  # two stages may need the same
        words = spec.split()
        if words:
            problems += check_one(words)
    for p in dict.fromkeys(problems):
        print(f"ERROR: {p}")
    return 1 if problems else 0


# ----------------------------------------------------------------------------- summary

def summary(res: Path) -> int:
    run_id = (res / "run_id").read_text().strip() if (res / "run_id").is_file() else None
    lines = []
    tests = res / "gpu_tests.txt"
    if tests.is_file():
        text = tests.read_text().splitlines()
        lines.append(text[0])
        failed = [t for t in text if t.startswith("  FAILED") or t.startswith("  ERROR") or t.startswith("  XPASSED")]
        lines += [t[:160] for t in failed[:10]] + ([f"  ... {len(failed) - 10} more"] if len(failed) > 10 else [])
        if "\ncollection errors (" in tests.read_text():
            lines.append(f"  collection errors: see {tests}")
    else:
        lines.append("GPU tests: not run in this run")
    csv_path = res / "results.csv"
    if run_id and csv_path.is_file():
        from benchmarks import report

        runs = report.load_runs(csv_path).items()
        for run in [r for (dev, date), r in runs if date == run_id and not dev.startswith("CPU")]:
            ops = report.op_rows(run)
            if ops:
                lines += ["", "ops (median us; x: eager / impl):"]
                by_case: dict[str, dict[str, float]] = {}
                for case, p, m in ops:
                    if "median_s" in m:
                        by_case.setdefault(case, {})[p] = m["median_s"]
                for case, impls in by_case.items():
                    eager = impls.get("eager")
                    cells = [f"{p} {s * 1e6:.1f}" + (f" ({eager / s:.2f}x)" if eager and p != "eager" else "")
                             for p, s in impls.items()]
                    lines.append(f"  {case}: " + ", ".join(cells))
            if report.step_cases(run):
                lines += [""] + [x for x in report.summary(run).splitlines() if not x.endswith("not measured")]
    elif run_id is None:
        lines.append("no run id: nothing measured")
    print("\n".join(lines))
    return 0


# ----------------------------------------------------------------------------- CLI

def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    c = sub.add_parser("check")
    c.add_argument("specs", nargs="*")
    t = sub.add_parser("tests")
    t.add_argument("--res", type=Path, required=True)
    t.add_argument("--call", type=int, default=1)
    t.add_argument("--budget-s", type=float, required=True)
    t.add_argument("--jobs", type=int, default=8)
    t.add_argument("--per-test-s", type=int, default=120, help="pytest-timeout per test, where installed (0: none)")
    t.add_argument("--rest", action="store_true", help="only the tests the earlier calls of this run did not report")
    t.add_argument("paths", nargs="*", default=["tests"])
    s = sub.add_parser("summary")
    s.add_argument("--res", type=Path, required=True)
    args = ap.parse_args(argv)
    if args.cmd == "check":
        return check(args.specs)
    if args.cmd == "tests":
        return run_tests(args.res, args.call, args.budget_s, args.jobs, args.rest, args.paths or ["tests"],
                         args.per_test_s)
    return summary(args.res)


if __name__ == "__main__":
    sys.exit(main())
