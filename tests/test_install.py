"""Installing ddpm_fast ends with its kernels, and a second install does not recompile them.

Fast checks of the builder (``ddpm_fast/_build.py``) and the loader (``ddpm_fast/backends/native/__init__.py``):
one source list, the sources' hash and mirror, the reasons given when the kernels are missing or
failed, a first-use build that fails loudly, a CUDA failure that keeps the CPU kernels.

Two install lanes (CI only, see tests/_install_helpers.py), in one fresh venv with the current pip and
setuptools, on a copy of the working tree:
* README command 1 exactly as written (torch 2.13.0, ``pip install -e ".[plot]"`` with pip's build
  isolation, the demo), which builds the kernels at first use; then command 2's install step, which
  must not recompile them;
* ``python -m build`` (sdist, and the wheel built from it), whose wheel replaces the editable install
  and passes a smoke test from outside the tree.
"""
import glob
import json
import os
import re
import shutil
import subprocess
import sys
import sysconfig
import tarfile
import zipfile

import pytest
import torch

import ddpm_fast
from ddpm_fast import _build
from ddpm_fast.backends import native as _native_backend

from _install_helpers import ROOT, SKIP_LANES, Lane, copy_tree

CSRC = os.path.join(ROOT, "csrc")


# ---- one source list, one version --------------------------------------------------------------
def test_manifest_lists_every_source_and_only_existing_ones():
    m = _build.manifest(CSRC)
    listed = [p for key in ("cpu_kernels", "torch_cpu", "cuda_kernels", "torch_cuda") for p in m[key]]
    for p in listed:
        assert os.path.isfile(os.path.join(CSRC, p)), f"csrc/sources.txt lists a missing file: {p}"
    compiled = [f for f in _build.source_files(CSRC) if f.endswith((".cpp", ".cc", ".cu"))]
    assert sorted(compiled) == sorted(listed), "every compiled source under csrc/ (but bench/) is in csrc/sources.txt"
    assert "-O3" in m["cxx_flag"] and not any(f.startswith("-std") or "fast-math" in f for f in m["cxx_flag"] + m["cuda_flag"])


def test_sources_and_version_are_not_duplicated():
    with open(os.path.join(ROOT, "setup.py")) as f:
        setup_py = f.read()
    with open(os.path.join(ROOT, "CMakeLists.txt")) as f:
        cmake = f.read()
    with open(os.path.join(ROOT, "pyproject.toml")) as f:
        pyproject = f.read()
    for src in _build.manifest(CSRC)["cpu_kernels"]:
        assert src not in setup_py and src not in cmake, f"{src} is listed outside csrc/sources.txt"
    assert "csrc/sources.txt" in cmake
    assert re.search(r'version\s*=\s*\{\s*attr\s*=\s*"ddpm_fast.__version__"', pyproject)
    assert not re.search(r"version\s*=\s*['\"]\d", setup_py)
    assert _build.version() == ddpm_fast.__version__


def test_sources_hash_and_mirror(tmp_path):
    src = str(tmp_path / "csrc")
    shutil.copytree(CSRC, src)
    sha = _build.sources_sha(src)
    assert sha == _build.sources_sha(CSRC)
    dest = str(tmp_path / "mirror")
    _build.mirror(src, dest)
    assert _build.source_files(dest) == _build.source_files(src)
    kept = os.path.join(dest, "cpu", "dispatch.cpp")
    os.utime(kept, (1_000_000, 1_000_000))
    with open(os.path.join(src, "torch", "op_args.h"), "a") as f:
        f.write("\n// changed\n")
    os.remove(os.path.join(src, "cpu", "vec_math.h"))
    assert _build.sources_sha(src) != sha
    _build.mirror(src, dest)
    assert os.stat(kept).st_mtime == 1_000_000, "an unchanged file keeps its mtime (ninja does not recompile it)"
    assert not os.path.exists(os.path.join(dest, "cpu", "vec_math.h")), "a file gone from the sources leaves the mirror"
    with open(os.path.join(dest, "torch", "op_args.h")) as f:
        assert f.read().endswith("// changed\n")


def test_installed_record_decisions():
    sha = "0123456789abcdef"
    base = {"torch_version": torch.__version__, "sources_sha": sha}
    ok_cpu = {"attempted": True, "built": True, "file": "nope.so"}
    _, why = _native_backend._installed(dict(base, torch_version="1.0.0", cpu=ok_cpu), "cpu", sha)
    assert "installed for torch 1.0.0" in why
    _, why = _native_backend._installed(dict(base, cpu=ok_cpu), "cpu", "fedcba9876543210")
    assert "sources changed" in why
    _, why = _native_backend._installed(dict(base, cpu={"attempted": True, "built": False, "error": "boom"}), "cpu", sha)
    assert why.startswith("its build at install failed") and "boom" in why
    _, why = _native_backend._installed(dict(base, cuda={"attempted": False, "why": "torch has no CUDA"}), "cuda", sha)
    assert why == "torch has no CUDA"
    # a library whose record predates source hashes (or no record at all) is not trusted where the
    # sources are at hand: it may be older than them (a stale copy ran old kernels silently)
    old = {"torch_version": torch.__version__, "built": True}
    _, why = _native_backend._installed(old, "cpu", sha)
    assert "does not say which sources" in why
    _, why = _native_backend._installed({}, "cpu", sha)
    assert why


