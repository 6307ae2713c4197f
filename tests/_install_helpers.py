"""Helpers of the install lanes (tests/test_install.py, tests/test_cuda_build.py): a copy of the
working tree, fresh virtual environments, commands with their output kept for the failure message.

The lanes install the project for real (minutes each), so they run where ``CI=true`` (CI's
environment) or ``DDPM_FAST_INSTALL_LANES=1``, and skip with that reason elsewhere.
"""
import os
import resource
import shutil
import subprocess
import sys
import time

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LANES_ON = os.environ.get("CI", "").lower() == "true" or os.environ.get("DDPM_FAST_INSTALL_LANES") == "1"
SKIP_LANES = pytest.mark.skipif(not LANES_ON, reason="install lanes run in CI (CI=true) or with "
                                                      "DDPM_FAST_INSTALL_LANES=1: each installs into a fresh venv (minutes)")
_IGNORE = shutil.ignore_patterns(".git", "build", "dist", "demo_out", "prof_out", "*.so", "*.egg-info", "__pycache__",
                                 ".pytest_cache", ".benchmarks", "_native_build.json", "_csrc")


def copy_tree(dest):
    """The working tree as committed plus untracked, not ignored files (what a clone would hold,
    with the work in progress), without build products."""
    try:
        out = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=ROOT,
                             stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, check=True).stdout
        files = [f for f in out.decode().split("\0") if f and os.path.isfile(os.path.join(ROOT, f))]
    except (OSError, subprocess.CalledProcessError):
        files = None
    if not files:  # no git: everything but the build products
        shutil.copytree(ROOT, dest, ignore=_IGNORE)
        return dest
    for f in files:
        os.makedirs(os.path.join(dest, os.path.dirname(f)), exist_ok=True)
        shutil.copy2(os.path.join(ROOT, f), os.path.join(dest, f))
    return dest


class Lane:
    """A venv and the commands run in it (output kept; ``timings`` in seconds per step)."""

    def __init__(self, base):
        self.base = str(base)
        self.venv = os.path.join(self.base, "venv")
        self.py = os.path.join(self.venv, "bin", "python")
        self.timings = {}  # wall seconds per step
        self.cpu = {}  # CPU seconds (user + system, all descendants) per step: the machine's load does not inflate them
        self.env = dict(os.environ)
        for var in ("PYTHONPATH", "DDPM_FAST_SKIP_NATIVE", "DDPM_FAST_NO_JIT", "PIP_REQUIRE_VIRTUALENV",
                    "VIRTUAL_ENV", "DDPM_FAST_BACKEND", "TRITON_INTERPRET"):
            self.env.pop(var, None)
        self.env["PATH"] = os.path.join(self.venv, "bin") + os.pathsep + os.environ.get("PATH", "")
        self.env["VIRTUAL_ENV"] = self.venv
        self.env["PIP_DISABLE_PIP_VERSION_CHECK"] = "1"
        self.env["MPLBACKEND"] = "Agg"

    def create(self):
        self.run("venv", [sys.executable, "-m", "venv", self.venv])
        return self

    def run(self, step, cmd, *, cwd=None, env=None, timeout=1800, check=True, shell=False):
        t0, c0 = time.time(), _children_cpu()
        proc = subprocess.run(cmd, cwd=cwd or self.base, env=dict(self.env, **(env or {})), shell=shell,
                              executable="/bin/bash" if shell else None, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True, timeout=timeout)
        self.timings[step] = round(time.time() - t0, 1)
        self.cpu[step] = round(_children_cpu() - c0, 1)
        print(f"[lane] {step}: {self.timings[step]} s wall, {self.cpu[step]} s CPU (exit {proc.returncode})")
        if check and proc.returncode != 0:
            pytest.fail(f"{step}: {cmd if shell else ' '.join(cmd)} exited {proc.returncode}:\n{proc.stdout[-8000:]}")
        return proc

    def python(self, step, code, *, cwd=None, env=None, timeout=900, check=True):
        return self.run(step, [self.py, "-c", code], cwd=cwd, env=env, timeout=timeout, check=check)

    def versions(self):
        out = self.python("versions", "from importlib.metadata import version as v; print(v('pip'), v('setuptools'))")
        pip_v, st_v = out.stdout.split()[-2:]
        return pip_v, st_v

    def remove(self):
        shutil.rmtree(self.base, ignore_errors=True)


def _children_cpu():
    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


def last_lines(path, n=60):
    try:
        with open(path, errors="replace") as f:
            return "".join(f.readlines()[-n:])
    except OSError:
        return f"({path} not found)"
