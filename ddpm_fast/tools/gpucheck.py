"""``python -m ddpm_fast gpucheck --out DIR``: one call that takes a fresh GPU machine from the bare
working tree to correctness verdicts and figures (``benchmarks/gpu_check.sh`` runs this).

Steps, in order, each with its own time cap inside one overall budget (default 480 s):

* ``env``       the device, driver, torch/triton/CUDA versions, the tools found (nvcc, ncu,
                compute-sanitizer, ...), the runtime (gVisor or Firecracker) -> ``gpu_check.json``;
* ``wheels``    carried wheels (``.whl/`` or ``--wheels``) installed into a private folder put on
                ``PYTHONPATH`` (the GPU machine has no registry: diffusers travels this way);
* ``build``     the extension built in place with CUDA for this device (``TORCH_CUDA_ARCH_LIST``
                from its compute capability, ``MAX_JOBS`` from its cores), timed, then checked by
                importing it: ``backends()["native"]["available"]["cuda"]`` must be true;
* ``lane-cuda`` the GPU tests of ``tests/`` (every test whose name or skip reason mentions CUDA or
                a GPU: selected by this module as a pytest plugin) and, at the same time,
  ``lane-triton`` ``tests/triton`` compiled for the GPU (no interpreter);
* ``bench``     ``python -m ddpm_fast bench --device cuda`` over the issue targets, JSON and PNG;
* ``sampling``  ``sample()``'s per-step cost with and without the CUDA graph;
* ``memcheck``  ``compute-sanitizer --tool memcheck`` over a small parity subset (odd shapes, an
                out-of-range device ``t``), ``racecheck`` over the reductions (losses, thresholding);
* ``ncu``       Nsight Compute on the ``q_sample`` kernels (DRAM throughput, bytes moved).

Correctness steps (build, the two lanes, the sanitizers' findings) decide the exit status: 1 when one
failed, 0 otherwise; 2 for a usage error; 3 when no GPU was visible and ``--dry`` was not given (the
dry run then ran instead, so a machine that lost its GPU never looks like a pass); 130 when a signal
(SIGTERM) stopped the run (the children are killed and what is known is written). ``--dry`` checks
the plumbing on any machine: the arguments, the output layout, the tools, the bench's flags, the
GPU-test selection (collected, not run), and every step skipping with its reason.

The output folder holds at most eight files, flat (the device tool brings back 8 files, 2 folders
deep): ``summary.txt`` (the one-screen summary, also printed), ``gpu_check.json`` (everything),
``bench.json`` and ``bench.png`` (the bench's own), ``ncu.csv``, ``logs.tar.gz`` (every step's log,
re-packed after each step so a run killed at its limit still brings its logs back).
See docs/gpu.md.
"""
from __future__ import annotations

import argparse
import csv
import datetime as _dt
import glob
import hashlib
import io
import json
import os
import platform
import re
import shlex
import shutil
import signal
import subprocess
import sys
import tarfile
import tempfile
import time
from typing import Dict, List, Optional, Sequence, Tuple

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), os.pardir, os.pardir))  # ddpm_fast/tools/

STEPS = ("env", "wheels", "build", "lane-cuda", "lane-triton", "bench", "sampling", "memcheck", "racecheck", "ncu")
CORRECTNESS = ("build", "lane-cuda", "lane-triton", "memcheck", "racecheck")
# (cap, reserve) in seconds: a step runs at most ``cap``; ``reserve`` is kept back for it while the
# steps before it run (so a slow build cannot eat the lanes and the bench). The lanes run together.
BUDGET = {
    "env": (30, 0), "wheels": (40, 0), "build": (240, 0), "lane-cuda": (180, 60), "lane-triton": (180, 0),
    "bench": (120, 50), "sampling": (40, 15), "memcheck": (90, 0), "racecheck": (60, 0), "ncu": (45, 0),
}
MIN_USEFUL_S = 15
LOG_CAP = 4 * 2 ** 20        # bytes of one log kept in logs.tar.gz (head and tail beyond)
TOOLS = ("nvcc", "nvidia-smi", "compute-sanitizer", "ncu", "nsys", "cuobjdump", "nvdisasm", "cuda-gdb")
# The GPU lane: tests named for CUDA/GPU, or skipped with a reason that starts by saying they need one
# ("needs a CUDA device ...", "no CUDA device: ..."); not the CPU-machine checks that merely mention
# CUDA (nvcc compiles of the .cu files, the message printed where CUDA is missing).
GPU_NAME = re.compile(r"cuda|gpu", re.IGNORECASE)
GPU_NAME_EXCLUDE = re.compile(r"nvcc|without_cuda|cuda_sources|compiles", re.IGNORECASE)
GPU_REASON = re.compile(r"^\s*(needs|requires|no)\b[^:;()]*\b(cuda|gpu)", re.IGNORECASE)
LARGE_SHAPE = "64x4x256x256"      # 16.8M elements: the ">= 16M elements" targets
SMALL_SHAPE = "4x4x64x64"         # the step against diffusers' step
EXIT_OK, EXIT_FAIL, EXIT_USAGE, EXIT_NO_GPU, EXIT_INTERRUPTED = 0, 1, 2, 3, 130
OUT_FILES = ("summary.txt", "gpu_check.json", "bench.json", "bench.png", "ncu.csv", "logs.tar.gz")


# --------------------------------------------------------------------------------------------
# small helpers (no torch at import: this module is also a pytest plugin)
# --------------------------------------------------------------------------------------------
def _now() -> float:
    return time.monotonic()