def _package_copy(tmp_path, *, with_library):
    """ddpm_fast's Python files and csrc/ in a temp tree (a checkout without build products)."""
    tree = tmp_path / "tree"
    shutil.copytree(os.path.join(ROOT, "ddpm_fast"), tree / "ddpm_fast",
                    ignore=shutil.ignore_patterns("*.so", "_native_build.json", "__pycache__", "_csrc"))
    shutil.copytree(CSRC, tree / "csrc")
    if with_library:
        origin = _native_backend.build_info().get("origin", {})
        lib = origin.get("cpu_library")
        if not lib:
            pytest.skip(f"the native CPU kernels are unavailable here: {_native_backend._state['reason']}")
        shutil.copy2(lib, tree / "ddpm_fast" / ("_C" + sysconfig.get_config_var("EXT_SUFFIX")))
    return tree


def _run_py(tree, code, env=None, cwd=None):
    full_env = dict(os.environ, PYTHONPATH=str(tree), **(env or {}))
    full_env.pop("DDPM_FAST_BACKEND", None)
    return subprocess.run([sys.executable, "-c", code], cwd=cwd or str(tree), env=full_env, stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True, timeout=600)


def test_missing_kernels_with_jit_refused_say_how_to_get_them(tmp_path):
    tree = _package_copy(tmp_path, with_library=False)
    env = {"DDPM_FAST_NO_JIT": "1", "DDPM_FAST_CACHE": str(tmp_path / "cache")}
    proc = _run_py(tree, "import ddpm_fast, json; print(json.dumps(ddpm_fast.backends()['native']))", env)
    assert proc.returncode == 0, proc.stdout
    native = json.loads(proc.stdout.strip().splitlines()[-1])
    assert native["available"] == {"cpu": False, "cuda": False}
    assert "DDPM_FAST_NO_JIT=1" in native["reason"] and "python -m ddpm_fast._build" in native["reason"]
    assert not os.path.exists(tmp_path / "cache"), "nothing was built"
    proc = _run_py(tree, "import sys, ddpm_fast.__main__ as m; sys.exit(m.main(['info']))", env)
    assert proc.returncode == 0, proc.stdout
    assert "to get them" in proc.stdout and "native kernels" in proc.stdout


def test_failed_first_use_build_is_loud_and_built_once(tmp_path):
    """Two processes start on a tree whose build fails (a listed source is missing): one builds
    (the lock holds the other, which then finds the recorded failure), both report it loudly, and a
    third process does not retry the same sources."""
    tree = _package_copy(tmp_path, with_library=False)
    with open(tree / "csrc" / "sources.txt", "a") as f:
        f.write("torch_cpu    torch/no_such_file.cpp\n")
    env = dict(os.environ, PYTHONPATH=str(tree), DDPM_FAST_CACHE=str(tmp_path / "cache"))
    env.pop("DDPM_FAST_BACKEND", None)
    code = ("import warnings, json, ddpm_fast\n"
            "with warnings.catch_warnings(record=True) as w:\n"
            "    warnings.simplefilter('always')\n"
            "    b = ddpm_fast.backends()['native']\n"
            "print(json.dumps({'native': b, 'warnings': [str(x.message) for x in w]}))")
    procs = [subprocess.Popen([sys.executable, "-c", code], cwd=str(tree), env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True) for _ in range(2)]
    outs = [p.communicate(timeout=600)[0] for p in procs]
    assert all(p.returncode == 0 for p in procs), outs
    assert sum("building the native CPU kernels" in o for o in outs) == 1, outs
    for o in outs:
        res = json.loads(o.strip().splitlines()[-1])
        assert res["native"]["available"]["cpu"] is False
        assert "failed" in res["native"]["reason"], res
        assert any("failed" in w for w in res["warnings"]), "a failed build warns"
    assert any("FAILED to build" in o and "no_such_file.cpp" in o for o in outs), outs
    records = glob.glob(str(tmp_path / "cache" / "*" / "record.json"))
    assert len(records) == 1 and json.load(open(records[0]))["cpu"]["built"] is False
    again = _run_py(tree, code, {"DDPM_FAST_CACHE": str(tmp_path / "cache")})
    assert "building the native" not in again.stdout, again.stdout
    assert json.loads(again.stdout.strip().splitlines()[-1])["native"]["available"]["cpu"] is False


def test_cuda_failure_keeps_the_cpu_kernels(tmp_path):
    """An install whose CUDA part failed (the record says so): the CPU kernels load, the CUDA
    reason names the failure, and ``info`` says FAILED."""
    tree = _package_copy(tmp_path, with_library=True)
    libname = [f for f in os.listdir(tree / "ddpm_fast") if f.startswith("_C") and f.endswith(".so")][0]
    facts = _build.torch_facts()
    record = dict(facts, sources_sha=_build.sources_sha(str(tree / "csrc")), origin="install",
                  cpu={"attempted": True, "built": True, "file": libname},
                  cuda={"attempted": True, "built": False, "error": "nvcc fatal: boom (full output: build.log)"})
    _build.write_json(str(tree / "ddpm_fast" / "_native_build.json"), record)
    env = {"DDPM_FAST_NO_JIT": "1", "DDPM_FAST_CACHE": str(tmp_path / "cache")}
    proc = _run_py(tree, "import ddpm_fast, json; print(json.dumps(ddpm_fast.backends()['native']))", env)
    assert proc.returncode == 0, proc.stdout
    native = json.loads(proc.stdout.strip().splitlines()[-1])
    assert native["available"]["cpu"] is True
    assert native["available"]["cuda"] is False and "failed to build: nvcc fatal: boom" in native["reason"]
    proc = _run_py(tree, "import sys, ddpm_fast.__main__ as m; sys.exit(m.main(['info']))", env)
    assert "CUDA: FAILED" in proc.stdout and "installed with the package" in proc.stdout, proc.stdout


def test_unchanged_sources_are_not_rebuilt():
    """What this process loaded is current: building again compiles nothing (the record says so)."""
    origin = _native_backend.build_info().get("origin")
    if not origin:
        pytest.skip(f"the native CPU kernels are unavailable here: {_native_backend._state['reason']}")
    root = _build.source_root()
    facts = _build.torch_facts()
    bdir = _build.build_dir(root, facts)
    if not _build.part_is_current(_build.read_json(os.path.join(bdir, _build.RECORD)), "cpu", facts,
                                  _build.sources_sha(root)):
        pytest.skip(f"no current build record in {bdir} (kernels copied in by hand?): building now would compile")
    log = os.path.join(bdir, "build.log")
    before = os.path.getmtime(log) if os.path.exists(log) else None
    record = _build.build(root, want_cuda=False, quiet=True)
    assert record["cpu"]["built"]
    after = os.path.getmtime(log) if os.path.exists(log) else None
    assert before == after, "a build of unchanged sources ran the compiler"


# ---- the install lanes -------------------------------------------------------------------------
def readme_command_1():
    with open(os.path.join(ROOT, "README.md")) as f:
        text = f.read()
    section = text.split("## Set-up: two commands", 1)[1]
    block = section.split("```bash", 1)[1].split("```", 1)[0]
    commands = [ln.strip() for ln in block.splitlines() if ln.strip() and not ln.strip().startswith("#")]
    return commands[0]


def test_readme_command_1_installs_and_runs_the_demo():
    cmd = readme_command_1()
    assert "pip install" in cmd and "python -m ddpm_fast demo" in cmd
    assert "--no-build-isolation" not in cmd, "command 1 uses pip's default (isolated) build, what users type"


@pytest.fixture(scope="module")
def lane(tmp_path_factory):
    base = tmp_path_factory.mktemp("install_lane")
    lane = Lane(base).create()
    lane.run("pip/setuptools upgrade", [lane.py, "-m", "pip", "install", "-q", "-U", "pip", "setuptools"])
    lane.pip, lane.setuptools = lane.versions()
    lane.tree = copy_tree(os.path.join(lane.base, "tree"))
    lane.cache = os.path.join(lane.base, "cache")  # a build of its own: nothing is reused from this env
    lane.env["DDPM_FAST_CACHE"] = lane.cache
    yield lane
    print(f"[lane] pip {lane.pip}, setuptools {lane.setuptools}; timings (s): {lane.timings}; CPU (s): {lane.cpu}")
    lane.remove()


def _build_logs(cache):
    out = {}
    for path in glob.glob(os.path.join(cache, "*", "build.log")):
        with open(path, errors="replace") as f:
            out[path] = f.read().count("==== building")
    return out