def find_tool(name: str) -> Optional[str]:
    """The tool's path: PATH first, then the usual CUDA and Nsight folders."""
    found = shutil.which(name)
    if found:
        return found
    homes = [os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda"]
    cands = [os.path.join(h, "bin", name) for h in homes if h]
    cands += [os.path.join(h, "compute-sanitizer", name) for h in homes if h]
    cands += sorted(glob.glob(f"/usr/local/cuda*/bin/{name}"), reverse=True)
    cands += sorted(glob.glob(f"/opt/nvidia/nsight-compute/*/{name}"), reverse=True)
    cands += sorted(glob.glob(f"/opt/nvidia/nsight-systems/*/bin/{name}"), reverse=True)
    for c in cands:
        if os.path.isfile(c) and os.access(c, os.X_OK):
            return c
    return None


def _run_capture(cmd: Sequence[str], timeout: float = 20, env=None) -> Tuple[int, str]:
    try:
        r = subprocess.run(list(cmd), capture_output=True, text=True, timeout=timeout, env=env, cwd=ROOT)
        return r.returncode, (r.stdout + r.stderr)
    except FileNotFoundError as e:
        return 127, str(e)
    except subprocess.TimeoutExpired:
        return 124, f"timed out after {timeout:.0f} s"


def _tail(text: str, n: int = 2500) -> str:
    return text if len(text) <= n else "..." + text[-n:]


def _last_line(text: str) -> str:
    """The last line of a log that says something (not the exit marker Proc appends)."""
    for ln in reversed(text.splitlines()):
        ln = ln.strip()
        if ln and not ln.startswith("[exit "):
            return ln[:200]
    return ""


def _cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def _fmt_s(s: float) -> str:
    return f"{s:.0f}s" if s < 100 else f"{int(s // 60)}m{int(s % 60):02d}s"


def _module_available(name: str) -> bool:
    import importlib.util
    try:
        return importlib.util.find_spec(name) is not None
    except (ImportError, ValueError):
        return False


# --------------------------------------------------------------------------------------------
# the pytest plugin: selects the GPU tests (loaded with -p ddpm_fast.tools.gpucheck --gpucheck-select)
# --------------------------------------------------------------------------------------------
def pytest_addoption(parser):
    parser.addoption("--gpucheck-select", action="store_true", default=False,
                     help="ddpm_fast gpucheck: keep only the tests whose name or skip reason mentions CUDA or a GPU")
    parser.addoption("--gpucheck-progress", default=None, metavar="PATH",
                     help="ddpm_fast gpucheck: append each test's start and outcome to PATH as it happens (JSON "
                          "lines), so a lane killed at its deadline still says what ran")


def _progress(config, record: dict) -> None:
    path = config.getoption("--gpucheck-progress", default=None)
    if path:
        with open(path, "a") as f:
            f.write(json.dumps(record) + "\n")


def pytest_runtest_logstart(nodeid, location):
    cfg = _CONFIG.get("config")
    if cfg is not None:
        _progress(cfg, {"start": nodeid})


def pytest_configure(config):
    _CONFIG["config"] = config


def pytest_runtest_logreport(report):
    cfg = _CONFIG.get("config")
    if cfg is None:
        return
    if report.when == "call" or (report.when == "setup" and report.outcome != "passed") or \
            (report.when == "teardown" and report.outcome == "failed"):
        _progress(cfg, {"nodeid": report.nodeid, "when": report.when, "outcome": report.outcome,
                        "seconds": round(getattr(report, "duration", 0.0), 2)})


_CONFIG: dict = {}


def read_progress(path: str) -> dict:
    """Counts from a ``--gpucheck-progress`` file: outcomes per test, the failing ids, and the tests
    started but not finished (running when the lane was stopped)."""
    started, done, failed = [], {}, []
    try:
        with open(path) as f:
            for line in f:
                try:
                    r = json.loads(line)
                except ValueError:
                    continue
                if not isinstance(r, dict):
                    continue
                if "start" in r:
                    started.append(r["start"])
                elif r.get("nodeid"):
                    if r["outcome"] == "failed" and r["nodeid"] not in failed:
                        failed.append(r["nodeid"])
                    if r["nodeid"] not in done or r["outcome"] == "failed":
                        done[r["nodeid"]] = r["outcome"]
    except OSError:
        pass
    outcomes = list(done.values())
    return {"passed": outcomes.count("passed"), "failed": failed, "skipped": outcomes.count("skipped"),
            "running": [n for n in dict.fromkeys(started) if n not in done]}


def is_gpu_test(item) -> bool:
    """A test of the GPU lane: its function name says cuda/gpu (not an nvcc compile check, not a
    check of the message printed without CUDA), or a skip mark's reason starts by saying it needs
    CUDA or a GPU (this repository's convention: "needs a CUDA device ...", "no CUDA device: ..."),
    or it carries a ``gpu``/``cuda`` mark."""
    name = getattr(item, "originalname", None) or item.name
    if GPU_NAME.search(name) and not GPU_NAME_EXCLUDE.search(name):
        return True
    for mark in list(item.iter_markers("skipif")) + list(item.iter_markers("skip")):
        reason = mark.kwargs.get("reason", "")
        if not reason and mark.name == "skip" and mark.args:
            reason = str(mark.args[0])
        if GPU_REASON.search(str(reason)):
            return True
    return any(item.iter_markers("gpu")) or any(item.iter_markers("cuda"))


def pytest_collection_modifyitems(config, items):
    if not config.getoption("--gpucheck-select", default=False):
        return
    keep = [it for it in items if is_gpu_test(it)]
    drop = [it for it in items if not is_gpu_test(it)]
    if drop:
        config.hook.pytest_deselected(items=drop)
    items[:] = keep


# --------------------------------------------------------------------------------------------
# parsing what the tools print (pure functions: tested without a GPU)
# --------------------------------------------------------------------------------------------
def parse_junit(path: str) -> dict:
    """Counts and failing test ids from a pytest junit XML file."""
    import xml.etree.ElementTree as ET
    out = {"tests": 0, "failures": 0, "errors": 0, "skipped": 0, "failed": [], "skip_reasons": {}}
    try:
        root = ET.parse(path).getroot()
    except (OSError, ET.ParseError) as e:
        out["error"] = f"{type(e).__name__}: {e}"
        return out
    suites = [root] if root.tag == "testsuite" else root.findall("testsuite")
    for s in suites:
        for k in ("tests", "failures", "errors", "skipped"):
            out[k] += int(s.get(k, 0) or 0)
        for case in s.iter("testcase"):
            cid = f"{case.get('classname', '')}::{case.get('name', '')}"
            if case.find("failure") is not None or case.find("error") is not None:
                out["failed"].append(cid)
            sk = case.find("skipped")
            if sk is not None:
                why = (sk.get("message") or "").strip()[:160]
                out["skip_reasons"][why] = out["skip_reasons"].get(why, 0) + 1
    out["passed"] = out["tests"] - out["failures"] - out["errors"] - out["skipped"]
    return out


_SUMMARY_RE = re.compile(r"ERROR SUMMARY:\s*(\d+)\s+error", re.IGNORECASE)
_REFUSED = ("device not supported", "not supported on this platform", "unable to find injection library",
            "the application could not be launched", "error 999", "target application terminated before",
            "insufficient privileges", "permission denied", "could not be loaded")


def parse_sanitizer(rc: int, text: str) -> Tuple[str, str]:
    """(status, reason) from compute-sanitizer's output and exit code:
    ``passed`` (a clean ERROR SUMMARY and the subset's own checks passed), ``failed`` (errors found, or
    the subset's parity checks failed under the tool), ``unavailable`` (the tool refused the device or
    could not start: not a finding), ``error`` (anything else)."""
    m = _SUMMARY_RE.findall(text)
    n_err = int(m[-1]) if m else None
    subset_ok = "SUBSET PASSED" in text
    subset_bad = "SUBSET FAILED" in text
    low = text.lower()
    if n_err is not None and n_err > 0:
        kinds = sorted(set(re.findall(r"=========\s+(Invalid [^\n]*?|Race reported[^\n]*?|[A-Z][a-z]+ hazard"
                                      r"[^\n]*?|Uninitialized [^\n]*?|Program hit [^\n]*?)(?:\s+at|\n|$)", text)))[:4]
        return "failed", f"{n_err} error(s) reported" + (f": {'; '.join(kinds)}" if kinds else "")
    if subset_bad:
        return "failed", "the parity subset failed under the tool (see its log)"
    if n_err == 0 and subset_ok:
        return "passed", "0 errors"
    if n_err == 0 and "SUBSET SKIPPED" in text:
        return "unavailable", "no library backend runs on CUDA here: nothing to check"
    for phrase in _REFUSED:
        if phrase in low:
            return "unavailable", f"the tool could not check this device ({phrase!r} in its output)"
    if n_err is None:
        return "error", f"no ERROR SUMMARY in the output (exit {rc})"
    return "error", f"exit {rc} with 0 errors but the subset did not report (see its log)"


def parse_ncu_csv(text: str) -> List[dict]:
    """Rows of ``ncu --csv --metrics ...`` folded to one dict per profiled kernel launch."""
    lines = [ln for ln in text.splitlines() if ln.startswith('"')]
    if not lines:
        return []
    rows = list(csv.DictReader(io.StringIO("\n".join(lines))))
    kernels: Dict[str, dict] = {}
    for r in rows:
        kid = r.get("ID")
        if kid is None or "Metric Name" not in r:
            continue
        k = kernels.setdefault(kid, {"id": kid, "kernel": r.get("Kernel Name", "?"), "metrics": {}})
        value = (r.get("Metric Value") or "").replace(",", "")
        try:
            v: object = float(value)
        except ValueError:
            v = value
        k["metrics"][r["Metric Name"]] = {"value": v, "unit": r.get("Metric Unit", "")}
    return list(kernels.values())


def negotiate_bench_args(wanted: List[Tuple[str, List[str]]], help_text: str) -> Tuple[List[str], List[str]]:
    """The bench argv of the flags its ``--help`` lists, and a note for each one left out
    (another engineer may rework the bench: a missing flag is a message, not a crash)."""
    argv, notes = [], []
    for flag, values in wanted:
        if re.search(r"(^|[\s,\[])" + re.escape(flag) + r"([\s,=\]]|$)", help_text, re.M):
            argv += [flag] + list(values)
        else:
            notes.append(f"bench has no {flag} flag: left out ({flag} {' '.join(values)})".strip())
    return argv, notes


def drop_rejected_arg(argv: List[str], stderr: str) -> Tuple[Optional[List[str]], str]:
    """After an argparse error (exit 2): argv without the rejected flag or value, and a note; ``None``
    when the error cannot be attributed to one argument."""
    m = re.search(r"unrecognized arguments: (.+)", stderr)
    if m:
        bad = m.group(1).split()
        out, skipping = [], False
        for a in argv:
            if a in bad and a.startswith("--"):
                skipping = True
                continue
            if skipping and not a.startswith("--") and a in bad:
                continue
            skipping = False if a.startswith("--") else skipping
            if skipping:
                continue
            out.append(a)
        return (out if out != argv else None), f"bench rejected {' '.join(bad)}: left out"
    m = re.search(r"argument (--[\w-]+)[^:]*: invalid choice: '([^']+)'", stderr)
    if m:
        flag, value = m.group(1), m.group(2)
        out = list(argv)
        i = out.index(flag) if flag in out else -1
        if i >= 0 and value in out[i + 1:]:
            j = out.index(value, i + 1)
            del out[j]
            # a flag left without values goes too
            if j == i + 1 and (len(out) == i + 1 or out[i + 1].startswith("--")):
                del out[i]
            return out, f"bench does not know {flag} {value}: left out"
    return None, ""


def bench_verdicts(data: Optional[dict], why_missing: str = "") -> List[dict]:
    """The issue's GPU targets, read off the bench JSON's rows (op, shape, numel, dtype, provider,
    kind, status, ms, pct_copy): ``met`` / ``NOT met`` where a threshold is stated, ``reported``
    where the issue asks for the figure only, ``not measured`` with the reason otherwise."""
    specs = [
        ("q_sample", "large", "fp32", "%copy", 85.0),
        ("ddpm_step", "large", "fp32", "%copy", 85.0),
        ("q_sample", "large", "bf16", "%copy", None),
        ("ddpm_step", "large", "bf16", "%copy", None),
        ("ddpm_step", (4, 4, 64, 64), "fp32", "diffusers", None),
    ]
    out = []
    rows = [] if not data else [r for r in data.get("results", []) if isinstance(r, dict) and r.get("status") == "ok"]
    copy = (data or {}).get("copy", {}) if data else {}
    copy_gbps = copy.get("gbps") if isinstance(copy, dict) else None
    bench_targets = (data or {}).get("targets") or []
    for op, shape, dt, what, threshold in specs:
        shape_txt = ">= 16M elements" if shape == "large" else "x".join(map(str, shape))
        name = f"{op} {shape_txt} {dt}" + (" vs diffusers' step" if what == "diffusers" else " % of copy bandwidth")
        entry = {"name": name, "op": op, "dtype": dt, "threshold": threshold, "value": None}
        if data is None:
            entry.update(verdict="not measured", text=f"{name}: {why_missing or 'no bench JSON'}")
            out.append(entry)
            continue

        def match(r):
            if r.get("op") != op or r.get("dtype") != dt:
                return False
            if shape == "large":
                return int(r.get("numel", 0)) >= 16 * 2 ** 20
            return tuple(r.get("shape", ())) == shape
        group = [r for r in rows if match(r)]
        lib = [r for r in group if r.get("kind") == "library" and "ms" in r]
        if not lib:
            entry.update(verdict="not measured", text=f"{name}: no library provider measured in the bench JSON")
            out.append(entry)
            continue
        best = min(lib, key=lambda r: r["ms"])
        shp = "x".join(map(str, best.get("shape", [])))
        if what == "%copy":
            pct = best.get("pct_copy")
            if pct is None and copy_gbps and best.get("gbps"):
                pct = 100.0 * best["gbps"] / copy_gbps
            if pct is None:
                entry.update(verdict="not measured", text=f"{name}: the bench JSON has no % of copy for it")
                out.append(entry)
                continue
            entry["value"] = pct
            text = (f"{op} {shp} {dt}: {best['provider']} {best.get('gbps', float('nan')):.0f} GB/s = {pct:.1f}% of "
                    f"copy {copy_gbps or float('nan'):.0f} GB/s")
        else:
            base = [r for r in group if str(r.get("provider", "")).startswith("diffusers") and "ms" in r]
            if not base:
                skipped = [r for r in (data.get("results") or []) if isinstance(r, dict) and r.get("op") == op
                           and str(r.get("provider", "")).startswith("diffusers")
                           and tuple(r.get("shape", ())) == shape and r.get("dtype") == dt]
                why = skipped[0].get("reason", "not measured") if skipped else "diffusers' step was not measured"
                entry.update(verdict="not measured", text=f"{op} {shp} {dt}: {why}")
                out.append(entry)
                continue
            ratio = base[0]["ms"] / best["ms"]
            entry["value"] = ratio
            faster = f"{ratio:.2f}x faster" if ratio >= 1 else f"{1 / ratio:.2f}x slower"
            text = (f"{op} {shp} {dt}: {best['provider']} {best['ms'] * 1e3:.1f} us, {faster} than "
                    f"{base[0]['provider']} {base[0]['ms'] * 1e3:.1f} us")
            # the bench's own threshold for this comparison, if it states one
            for t in bench_targets:
                if isinstance(t, dict) and t.get("op") == op and t.get("dtype") == dt \
                        and "diffusers" in str(t.get("what")) and tuple(t.get("shape", ())) == shape \
                        and t.get("target") is not None:
                    threshold = float(t["target"])
                    entry["threshold"] = threshold
        if threshold is None:
            entry.update(verdict="reported", text=text)
        else:
            met = entry["value"] >= threshold
            unit = "%" if what == "%copy" else "x"
            entry.update(verdict="met" if met else "NOT met", text=f"{text} (target >= {threshold:g}{unit})")
        out.append(entry)
    return out


# --------------------------------------------------------------------------------------------
# the run
# --------------------------------------------------------------------------------------------
class Proc:
    """A step's subprocess in its own process group (not a new session: the device tool ends what a
    command leaves running unless it started a new session, so a run killed at the tool's limit
    leaves nothing behind), its output in a log file; the whole group is killed at its deadline."""

    running: List["Proc"] = []

    def __init__(self, cmd: Sequence[str], log_path: str, env: dict, cwd: str = ROOT):
        self.cmd, self.log_path, self.env, self.cwd = list(cmd), log_path, env, cwd
        self.log = open(log_path, "a")
        self.log.write(f"$ {shlex.join(self.cmd)}\n")
        self.log.flush()
        self.t0 = _now()
        self.p = subprocess.Popen(self.cmd, stdout=self.log, stderr=subprocess.STDOUT, env=env, cwd=cwd,
                                  preexec_fn=os.setpgrp)
        self.timed_out = False
        Proc.running.append(self)

    def kill(self) -> None:
        try:
            os.killpg(self.p.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass

    def wait(self, timeout: float) -> int:
        try:
            rc = self.p.wait(timeout=max(0.1, timeout))
        except subprocess.TimeoutExpired:
            self.timed_out = True
            try:
                os.killpg(self.p.pid, signal.SIGTERM)
                try:
                    self.p.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    os.killpg(self.p.pid, signal.SIGKILL)
                    self.p.wait()
            except ProcessLookupError:
                pass
            rc = 124
        if self in Proc.running:
            Proc.running.remove(self)
        self.seconds = _now() - self.t0
        self.log.write(f"\n[exit {rc}{' (timed out)' if self.timed_out else ''} after {self.seconds:.1f} s]\n")
        self.log.close()
        return rc

    def text(self) -> str:
        try:
            with open(self.log_path, errors="replace") as f:
                return f.read()
        except OSError:
            return ""


class Check:
    def __init__(self, args):
        self.args = args
        self.t0 = _now()
        self.deadline = self.t0 + args.budget
        self.out = os.path.abspath(args.out)
        self.work = os.path.abspath(args.work or tempfile.mkdtemp(prefix="ddpm_fast_gpucheck_"))
        self.logs = os.path.join(self.work, "logs")
        os.makedirs(self.out, exist_ok=True)
        os.makedirs(self.logs, exist_ok=True)
        self.py = sys.executable
        self.steps: List[dict] = []
        self.report: dict = {"schema": 1, "tool": "python -m ddpm_fast gpucheck",
                             "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
                             "argv": list(args.argv), "budget_s": args.budget, "out": self.out, "work": self.work,
                             "files": {}, "notes": []}
        self.env = dict(os.environ)
        self.env["PYTHONUNBUFFERED"] = "1"
        self.env.pop("TRITON_INTERPRET", None)
        self.env["PYTHONPATH"] = os.pathsep.join([ROOT] + [p for p in self.env.get("PYTHONPATH", "").split(os.pathsep)
                                                           if p and os.path.abspath(p) != ROOT])
        self.gpu = False
        self.dry = bool(args.dry)
        self.selected = [s for s in STEPS if (not args.only or s in args.only) and s not in (args.skip or [])]
        self.bench_data: Optional[dict] = None
        self.bench_missing = "the bench step did not run"

    # ---- bookkeeping ------------------------------------------------------------------------
    def say(self, msg: str) -> None:
        print(f"[gpucheck {_now() - self.t0:6.1f}s] {msg}", flush=True)

    def left(self) -> float:
        return self.deadline - _now()

    def timeout_for(self, step: str) -> float:
        cap, _ = BUDGET[step]
        later = STEPS[STEPS.index(step) + 1:]
        reserve = sum(BUDGET[s][1] for s in later if s in self.selected and s != "lane-triton")
        return min(cap, self.left() - reserve)

    def record(self, name: str, status: str, reason: str = "", *, seconds: float = 0.0, command=None,
               log: Optional[str] = None, details: Optional[dict] = None) -> dict:
        entry = {"name": name, "kind": "correctness" if name in CORRECTNESS else "measurement" if name in
                 ("bench", "sampling", "ncu") else "setup", "status": status, "reason": reason,
                 "seconds": round(seconds, 1)}
        if command is not None:
            entry["command"] = command if isinstance(command, str) else shlex.join(command)
        if log:
            entry["log"] = "logs/" + os.path.basename(log)
            try:
                with open(log, errors="replace") as f:
                    entry["log_tail"] = _tail(f.read(), 2000)
            except OSError:
                pass
        if details:
            entry["details"] = details
        self.steps.append(entry)
        self.say(f"{name}: {status}{' - ' + reason if reason else ''}")
        self.pack_logs()
        return entry

    def skip_reason(self, step: str) -> Optional[str]:
        if step not in self.selected:
            return "not selected (--only/--skip)"
        if self.dry:
            return "dry mode: " + ("--dry given" if self.args.dry else "no CUDA device visible to torch")
        t = self.timeout_for(step)
        if t < MIN_USEFUL_S:
            return f"time budget spent ({self.left():.0f} s of {self.args.budget:.0f} s left, reserved for later steps)"
        return None

    def pack_logs(self) -> None:
        """logs.tar.gz of every log; one over LOG_CAP bytes goes in cut to its head and tail (the
        device tool brings back files of 16 MiB at most)."""
        path = os.path.join(self.out, "logs.tar.gz")
        tmp = path + ".tmp"
        try:
            with tarfile.open(tmp, "w:gz") as tar:
                for name in sorted(os.listdir(self.logs)):
                    full = os.path.join(self.logs, name)
                    if not os.path.isfile(full):
                        continue
                    size = os.path.getsize(full)
                    if size <= LOG_CAP:
                        tar.add(full, arcname=f"logs/{name}")
                        continue
                    with open(full, "rb") as f:
                        head = f.read(LOG_CAP // 2)
                        f.seek(size - LOG_CAP // 2)
                        tail = f.read()
                    data = head + f"\n[... {size - LOG_CAP} bytes cut ...]\n".encode() + tail
                    info = tarfile.TarInfo(f"logs/{name}")
                    info.size, info.mtime = len(data), int(time.time())
                    tar.addfile(info, io.BytesIO(data))
            os.replace(tmp, path)
        except OSError as e:
            print(f"could not pack the logs: {e}", file=sys.stderr)

    def logfile(self, name: str) -> str:
        return os.path.join(self.logs, name)

    # ---- env --------------------------------------------------------------------------------
    def step_env(self) -> None:
        t0 = _now()
        env: dict = {"python": platform.python_version(), "executable": self.py, "platform": platform.platform(),
                     "kernel": platform.release(), "cores": _cores(), "repo": ROOT}
        rel = platform.release()
        # a guess from the kernel release (what the device tool's machines showed): gVisor reports 4.4.0
        env["runtime"] = ("gVisor (kernel 4.4.0: expect no ncu counters, no compute-sanitizer)"
                          if rel.startswith("4.4.0") else "Firecracker (kernel -fc-)" if "-fc-" in rel else
                          f"unknown (kernel {rel})")
        try:
            with open("/proc/meminfo") as f:
                env["mem_total_gib"] = round(int(f.readline().split()[1]) / 2 ** 20, 1)
        except (OSError, ValueError, IndexError):
            pass
        try:
            import torch
            env["torch"] = torch.__version__
            env["torch_cuda"] = torch.version.cuda
            env["cuda_available"] = torch.cuda.is_available()
            if torch.cuda.is_available():
                p = torch.cuda.get_device_properties(0)
                cap = torch.cuda.get_device_capability(0)
                env.update(device_name=p.name, device_count=torch.cuda.device_count(), capability=f"{cap[0]}.{cap[1]}",
                           sm_count=p.multi_processor_count, gpu_mem_gib=round(p.total_memory / 2 ** 30, 1))
                l2 = getattr(p, "L2_cache_size", None)
                if l2:
                    env["l2_mib"] = round(l2 / 2 ** 20, 1)
        except Exception as e:  # torch broken: reported, the dry path still runs
            env["torch"] = f"unimportable: {type(e).__name__}: {e}"
            env["cuda_available"] = False
        try:
            import importlib.metadata as md
            pk = {}
            for name in ("torch", "triton", "numpy", "scipy", "pytest", "pytest-xdist", "pytest-timeout", "diffusers",
                         "matplotlib", "setuptools", "ninja", "pybind11", "tqdm"):
                try:
                    pk[name] = md.version(name)
                except md.PackageNotFoundError:
                    pk[name] = None
            env["packages"] = pk
            env["triton"] = pk.get("triton")
        except Exception:
            pass
        tools = {t: find_tool(t) for t in TOOLS}
        env["tools"] = tools
        lines = []
        if tools["nvidia-smi"]:
            rc, txt = _run_capture([tools["nvidia-smi"], "--query-gpu=name,driver_version,memory.total,clocks.sm,"
                                    "clocks.max.sm,clocks.mem,temperature.gpu,power.draw,power.limit",
                                    "--format=csv,noheader"])
            env["nvidia_smi"] = txt.strip() if rc == 0 else f"exit {rc}: {txt.strip()[:200]}"
            if rc == 0 and txt.strip():
                env["driver"] = txt.strip().splitlines()[0].split(",")[1].strip()
            rc, full = _run_capture([tools["nvidia-smi"]])
            lines.append(full)
        if tools["nvcc"]:
            rc, txt = _run_capture([tools["nvcc"], "--version"])
            env["nvcc"] = txt.strip().splitlines()[-1] if rc == 0 and txt.strip() else f"exit {rc}"
        rc, txt = _run_capture(["git", "rev-parse", "HEAD"])
        env["git_commit"] = txt.strip() if rc == 0 else None
        env["source_digest"] = source_digest()
        with open(self.logfile("env.txt"), "w") as f:
            f.write(json.dumps(env, indent=1, default=str) + "\n\n" + "\n".join(lines))
        self.report["env"] = env
        self.gpu = bool(env.get("cuda_available"))
        if os.environ.get("DDPM_FAST_GPUCHECK_FORCE") == "1" and not self.args.dry:
            # for checking the orchestration itself on a machine without a GPU: every step runs
            self.report["notes"].append("DDPM_FAST_GPUCHECK_FORCE=1: the steps ran without a GPU")
            self.gpu = True
        if not self.gpu and not self.dry:
            self.dry = True
            self.report["notes"].append("no CUDA device visible to torch: ran the dry mode instead (exit 3)")
        found = ", ".join(t for t, p in tools.items() if p) or "none"
        missing = ", ".join(t for t, p in tools.items() if not p) or "none"
        dev = env.get("device_name", "no CUDA device")
        self.record("env", "ok", f"{dev}; {env['cores']} cores; tools found: {found}; missing: {missing}",
                    seconds=_now() - t0, log=self.logfile("env.txt"))

    # ---- wheels -----------------------------------------------------------------------------
    def step_wheels(self) -> None:
        wdir = self.args.wheels or os.path.join(ROOT, ".whl")
        wheels = sorted(glob.glob(os.path.join(wdir, "*.whl")))
        if not wheels:
            self.record("wheels", "skipped", f"no wheels in {wdir} (carry diffusers as wheels to measure against it: "
                                             "docs/gpu.md)")
            return
        why = self.skip_reason("wheels")
        site = os.path.join(self.work, "site")
        cmd = [self.py, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--no-compile", "--no-cache-dir",
               "--upgrade", "--target", site] + wheels
        if why:
            self.record("wheels", "skipped", why, command=cmd,
                        details={"wheels": [os.path.basename(w) for w in wheels]})
            return
        log = self.logfile("wheels.log")
        p = Proc(cmd, log, self.env)
        rc = p.wait(self.timeout_for("wheels"))
        if rc == 0:
            self.env["PYTHONPATH"] = self.env["PYTHONPATH"] + os.pathsep + site
        self.record("wheels", "ok" if rc == 0 else "error", f"{len(wheels)} wheel(s) into {site}" if rc == 0
                    else f"pip exit {rc}", seconds=p.seconds, command=cmd, log=log,
                    details={"wheels": [os.path.basename(w) for w in wheels]})

    # ---- build ------------------------------------------------------------------------------
    def build_plan(self) -> Tuple[List[str], dict]:
        env = {}
        arch = self.args.arch
        if not arch:
            cap = self.report.get("env", {}).get("capability")
            arch = cap or "9.0"
        env["TORCH_CUDA_ARCH_LIST"] = arch
        env["MAX_JOBS"] = str(self.args.max_jobs or _cores())
        if self.args.build_cmd:
            cmd = shlex.split(self.args.build_cmd)
        elif os.path.exists(os.path.join(ROOT, "setup.py")):
            cmd = [self.py, "setup.py", "build_ext", "--inplace"]
        else:
            cmd = [self.py, "-m", "pip", "install", "--no-build-isolation", "--no-deps", "--no-index", "-e", "."]
        return cmd, env

    def native_state(self) -> dict:
        code = ("import json, ddpm_fast\n"
                "b = ddpm_fast.backends()\n"
                "try:\n"
                "    from ddpm_fast.backends import native as n\n"
                "    info = n.build_info() if hasattr(n, 'build_info') else None\n"
                "except Exception as e:\n"
                "    info = repr(e)\n"
                "print('STATE ' + json.dumps({'backends': b, 'build_info': info}, default=str))\n")
        env = dict(self.env, DDPM_FAST_NO_JIT="1")
        rc, txt = _run_capture([self.py, "-c", code], timeout=min(120, max(15, self.left())), env=env)
        for line in txt.splitlines():
            if line.startswith("STATE "):
                return json.loads(line[6:])
        return {"error": _tail(txt, 1500)}

    def step_build(self) -> None:
        cmd, extra = self.build_plan()
        why = self.skip_reason("build")
        shown = " ".join(f"{k}={v}" for k, v in extra.items()) + " " + shlex.join(cmd)
        if why:
            self.record("build", "skipped", why, command=shown)
            return
        log = self.logfile("build.log")
        self.say(f"build: {shown}")
        p = Proc(cmd, log, dict(self.env, **extra))
        rc = p.wait(self.timeout_for("build"))
        secs = p.seconds
        print(f"build time: {secs:.1f} s (exit {rc}{', timed out' if p.timed_out else ''})", flush=True)
        state = self.native_state()
        native = (state.get("backends") or {}).get("native", {})
        avail = native.get("available", {})
        details = {"build_s": round(secs, 1), "exit": rc, "state": state, **extra}
        try:
            with open(os.path.join(ROOT, "ddpm_fast", "_native_build.json")) as f:
                details["native_build_json"] = json.load(f)
        except (OSError, ValueError):
            pass
        if avail.get("cuda"):
            status, reason = "passed", f"native CPU + CUDA for sm_{extra['TORCH_CUDA_ARCH_LIST'].replace('.', '')} " \
                                       f"in {secs:.0f} s (MAX_JOBS={extra['MAX_JOBS']})"
        else:
            err = (details.get("native_build_json") or {}).get("error") or native.get("reason") or state.get("error")
            status = "failed"
            reason = ("timed out; " if p.timed_out else f"exit {rc}; ") + \
                     f"native CUDA unavailable after the build (cpu={avail.get('cpu')}): {str(err)[:300]}"
        self.record("build", status, reason, seconds=secs, command=shown, log=log, details=details)

    # ---- test lanes -------------------------------------------------------------------------
    def pytest_common(self, junit: str, workers: int) -> List[str]:
        args = ["-q", "-rfEs", "--durations=15", "-p", "no:cacheprovider", f"--junitxml={junit}",
                "--gpucheck-progress", junit.replace(".xml", ".progress")]
        if workers > 1 and _module_available("xdist"):
            args += ["-n", str(workers)]
        if _module_available("pytest_timeout"):
            args += ["--timeout", "240"]
        return args

    def lane_plans(self) -> Dict[str, List[str]]:
        cores = _cores()
        cuda = [self.py, "-m", "pytest", *gpu_test_files(), "-p", "ddpm_fast.tools.gpucheck",
                "--gpucheck-select"] + self.pytest_common(os.path.join(self.work, "lane-cuda.xml"),
                                                          max(1, min(4, cores // 4)))
        triton = [self.py, "-m", "pytest", "tests/triton", "-k", "not compile_for_sm90", "-p", "ddpm_fast.tools.gpucheck"] + \
            self.pytest_common(os.path.join(self.work, "lane-triton.xml"), max(1, min(8, cores // 2)))
        return {"lane-cuda": cuda, "lane-triton": triton}

    def collect_gpu_tests(self) -> dict:
        """Dry mode: the GPU lane's selection, collected (not run) on this machine."""
        cmd = [self.py, "-m", "pytest", *gpu_test_files(), "-p", "ddpm_fast.tools.gpucheck",
               "--gpucheck-select", "--collect-only", "-q", "-p", "no:cacheprovider"]
        log = self.logfile("lane-cuda-collect.log")
        p = Proc(cmd, log, self.env)
        rc = p.wait(min(180, max(30, self.left())))
        txt = p.text()
        ids = [ln.strip() for ln in txt.splitlines() if "::" in ln and not ln.startswith("$")]
        return {"exit": rc, "selected": len(ids), "ids": ids, "seconds": round(p.seconds, 1), "log": log}

    def triton_tree(self) -> str:
        """A copy of the working tree without any built extension, where the Triton lane runs while
        the build writes ddpm_fast/_C*.so in the real tree (no half-written library is ever loaded;
        the native backend is simply absent there, and tests/triton's native-parity test skips)."""
        dest = os.path.join(self.work, "tree-triton")
        if not os.path.isdir(dest):
            shutil.copytree(ROOT, dest, ignore=shutil.ignore_patterns(
                ".git", "build", "*.so", "_native_build.json", "__pycache__", ".whl", "*.egg-info"))
        return dest

    def lane_env(self, root: str) -> dict:
        env = dict(self.env)
        parts = [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p and os.path.abspath(p) != ROOT]
        env["PYTHONPATH"] = os.pathsep.join([root] + parts)
        return env

    def start_triton_lane(self) -> None:
        """lane-triton needs no native build: it starts before the build, in a copy of the tree, so
        Triton's compiles overlap the build (it ends by the lanes' common deadline)."""
        self.triton_proc = None
        if "lane-triton" not in self.selected or self.dry or self.skip_reason("lane-triton"):
            return
        try:
            tree = self.triton_tree()
        except OSError as e:
            self.report["notes"].append(f"lane-triton: could not copy the tree ({e}); it runs after the build")
            return
        cmd = self.lane_plans()["lane-triton"]
        self.say(f"lane-triton (in {tree}, during the build): {shlex.join(cmd)}")
        self.triton_proc = Proc(cmd, self.logfile("lane-triton.log"), self.lane_env(tree), cwd=tree)

    def step_lanes(self) -> None:
        plans = self.lane_plans()
        names = [n for n in ("lane-cuda", "lane-triton") if n in self.selected]
        why = self.skip_reason(names[0]) if names else "not selected (--only/--skip)"
        early = getattr(self, "triton_proc", None)
        if why and early is None:
            details = None
            if self.dry and "lane-cuda" in names and not self.args.no_collect:
                c = self.collect_gpu_tests()
                details = {"collected_here": {k: v for k, v in c.items() if k != "log"}}
                why += f"; the GPU selection collects {c['selected']} tests here (collect-only, exit {c['exit']})"
                self.report.setdefault("dry_checks", {})["gpu_tests_selected"] = c["selected"]
            for n in ("lane-cuda", "lane-triton"):
                r = why if n == "lane-cuda" else why.split("; the GPU selection")[0] + \
                    "; it would start before the build, in a copy of the tree without the extension"
                self.record(n, "skipped", r if n in names else "not selected (--only/--skip)", command=plans[n],
                            details=details if n == "lane-cuda" else None)
            return
        timeout = max(self.timeout_for("lane-cuda"), MIN_USEFUL_S)
        procs = {}
        if "lane-triton" in names:
            if early is not None:
                procs["lane-triton"] = early
            else:
                self.say(f"lane-triton: {shlex.join(plans['lane-triton'])}")
                procs["lane-triton"] = Proc(plans["lane-triton"], self.logfile("lane-triton.log"), self.env)
        if "lane-cuda" in names and not why:
            self.say(f"lane-cuda: {shlex.join(plans['lane-cuda'])}")
            procs["lane-cuda"] = Proc(plans["lane-cuda"], self.logfile("lane-cuda.log"), self.env)
        end = _now() + timeout
        for n in ("lane-cuda", "lane-triton"):
            if n not in procs:
                self.record(n, "skipped", why or "not selected (--only/--skip)", command=plans[n])
                continue
            p = procs[n]
            rc = p.wait(end - _now())
            if rc in (3, 4) and "-n" in p.cmd and end - _now() > 60:
                # pytest's internal or usage error with xdist: once more in one process
                i = p.cmd.index("-n")
                cmd = p.cmd[:i] + p.cmd[i + 2:]
                self.say(f"{n}: pytest exit {rc} with xdist; again without it")
                p = Proc(cmd, p.log_path, p.env, cwd=p.cwd)
                rc = p.wait(end - _now())
            self.record_lane(n, p, rc)

    def record_lane(self, n: str, p: "Proc", rc: int) -> None:
        j = parse_junit(os.path.join(self.work, f"{n}.xml"))
        prog = read_progress(os.path.join(self.work, f"{n}.progress"))
        j["progress"] = prog
        counts = f"{j.get('passed', 0)} passed, {j['failures'] + j['errors']} failed, {j['skipped']} skipped"
        if p.timed_out:
            so_far = f"{prog['passed']} passed, {len(prog['failed'])} failed, {prog['skipped']} skipped so far"
            running = ", ".join(x.split("::")[-1] for x in prog["running"][:3])
            if prog["failed"]:
                status = "failed"
                reason = f"timed out after {p.seconds:.0f} s; {so_far}: " + \
                         ", ".join(x.split("::")[-1] for x in prog["failed"][:4])
            else:
                status = "incomplete"
                reason = (f"timed out after {p.seconds:.0f} s with no failure yet ({so_far}); still running: "
                          f"{running or '?'}")
        elif rc == 5:
            why = next((ln.strip() for ln in p.text().splitlines() if ln.startswith("SKIP")), "")
            status = "failed"
            reason = ("pytest collected no GPU tests (the selection is broken)" if n == "lane-cuda" else
                      "pytest collected no tests in tests/triton") + (f": {why[:160]}" if why else "")
        elif rc == 0 and j.get("passed", 0) == 0:
            top = sorted(j["skip_reasons"].items(), key=lambda kv: -kv[1])[:2]
            status = "failed"
            reason = f"nothing ran on the GPU ({counts}): " + "; ".join(f"{k}x {w[:80]}" for w, k in top)
        elif rc == 0:
            status, reason = "passed", counts
        else:
            status = "failed"
            reason = counts + (": " + ", ".join(x.split("::")[-1] for x in j["failed"][:4]) if j["failed"] else
                               f" (pytest exit {rc})")
        self.record(n, status, reason, seconds=p.seconds, command=p.cmd, log=p.log_path, details=j)

    # ---- bench ------------------------------------------------------------------------------
    def bench_plan(self) -> Tuple[List[str], List[str]]:
        rc, help_text = _run_capture([self.py, "-m", "ddpm_fast", "bench", "--help"],
                                     timeout=min(90, max(15, self.left())), env=self.env)
        if rc != 0:
            return [], [f"python -m ddpm_fast bench --help failed (exit {rc}): {_tail(help_text, 300)}"]
        wanted = [("--device", ["cuda"]), ("--ops", ["q_sample", "ddpm_step"]),
                  ("--shapes", [LARGE_SHAPE, SMALL_SHAPE]), ("--dtype", ["fp32", "bf16"]), ("--no-compile", []),
                  ("--json", [os.path.join(self.out, "bench.json")]), ("--plot", [os.path.join(self.out, "bench.png")])]
        argv, notes = negotiate_bench_args(wanted, help_text)
        return [self.py, "-m", "ddpm_fast", "bench"] + argv, notes

    def step_bench(self) -> None:
        t0 = _now()
        if "bench" not in self.selected:
            self.bench_missing = "the bench step was not selected (--only/--skip)"
            self.record("bench", "skipped", "not selected (--only/--skip)")
            return
        cmd, notes = self.bench_plan()
        self.report["bench_notes"] = notes
        for n in notes:
            self.say(f"bench: {n}")
        why = self.skip_reason("bench")
        if not cmd:
            self.bench_missing = notes[0] if notes else "bench unavailable"
            self.record("bench", "error", self.bench_missing, seconds=_now() - t0)
            return
        if why:
            self.bench_missing = "the bench step was skipped: " + why
            self.record("bench", "skipped", why + (f"; flags negotiated ({len(notes)} left out)" if notes else
                                                   "; every flag it needs is there"), command=cmd,
                        details={"notes": notes})
            return
        log = self.logfile("bench.log")
        timeout = self.timeout_for("bench")
        rc, p = 2, None
        for _ in range(4):   # an argparse rejection drops that argument and retries
            p = Proc(cmd, log, self.env)
            rc = p.wait(timeout - (_now() - t0))
            if rc != 2 or p.timed_out:
                break
            fixed, note = drop_rejected_arg(cmd, p.text())
            if fixed is None:
                break
            notes.append(note)
            self.say(f"bench: {note}")
            cmd = fixed
        path = os.path.join(self.out, "bench.json")
        try:
            with open(path) as f:
                self.bench_data = json.load(f)
        except (OSError, ValueError) as e:
            self.bench_missing = f"no bench JSON ({type(e).__name__}); bench exit {rc}: {_last_line(p.text())}"
        status = "ok" if rc == 0 and self.bench_data is not None else "error"
        reason = (f"{sum(1 for r in self.bench_data.get('results', []) if r.get('status') == 'ok')} rows; "
                  f"copy {self.bench_data.get('copy', {}).get('gbps', float('nan')):.0f} GB/s"
                  if self.bench_data else self.bench_missing)
        if p is not None and p.timed_out:
            status, reason = "timeout", f"timed out after {p.seconds:.0f} s"
        self.record("bench", status, reason, seconds=_now() - t0, command=cmd, log=log, details={"notes": notes})

    # ---- subsets run in child processes (sampling, sanitizers, ncu) ---------------------------
    def subset_cmd(self, kind: str) -> List[str]:
        return [self.py, "-m", "ddpm_fast.tools.gpucheck", "--subset", kind, "--out", self.work]

    def step_sampling(self) -> None:
        cmd = self.subset_cmd("sampling")
        why = self.skip_reason("sampling")
        if why:
            self.record("sampling", "skipped", why, command=cmd)
            return
        log = self.logfile("sampling.log")
        p = Proc(cmd, log, self.env)
        rc = p.wait(self.timeout_for("sampling"))
        data = None
        try:
            with open(os.path.join(self.work, "sampling.json")) as f:
                data = json.load(f)
        except (OSError, ValueError):
            pass
        self.report["sampling"] = data
        if rc == 0 and data:
            r = data["results"]
            parts = [f"{k}: {v['graph_us']:.1f} us/step graph, {v['eager_us']:.1f} eager" for k, v in r.items()]
            self.record("sampling", "ok", "; ".join(parts), seconds=p.seconds, command=cmd, log=log, details=data)
        else:
            self.record("sampling", "timeout" if p.timed_out else "error", f"exit {rc}: {_last_line(p.text())}",
                        seconds=p.seconds, command=cmd, log=log)

    def sanitizer_cmd(self, tool: str) -> Optional[List[str]]:
        exe = self.report.get("env", {}).get("tools", {}).get("compute-sanitizer") or find_tool("compute-sanitizer")
        if not exe:
            return None
        return [exe, "--tool", tool, "--error-exitcode", "7", "--print-limit", "25"] + \
            self.subset_cmd("memcheck" if tool == "memcheck" else "racecheck")

    def step_sanitizer(self, tool: str) -> None:
        cmd = self.sanitizer_cmd(tool)
        why = self.skip_reason(tool)
        if cmd is None:
            self.record(tool, "skipped", "compute-sanitizer not found (PATH, CUDA_HOME, /usr/local/cuda)")
            return
        if why:
            self.record(tool, "skipped", why, command=cmd)
            return
        log = self.logfile(f"{tool}.log")
        # every tensor its own allocation, so an access past a tensor's end is past an allocation's end
        env = dict(self.env, PYTORCH_NO_CUDA_MEMORY_CACHING="1")
        p = Proc(cmd, log, env)
        rc = p.wait(self.timeout_for(tool))
        if p.timed_out:
            self.record(tool, "incomplete", f"timed out after {p.seconds:.0f} s (not a finding)", seconds=p.seconds,
                        command=cmd, log=log)
            return
        status, reason = parse_sanitizer(rc, p.text())
        self.record(tool, status, reason, seconds=p.seconds, command=cmd, log=log)

    NCU_METRICS = ("gpu__time_duration.sum,dram__throughput.avg.pct_of_peak_sustained_elapsed,dram__bytes_read.sum,"
                   "dram__bytes_write.sum,sm__warps_active.avg.pct_of_peak_sustained_active,"
                   "launch__registers_per_thread,sm__inst_issued.avg.pct_of_peak_sustained_active")

    def ncu_cmd(self, fallback: bool = False) -> Optional[List[str]]:
        """ncu on the q_sample kernels launched inside the subset's NVTX range ``ncu-profile`` (after
        the warm-up and Triton's autotuning, so the profiled launches are the tuned ones); the fallback,
        where NVTX filtering profiles nothing, takes the native kernel's second launch by name."""
        exe = self.report.get("env", {}).get("tools", {}).get("ncu") or find_tool("ncu")
        if not exe:
            return None
        base = [exe, "--clock-control", "none", "--target-processes", "all", "--csv", "--metrics", self.NCU_METRICS]
        if fallback:
            sel = ["--kernel-name", "regex:^q_sample_kernel", "--launch-skip", "1", "--launch-count", "1"]
        else:
            sel = ["--nvtx", "--nvtx-include", "ncu-profile/", "--kernel-name", "regex:q_sample", "--launch-count", "2"]
        return base + sel + self.subset_cmd("ncu")

    def step_ncu(self) -> None:
        cmd = self.ncu_cmd()
        why = self.skip_reason("ncu")
        if cmd is None:
            self.record("ncu", "skipped", "ncu not found (PATH, CUDA_HOME, /opt/nvidia/nsight-compute)")
            return
        if why:
            self.record("ncu", "skipped", why, command=cmd)
            return
        log = self.logfile("ncu.log")
        t0 = _now()
        p = Proc(cmd, log, self.env)
        rc = p.wait(self.timeout_for("ncu"))
        txt = p.text()
        kernels = parse_ncu_csv(txt)
        if not kernels and not p.timed_out and "no kernels were profiled" in txt.lower() and \
                self.timeout_for("ncu") - (_now() - t0) > MIN_USEFUL_S:
            cmd = self.ncu_cmd(fallback=True)
            self.say("ncu: nothing profiled inside the NVTX range; again by kernel name")
            p = Proc(cmd, log, self.env)
            rc = p.wait(self.timeout_for("ncu") - (_now() - t0))
            txt = p.text()
            kernels = parse_ncu_csv(txt)
        if kernels:
            with open(os.path.join(self.out, "ncu.csv"), "w") as f:
                f.write("\n".join(ln for ln in txt.splitlines() if ln.startswith('"')) + "\n")
            parts = []
            for k in kernels:
                m = k["metrics"]
                dram = m.get("dram__throughput.avg.pct_of_peak_sustained_elapsed", {}).get("value")
                dur = m.get("gpu__time_duration.sum", {})
                name = re.split(r"[<(]", k["kernel"])[0]
                parts.append(f"{name} DRAM {dram}% in {dur.get('value')} {dur.get('unit', '')}".strip())
            self.record("ncu", "ok", "; ".join(dict.fromkeys(parts)), seconds=_now() - t0, command=cmd, log=log,
                        details={"kernels": kernels})
        else:
            low = txt.lower()
            refused = next((s for s in ("librarynotloaded", "failed to initialize the profiler", "err_nvgpuctrperm",
                                        "no kernels were profiled", "not supported") if s in low), None)
            status = "timeout" if p.timed_out else "unavailable" if refused else "error"
            self.record("ncu", status, f"exit {rc}" + (f": {refused!r} in its output" if refused else ""),
                        seconds=_now() - t0, command=cmd, log=log)

    # ---- the whole run ----------------------------------------------------------------------
    def _on_signal(self, signum, frame):
        for p in list(Proc.running):
            p.kill()
        self.report["notes"].append(f"interrupted by signal {signum} after {_now() - self.t0:.0f} s")
        self.interrupted = True
        raise KeyboardInterrupt

    def run(self) -> int:
        self.interrupted = False
        signal.signal(signal.SIGTERM, self._on_signal)
        try:
            return self._run()
        except KeyboardInterrupt:
            for p in list(Proc.running):
                p.kill()
            self.report["notes"].append("stopped before the end: the steps not listed did not run")
            return self.finish()

    def _run(self) -> int:
        self.say(f"output: {self.out}; logs: {self.logs}; budget {self.args.budget:.0f} s")
        self.step_env()
        mode = "dry" if self.dry else "gpu"
        self.report["mode"] = mode
        if self.dry:
            self.say("dry mode: every step plans its command and skips with its reason")
        self.step_wheels()
        self.start_triton_lane()
        self.step_build()
        self.step_lanes()
        self.step_bench()
        self.step_sampling()
        self.step_sanitizer("memcheck")
        self.step_sanitizer("racecheck")
        self.step_ncu()
        return self.finish()

    def finish(self) -> int:
        targets = bench_verdicts(self.bench_data, self.bench_missing)
        samp = self.report.get("sampling")
        if samp and samp.get("results"):
            for key, v in samp["results"].items():
                targets.append({"name": f"sample() per-step cost {key}", "verdict": "reported",
                                "value": v["eager_us"] / v["graph_us"] if v["graph_us"] else None, "threshold": None,
                                "text": f"sample() {key}: {v['graph_us']:.1f} us/step with the CUDA graph, "
                                        f"{v['eager_us']:.1f} us eager ({v['eager_us'] / v['graph_us']:.2f}x)"})
        else:
            step = next((s for s in self.steps if s["name"] == "sampling"), None)
            targets.append({"name": "sample() per-step cost with and without the graph", "verdict": "not measured",
                            "value": None, "threshold": None,
                            "text": f"sampling step {step['status'] if step else 'absent'}: "
                                    f"{step['reason'] if step else ''}"})
        self.report["targets"] = targets
        failed = [s["name"] for s in self.steps if s["kind"] == "correctness" and s["status"] == "failed"]
        if failed:
            code, verdict = EXIT_FAIL, f"FAIL (correctness: {', '.join(failed)})"
        elif getattr(self, "interrupted", False):
            code, verdict = EXIT_INTERRUPTED, "INTERRUPTED (a signal stopped the run; nothing failed before it)"
        elif self.dry and not self.args.dry:
            code, verdict = EXIT_NO_GPU, "NO GPU: only the dry run ran (pass --dry to ask for it)"
        elif self.dry:
            code, verdict = EXIT_OK, "DRY RUN OK (plumbing only: nothing was measured)"
        else:
            unchecked = [s["name"] for s in self.steps if s["kind"] == "correctness" and s["status"] != "passed"]
            unfinished = [s["name"] for s in self.steps if s["status"] == "incomplete"]
            code = EXIT_OK
            if unfinished:
                verdict = f"INCOMPLETE (no failure found, but not finished: {', '.join(unfinished)})"
            else:
                verdict = "PASS" + (f" (not checked: {', '.join(unchecked)})" if unchecked else "")
        self.report.update(steps=self.steps, verdict=verdict, exit_code=code,
                           elapsed_s=round(_now() - self.t0, 1))
        summary = self.summary()
        with open(os.path.join(self.out, "summary.txt"), "w") as f:
            f.write(summary + "\n")
        with open(os.path.join(self.logs, "summary.txt"), "w") as f:
            f.write(summary + "\n")
        self.report["files"] = {n: os.path.exists(os.path.join(self.out, n)) for n in OUT_FILES}
        self.report["files"]["gpu_check.json"] = True
        with open(os.path.join(self.out, "gpu_check.json"), "w") as f:
            json.dump(self.report, f, indent=1, default=str)
        self.pack_logs()
        print(summary, flush=True)
        return code

    def summary(self) -> str:
        e = self.report.get("env", {})
        dev = e.get("device_name") or "no CUDA device"
        extra = []
        if e.get("capability"):
            extra.append(f"sm_{e['capability'].replace('.', '')}")
        if e.get("sm_count"):
            extra.append(f"{e['sm_count']} SMs")
        if e.get("gpu_mem_gib"):
            extra.append(f"{e['gpu_mem_gib']} GiB")
        lines = [f"ddpm_fast gpucheck: {dev}{' (' + ', '.join(extra) + ')' if extra else ''}, driver "
                 f"{e.get('driver', '?')}, torch {e.get('torch', '?')} (CUDA {e.get('torch_cuda')}), "
                 f"triton {e.get('triton')}",
                 f"runtime {e.get('runtime', '?')}, {e.get('cores', '?')} cores; mode {self.report.get('mode')}; "
                 f"{_fmt_s(_now() - self.t0)} of a {_fmt_s(self.args.budget)} budget; out {self.out}",
                 "", f"{'step':12s} {'status':11s} {'time':>6s}  detail"]
        for s in self.steps:
            status = s["status"].upper() if s["status"] in ("failed", "error", "timeout") else s["status"]
            lines.append(f"{s['name']:12s} {status:11s} {_fmt_s(s['seconds']):>6s}  {s['reason'][:150]}")
        lines += ["", "targets:"]
        for t in self.report.get("targets", []):
            lines.append(f"  [{t['verdict']}] {t['text'][:160]}")
        for n in self.report.get("bench_notes") or []:
            lines.append(f"  note: {n}")
        for n in self.report.get("notes") or []:
            lines.append(f"  note: {n}")
        lines += ["", f"verdict: {self.report.get('verdict')} (exit {self.report.get('exit_code')})"]
        return "\n".join(lines)


def gpu_test_files() -> List[str]:
    """The test files of tests/ (not tests/triton: its own lane) that mention CUDA or a GPU at all,
    relative to the repository: what the GPU lane collects before selecting tests inside them."""
    out = []
    for path in sorted(glob.glob(os.path.join(ROOT, "tests", "test_*.py"))):
        try:
            with open(path, errors="replace") as f:
                if GPU_NAME.search(f.read()):
                    out.append(os.path.relpath(path, ROOT))
        except OSError:
            pass
    return out or ["tests", "--ignore=tests/triton"]


def source_digest() -> str:
    """sha256 over the sources that decide the results (the device copy of the tree has no .git)."""
    h = hashlib.sha256()
    pats = ["csrc/**/*", "ddpm_fast/**/*.py", "setup.py", "pyproject.toml", "tests/**/*.py"]
    files = sorted({f for p in pats for f in glob.glob(os.path.join(ROOT, p), recursive=True) if os.path.isfile(f)})
    for f in files:
        h.update(os.path.relpath(f, ROOT).encode())
        with open(f, "rb") as fh:
            h.update(fh.read())
    return h.hexdigest()[:16]


# --------------------------------------------------------------------------------------------
# the subsets (run inside child processes: under compute-sanitizer, ncu, or alone)
# --------------------------------------------------------------------------------------------
def _subset_parity(kind: str) -> int:
    """A small parity subset on CUDA for every library backend there: odd shapes (no multiple of a
    block or of 4), each op against the reference, and a row with an out-of-range device ``t``
    (NaN, and no read outside the table: what memcheck watches). ``racecheck``: the reductions."""
    import torch

    import ddpm_fast as F
    if not torch.cuda.is_available():
        print("SUBSET SKIPPED: no CUDA device")
        return 3
    backs = [b for b in ("native", "triton") if F.backends()[b]["available"].get("cuda")]
    if not backs:
        print("SUBSET SKIPPED: no library backend available on CUDA: "
              + "; ".join(f"{b}: {F.backends()[b]['reason']}" for b in ("native", "triton")))
        return 3
    dev = torch.device("cuda")
    S = F.NoiseSchedule.from_name("linear", 1000)
    g = torch.Generator().manual_seed(0)
    bad, n = [], 0

    def rnd(*shape, dtype=torch.float32):
        return torch.randn(*shape, generator=g).to(dtype).to(dev)

    def T(*v):
        return torch.tensor(v, dtype=torch.int64, device=dev)

    def check(name, got, want, tol):
        nonlocal n
        n += 1
        got = got[0] if isinstance(got, tuple) else got
        want = want[0] if isinstance(want, tuple) else want
        gd, wd = got.detach().double().cpu(), want.detach().double().cpu()
        ok = gd.shape == wd.shape and torch.equal(torch.isnan(gd), torch.isnan(wd))
        if ok:
            fin = ~torch.isnan(wd)
            ok = bool(((gd[fin] - wd[fin]).abs() <= tol[1] + tol[0] * wd[fin].abs()).all())
        if not ok:
            bad.append(name)
            print(f"MISMATCH {name}")

    tols = {torch.float32: (1e-5, 1e-5), torch.bfloat16: (2.0 ** -7, 1e-5)}
    for b in backs:
        for dt in (torch.float32, torch.bfloat16):
            tol = tols[dt]
            shape = (3, 5, 7, 9)
            x0, mo, xt = rnd(*shape, dtype=dt).clamp(-1, 1), rnd(*shape, dtype=dt), rnd(*shape, dtype=dt)
            t = T(999, 0, 437)
            both = lambda fn, *a, **k: (fn(*a, backend=b, **k), fn(*a, backend="reference", **k))  # noqa: E731
            if kind == "memcheck":
                check(f"{b} gaussian_noise", F.gaussian_noise((7, 13), 5, offset=3, device=dev, backend=b),
                      F.gaussian_noise((7, 13), 5, offset=3, device=dev, backend="reference"), tols[torch.float32])
                check(f"{b} q_sample {dt}", *both(F.q_sample, x0, t, S, seed=T(1, 2, 3), offset=4), tol)
                mo2 = torch.cat([mo, (torch.rand(shape, generator=g) * 2 - 1).to(dt).to(dev)], 1)
                check(f"{b} ddpm_step learned_range {dt}",
                      *both(F.ddpm_step, mo2, t, xt, S, variance_type="learned_range", seed=7, offset=1,
                            return_x0=True),
                      tol)
                check(f"{b} ddpm_step guidance {dt}",
                      *both(F.ddpm_step, torch.cat([mo, xt], 0), t, xt, S, guidance_scale=3.0, seed=2, offset=9), tol)
                check(f"{b} ddim_step eta {dt}", *both(F.ddim_step, mo, t, xt, S, prev_t=t - 1, eta=0.7, seed=3), tol)
                check(f"{b} ddim_reverse_step {dt}",
                      *both(F.ddim_reverse_step, mo, T(10, 0, 400), xt, S, next_t=T(20, 5, 450)), tol)
                # an out-of-range device t: a NaN row, no read outside the table
                check(f"{b} q_sample t out of range {dt}",
                      torch.ops.ddpm_fast_triton.q_sample(x0, T(5, 1000, 10 ** 12), S.table(dev), None, T(1), T(0))
                      if b == "triton" else
                      torch.ops.ddpm_fast.q_sample(x0, T(5, 1000, 10 ** 12), S.table(dev), None, T(1), T(0)),
                      torch.cat([F.q_sample(x0[:1], T(5), S, seed=1, backend="reference"),
                                 torch.full_like(x0[1:], float("nan"))]), tol)
            if kind in ("memcheck", "racecheck"):
                # the reductions: per-row loss sums (forward and backward), the VLB, thresholding's quantile
                m1, m2 = mo.clone().requires_grad_(), mo.clone().requires_grad_()
                l1 = F.diffusion_loss(m1, x0, t, S, target="v_prediction", snr_gamma=5.0, seed=T(4, 5, 6),
                                      reduction="none", backend=b)
                l2 = F.diffusion_loss(m2, x0, t, S, target="v_prediction", snr_gamma=5.0, seed=T(4, 5, 6),
                                      reduction="none", backend="reference")
                check(f"{b} diffusion_loss {dt}", l1, l2, (1e-5, 1e-5))
                l1.sum().backward()
                l2.sum().backward()
                check(f"{b} diffusion_loss grad {dt}", m1.grad, m2.grad, tol)
                long_x0 = rnd(2, 2, 70001).clamp(-1, 1)
                long_mo = rnd(2, 4, 70001)
                check(f"{b} vlb_loss long rows", *both(F.vlb_loss, long_mo, long_x0, rnd(2, 2, 70001), T(0, 900), S,
                                                       reduction="none"), (1e-5, 1e-5))
                check(f"{b} ddpm_step thresholding {dt}",
                      *both(F.ddpm_step, mo, t, xt, S, thresholding=True, sample_max_value=2.5, seed=1), tol)
    torch.cuda.synchronize()
    if bad:
        print(f"SUBSET FAILED {len(bad)} of {n} checks: {', '.join(bad)}")
        return 1
    print(f"SUBSET PASSED {n} checks on {', '.join(backs)}")
    return 0


def _subset_ncu() -> int:
    import torch

    import ddpm_fast as F
    if not torch.cuda.is_available():
        print("no CUDA device")
        return 3
    S = F.NoiseSchedule.from_name("linear", 1000)
    x0 = torch.randn(64, 4, 256, 256, device="cuda")
    t = torch.randint(0, 1000, (64,), device="cuda")
    backs = [b for b in ("native", "triton") if F.backends()[b]["available"].get("cuda")]
    for b in backs:   # warm-up: module load, Triton's compile and autotuning
        for _ in range(3):
            F.q_sample(x0, t, S, seed=1, offset=2, backend=b)
    torch.cuda.synchronize()
    for b in backs:   # one launch each inside the range ncu filters on
        torch.cuda.nvtx.range_push("ncu-profile")
        F.q_sample(x0, t, S, seed=1, offset=2, backend=b)
        torch.cuda.nvtx.range_pop()
    torch.cuda.synchronize()
    print(f"profiled q_sample on {', '.join(backs) or 'no backend'}")
    return 0 if backs else 3


def _subset_sampling(out_dir: str) -> int:
    """``sample()``'s cost per step, with and without the CUDA graph: the difference of a long and a
    short run (setup and capture cancel), median of three, a 1x1-convolution model (launch-bound:
    what the graph is for)."""
    import torch

    import ddpm_fast as F
    if not torch.cuda.is_available():
        print("no CUDA device")
        return 3
    res = {}
    S = F.NoiseSchedule.from_name("linear", 1000)
    for shape in ((4, 4, 64, 64), (64, 4, 64, 64)):
        model = torch.nn.Conv2d(shape[1], shape[1], 1).cuda()
        per = {}
        for graph in (False, True):
            def run(n):
                torch.cuda.synchronize()
                t0 = time.perf_counter()
                with torch.no_grad():
                    F.sample(model, shape, S, n, seed=3, progress=False, cuda_graph=graph)
                torch.cuda.synchronize()
                return time.perf_counter() - t0
            run(10)  # warm-up: kernels, Triton/graph setup
            samples = sorted((run(210) - run(10)) / 200 for _ in range(3))
            per[graph] = samples[1] * 1e6
        key = "x".join(map(str, shape)) + " fp32"
        res[key] = {"eager_us": per[False], "graph_us": per[True], "model": "Conv2d 1x1",
                    "steps": "(T(210 steps) - T(10 steps)) / 200, median of 3", "schedule": "linear, DDPM"}
        print(f"{key}: {per[True]:.1f} us/step with the graph, {per[False]:.1f} us eager")
    with open(os.path.join(out_dir, "sampling.json"), "w") as f:
        json.dump({"results": res, "device": torch.cuda.get_device_name(0)}, f, indent=1)
    return 0


# --------------------------------------------------------------------------------------------
# CLI
# --------------------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m ddpm_fast gpucheck",
                                description=__doc__.split("\n\n")[0],
                                epilog="Exit status: 0 pass (or --dry ok), 1 a correctness step failed, 2 usage, "
                                       "3 no GPU (the dry run ran instead), 130 stopped by a signal. "
                                       "See docs/gpu.md.")
    p.add_argument("out_pos", nargs="?", metavar="OUT", help="output folder (or --out)")
    p.add_argument("--out", help="output folder: summary.txt, gpu_check.json, bench.json/png, ncu.csv, logs.tar.gz")
    p.add_argument("--dry", action="store_true", help="check the plumbing only, on any machine (CI runs this)")
    p.add_argument("--budget", type=float, default=480.0, help="seconds for the whole run (default 480: 8 minutes)")
    p.add_argument("--only", nargs="+", metavar="STEP", help=f"run only these steps, of: {' '.join(STEPS)}")
    p.add_argument("--skip", nargs="+", metavar="STEP", help="skip these steps")
    p.add_argument("--arch", help="TORCH_CUDA_ARCH_LIST for the build (default: the device's capability)")
    p.add_argument("--max-jobs", type=int, help="MAX_JOBS for the build (default: the cores)")
    p.add_argument("--build-cmd", help="the build command (default: python setup.py build_ext --inplace)")
    p.add_argument("--wheels", help="folder of wheels to install first (default: .whl/ in the repository)")
    p.add_argument("--work", help="folder for the raw logs (default: a new folder under the temp dir)")
    p.add_argument("--no-collect", action="store_true", help="dry mode: do not collect the GPU tests")
    p.add_argument("--subset", choices=("memcheck", "racecheck", "ncu", "sampling"), help=argparse.SUPPRESS)
    return p


def main(argv: Optional[Sequence[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:
        return EXIT_USAGE if e.code not in (0, None) else EXIT_OK
    if args.subset:
        if args.subset in ("memcheck", "racecheck"):
            return _subset_parity(args.subset)
        if args.subset == "ncu":
            return _subset_ncu()
        return _subset_sampling(args.out or tempfile.gettempdir())
    if args.out and args.out_pos and os.path.abspath(args.out) != os.path.abspath(args.out_pos):
        parser.print_usage(sys.stderr)
        print("give the output folder once (OUT or --out)", file=sys.stderr)
        return EXIT_USAGE
    args.out = args.out or args.out_pos
    if not (os.path.isfile(os.path.join(ROOT, "setup.py")) and os.path.isdir(os.path.join(ROOT, "tests"))):
        print(f"gpucheck runs from a source checkout (it builds csrc/ and runs tests/); {ROOT} is an installed "
              "package: run benchmarks/gpu_check.sh from the repository root", file=sys.stderr)
        return EXIT_USAGE
    if not args.out:
        parser.print_usage(sys.stderr)
        print("an output folder is required: python -m ddpm_fast gpucheck --out DIR (on the device tool: "
              "--out \"$OUT\")", file=sys.stderr)
        return EXIT_USAGE
    for flag in ("only", "skip"):
        for s in getattr(args, flag) or []:
            if s not in STEPS:
                print(f"--{flag}: unknown step {s!r}; the steps are: {' '.join(STEPS)}", file=sys.stderr)
                return EXIT_USAGE
    if not (30 <= args.budget <= 3600):
        print(f"--budget must be between 30 and 3600 seconds, got {args.budget:g}", file=sys.stderr)
        return EXIT_USAGE
    if args.max_jobs is not None and args.max_jobs < 1:
        print(f"--max-jobs must be >= 1, got {args.max_jobs}", file=sys.stderr)
        return EXIT_USAGE
    if args.out and os.path.exists(args.out) and not os.path.isdir(args.out):
        print(f"--out {args.out!r} exists and is not a folder", file=sys.stderr)
        return EXIT_USAGE
    args.argv = argv
    return Check(args).run()


if __name__ == "__main__":
    sys.exit(main())