@SKIP_LANES
def test_lane_readme_command_1_fresh_venv(lane):
    """README command 1 as written, in a fresh venv with the current pip and setuptools, ends with
    the native CPU kernels available (built at the demo's first use)."""
    proc = lane.run("README command 1", readme_command_1(), cwd=lane.tree, shell=True, timeout=2400)
    assert "building the native CPU kernels" in proc.stdout, "the first use builds (one printed notice)"
    assert os.path.exists(os.path.join(lane.tree, "demo_out", "demo.json")), proc.stdout[-3000:]
    check = lane.python("native check", "import ddpm_fast, json; from ddpm_fast.backends import native as n; "
                        "print(json.dumps([ddpm_fast.backends()['native'], n.build_info().get('origin')]))",
                        cwd=lane.tree)
    native, origin = json.loads(check.stdout.strip().splitlines()[-1])
    assert native["available"]["cpu"] is True, native["reason"]
    assert origin["cpu"] == "jit" and origin["cpu_library"].startswith(lane.cache)
    assert _build_logs(lane.cache) and set(_build_logs(lane.cache).values()) == {1}, "built once"


@SKIP_LANES
def test_lane_command_2_install_does_not_recompile(lane):
    """Command 2's install step (editable, against the installed torch) after command 1: nothing is
    compiled again, and the kernels are then installed in the package."""
    if not _build_logs(lane.cache):
        pytest.skip("needs the README command 1 lane")
    before = _build_logs(lane.cache)
    proc = lane.run("command 2 install step", [lane.py, "-m", "pip", "install", "-v", "--no-build-isolation", "-e", "."],
                    cwd=lane.tree)
    assert _build_logs(lane.cache) == before, "command 2's install recompiled:\n" + proc.stdout[-4000:]
    check = lane.python("native check 2", "import ddpm_fast; from ddpm_fast.backends import native as n; "
                        "print(ddpm_fast.backends()['native']['available']['cpu'], n.build_info()['origin']['cpu'])",
                        cwd=lane.tree)
    assert check.stdout.split()[-2:] == ["True", "installed"], check.stdout


@SKIP_LANES
def test_lane_sdist_and_wheel_build_install_and_smoke(lane):
    """``python -m build``: an sdist and a pure wheel (built from the sdist) holding the sources; the
    wheel installed in place of the editable install passes a smoke test outside the tree."""
    if not _build_logs(lane.cache):
        pytest.skip("needs the README command 1 lane")
    lane.run("pip install build", [lane.py, "-m", "pip", "install", "-q", "build"])
    dist = os.path.join(lane.base, "dist")
    lane.run("python -m build", [lane.py, "-m", "build", "--outdir", dist, lane.tree], cwd=lane.base, timeout=900)
    wheels, sdists = glob.glob(os.path.join(dist, "*.whl")), glob.glob(os.path.join(dist, "*.tar.gz"))
    assert len(wheels) == 1 and len(sdists) == 1, os.listdir(dist)
    assert wheels[0].endswith("-py3-none-any.whl"), "built without torch: pure Python, the kernels at first use"
    names = set(zipfile.ZipFile(wheels[0]).namelist())
    for rel in _build.source_files(CSRC):
        assert f"ddpm_fast/_csrc/{rel}" in names, f"the wheel lacks the source {rel}"
    assert not any(n.endswith(".so") for n in names)
    with tarfile.open(sdists[0]) as tar:
        members = {m.name.split("/", 1)[1] for m in tar.getmembers() if "/" in m.name}
    for rel in ("pyproject.toml", "setup.py", "csrc/sources.txt", "CMakeLists.txt", "ddpm_fast/_build.py"):
        assert rel in members, f"the sdist lacks {rel}"

    before = _build_logs(lane.cache)
    lane.run("uninstall editable", [lane.py, "-m", "pip", "uninstall", "-y", "ddpm_fast"])
    lane.run("install wheel", [lane.py, "-m", "pip", "install", "--no-deps", wheels[0]])
    smoke = ("import ddpm_fast, torch, json; from ddpm_fast.backends import native as n\n"
             "s = ddpm_fast.NoiseSchedule.from_name('linear', 100); x0 = torch.randn(4, 3, 5)\n"
             "a = ddpm_fast.q_sample(x0, torch.tensor([0, 10, 50, 99]), s, seed=3, backend='native')\n"
             "b = ddpm_fast.q_sample(x0, torch.tensor([0, 10, 50, 99]), s, seed=3, backend='reference')\n"
             "torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)\n"
             "print(json.dumps([ddpm_fast.__file__, ddpm_fast.backends()['native'], n.build_info()['origin']]))")
    out = lane.python("wheel smoke", smoke, cwd=lane.base)
    where, native, origin = json.loads(out.stdout.strip().splitlines()[-1])
    assert "site-packages" in where, where
    assert native["available"]["cpu"] is True, native["reason"]
    # the wheel's sources are the tree's (same hash): the same build, reused from the shared cache
    assert origin["cpu"] == "jit" and _build_logs(lane.cache) == before
    lane.run("wheel info", [lane.py, "-m", "ddpm_fast", "info"], cwd=lane.base)
