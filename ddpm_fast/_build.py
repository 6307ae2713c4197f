"""The one builder of the native extension, used at install (``setup.py``) and at first use (JIT).

Two libraries are built from ``csrc/`` (listed in ``csrc/sources.txt``) with
:func:`torch.utils.cpp_extension.load` (ninja):

* ``_C``: the op schemas, the CPU kernels and autograd (always, wherever a C++ compiler is found);
* ``_C_cuda``: the CUDA kernels, registered for the CUDA dispatch key (where torch has CUDA and nvcc
  is found). It is a separate library so that a CUDA failure leaves the CPU kernels built.

Each build lives in a persistent folder per torch build, ``<root>/<tag>/`` (tag: torch's version
and commit, and the Python version), so a rebuild recompiles only the sources that
changed, and an unchanged tree is not rebuilt at all (a record of the sources' hash says so).
``<root>`` is ``$DDPM_FAST_CACHE`` if set, else ``build/native`` of a source checkout, else
``~/.cache/ddpm_fast`` (``$XDG_CACHE_HOME``) for an installed wheel, whose sources ship inside the
package as ``ddpm_fast/_csrc``. The sources are mirrored into ``<tag>/src`` before each build, so
the same tree from a checkout or from a wheel yields the same ninja commands; the compiler's
messages name ``<tag>/src/<path>``, which is ``csrc/<path>``. A file lock makes parallel processes
build once. The build runs in a child Python process whose output goes to ``<tag>/build.log``.

Environment: ``DDPM_FAST_CACHE`` (build root), ``DDPM_FAST_NO_JIT=1`` (never build at first use),
``DDPM_FAST_SKIP_CUDA=1`` / ``DDPM_FAST_FORCE_CUDA=1`` (leave out / insist on the CUDA part),
``MAX_JOBS`` and ``TORCH_CUDA_ARCH_LIST`` (read by torch's builder), ``CUDA_HOME``.

Command line: ``python -m ddpm_fast._build [--cuda | --no-cuda] [--force] [--json]`` builds now
(what the first use would do) and prints the record.

This module imports only the standard library at load time, so ``setup.py`` can run it by path.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import time
from typing import Dict, List, Optional

PKG_DIR = os.path.dirname(os.path.abspath(__file__))
INSTALLED_RECORD = "_native_build.json"  # written by setup.py next to the installed libraries
RECORD = "record.json"  # written in each build folder after a build
_SOURCE_SUFFIXES = (".h", ".hpp", ".cuh", ".cpp", ".cc", ".cu", ".txt")
_SKIP_DIRS = ("bench",)  # the standalone CUDA benchmark is not part of the extension
_PREFIX = "ddpm_fast:"


def log(msg: str) -> None:
    print(f"{_PREFIX} {msg}", file=sys.stderr, flush=True)


def env_flag(name: str) -> bool:
    return os.environ.get(name, "") not in ("", "0", "false", "False", "no")


def version() -> str:
    """``ddpm_fast.__version__``, read from ``__init__.py`` without importing the package."""
    with open(os.path.join(PKG_DIR, "__init__.py")) as f:
        m = re.search(r'^__version__\s*=\s*["\']([^"\']+)["\']', f.read(), re.M)
    return m.group(1) if m else "unknown"


# ---- the sources -------------------------------------------------------------------------------
def source_root() -> Optional[str]:
    """The native sources: ``ddpm_fast/_csrc`` in an installed wheel, ``csrc/`` of a checkout."""
    for cand in (os.path.join(PKG_DIR, "_csrc"), os.path.join(os.path.dirname(PKG_DIR), "csrc")):
        if os.path.isfile(os.path.join(cand, "sources.txt")):
            return cand
    return None


def is_checkout(root: str) -> bool:
    return os.path.abspath(root) == os.path.join(os.path.dirname(PKG_DIR), "csrc")


def manifest(root: str) -> Dict[str, List[str]]:
    """``csrc/sources.txt`` as ``{key: [values]}``."""
    out: Dict[str, List[str]] = {}
    with open(os.path.join(root, "sources.txt")) as f:
        for line in f:
            line = line.split("#", 1)[0].strip()
            if line:
                key, _, value = line.partition(" ")
                out.setdefault(key, []).append(value.strip())
    return out


def source_files(root: str) -> List[str]:
    """Every file a build may read (sources, headers, the manifest), relative to ``root``."""
    found = []
    for dirpath, dirnames, files in os.walk(root):
        if os.path.abspath(dirpath) == os.path.abspath(root):
            dirnames[:] = [d for d in dirnames if d not in _SKIP_DIRS]
        dirnames.sort()
        for name in sorted(files):
            if name.endswith(_SOURCE_SUFFIXES):
                found.append(os.path.relpath(os.path.join(dirpath, name), root).replace(os.sep, "/"))
    return found


def sources_sha(root: str) -> str:
    """A hash of every source file (names and contents) and the package version."""
    h = hashlib.sha256(version().encode())
    for rel in source_files(root):
        h.update(b"\0" + rel.encode() + b"\0")
        with open(os.path.join(root, rel), "rb") as f:
            h.update(f.read())
    return h.hexdigest()[:16]


def mirror(root: str, dest: str) -> None:
    """Make ``dest`` hold exactly the source files of ``root``; unchanged files keep their mtime,
    so ninja recompiles only what changed (and a file missing from ``root`` fails the build)."""
    wanted = set(source_files(root))
    for rel in wanted:
        src, dst = os.path.join(root, rel), os.path.join(dest, rel)
        with open(src, "rb") as f:
            data = f.read()
        if os.path.exists(dst):
            with open(dst, "rb") as f:
                if f.read() == data:
                    continue
        os.makedirs(os.path.dirname(dst), exist_ok=True)
        with open(dst + ".tmp", "wb") as f:
            f.write(data)
        os.replace(dst + ".tmp", dst)
    for dirpath, _, files in os.walk(dest):
        for name in files:
            rel = os.path.relpath(os.path.join(dirpath, name), dest).replace(os.sep, "/")
            if rel not in wanted:
                os.remove(os.path.join(dirpath, name))


# ---- where and for what ------------------------------------------------------------------------
def torch_facts() -> dict:
    import torch

    return {"torch_version": torch.__version__, "torch_cuda": torch.version.cuda,
            "torch_git": (getattr(torch.version, "git_version", None) or "unknown")[:10],
            "torch_dir": os.path.dirname(os.path.abspath(torch.__file__)),
            "python": f"{sys.version_info.major}.{sys.version_info.minor}",
            "openmp": "OpenMP" in torch.__config__.parallel_info()}


def tag(facts: dict) -> str:
    """One build folder per torch build (version and commit) and Python version: every venv with
    that same torch wheel shares it (their libraries are interchangeable), another torch never."""
    return f"torch{facts['torch_version']}-{facts['torch_git']}-py{facts['python'].replace('.', '')}"


def build_root(root: str) -> str:
    if os.environ.get("DDPM_FAST_CACHE"):
        return os.path.abspath(os.path.expanduser(os.environ["DDPM_FAST_CACHE"]))
    if is_checkout(root):
        return os.path.join(os.path.dirname(PKG_DIR), "build", "native")
    cache = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(cache, "ddpm_fast")


def build_dir(root: str, facts: dict) -> str:
    return os.path.join(build_root(root), tag(facts))


def find_nvcc() -> Optional[str]:
    home = os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH")
    if home and os.path.exists(os.path.join(home, "bin", "nvcc")):
        return os.path.join(home, "bin", "nvcc")
    return shutil.which("nvcc")


def cuda_home(nvcc: str) -> str:
    """The toolkit folder of ``nvcc``. torch guesses ``dirname(dirname(which nvcc))``, wrong when
    nvcc on the PATH is a wrapper (e.g. /usr/local/bin/nvcc running /usr/local/cuda-13.0/bin/nvcc):
    then ``-lcudart`` is looked for in the wrong folder. nvcc's dry run names its own folder."""
    if os.environ.get("CUDA_HOME"):
        return os.environ["CUDA_HOME"]
    try:
        out = subprocess.run([nvcc, "--dryrun", "-c", "-x", "cu", os.devnull, "-o", os.devnull],
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=60).stdout
        m = re.search(r"^#\$ _HERE_=(.+)$", out, re.M)
        if m and os.path.isdir(m.group(1).strip()):
            return os.path.dirname(m.group(1).strip())
    except (OSError, subprocess.SubprocessError):
        pass
    return os.path.dirname(os.path.dirname(os.path.realpath(nvcc)))


def cuda_plan(facts: dict, *, at_install: bool, force: bool = False) -> dict:
    """Whether to build the CUDA part, and why (not). At install it is built wherever torch has
    CUDA and nvcc is found; at first use only where a CUDA device is present too."""
    if env_flag("DDPM_FAST_SKIP_CUDA"):
        return {"build": False, "why": "DDPM_FAST_SKIP_CUDA is set"}
    force = force or env_flag("DDPM_FAST_FORCE_CUDA")
    if not facts["torch_cuda"] and not force:
        return {"build": False, "why": "torch has no CUDA (a CPU build of torch)"}
    nvcc = find_nvcc()
    if nvcc is None:
        return {"build": False, "why": "nvcc was not found (set CUDA_HOME or put nvcc on the PATH)"}
    if not at_install and not force:
        import torch

        if not torch.cuda.is_available():
            return {"build": False, "why": "no CUDA device at first use (DDPM_FAST_FORCE_CUDA=1 builds it anyway)"}
    return {"build": True, "why": "", "nvcc": nvcc, "cuda_home": cuda_home(nvcc),
            "archs": os.environ.get("TORCH_CUDA_ARCH_LIST", "")}


def _site_dirs() -> List[str]:
    import site

    dirs = list(site.getsitepackages()) if hasattr(site, "getsitepackages") else []
    return [d for d in dict.fromkeys(dirs + sys.path) if d and os.path.isdir(d)]


def _cuda_wheel_dirs(sub: str) -> List[str]:
    """``site-packages/nvidia/cu13/<sub>`` (and cu12) of pip's CUDA wheels, where they are."""
    out = []
    for sp in _site_dirs():
        for major in ("cu13", "cu12"):
            d = os.path.join(sp, "nvidia", major, sub)
            if os.path.isdir(d) and d not in out:
                out.append(d)
    return out


def _cuda_flags(plan: dict, bdir: str) -> dict:
    """Include and link folders for a toolkit that lacks what torch's CUDA headers and ``-lcudart``
    need, taken from pip's CUDA wheels: with a partial toolkit (cusparse.h missing) their
    include folder; without a libcudart.so in the toolkit, a link to the wheel's libcudart.so.N
    (the wheels ship only the versioned name, which ``-lcudart`` does not find)."""
    home = plan["cuda_home"]
    includes, ldflags = [], []
    if not os.path.exists(os.path.join(home, "include", "cusparse.h")):
        includes += [d for d in _cuda_wheel_dirs("include") if os.path.exists(os.path.join(d, "cusparse.h"))][:1]
    if not any(os.path.exists(os.path.join(home, d, "libcudart.so")) for d in ("lib64", "lib")):
        for lib in _cuda_wheel_dirs("lib"):
            names = sorted(n for n in os.listdir(lib) if n.startswith("libcudart.so"))
            if names:
                link_dir = os.path.join(bdir, "cudart")
                os.makedirs(link_dir, exist_ok=True)
                link = os.path.join(link_dir, "libcudart.so")
                if os.path.islink(link) or os.path.exists(link):
                    os.remove(link)
                os.symlink(os.path.join(lib, names[-1]), link)
                ldflags += [f"-L{link_dir}", f"-Wl,-rpath,{lib}"]
                break
    return {"include": includes, "ldflags": ldflags}


def _quoted_define(name: str, value: str) -> str:
    # ninja runs the command through the shell: the escaped quotes reach the compiler as quotes
    return f'-D{name}=\\"{value}\\"'


def specs(root: str, facts: dict, cuda: dict, bdir: str) -> Dict[str, dict]:
    """The arguments of torch.utils.cpp_extension.load for each part, from the manifest."""
    m = manifest(root)
    src = os.path.join(bdir, "src")
    defines = [_quoted_define("DDPM_FAST_VERSION", version()),
               _quoted_define("DDPM_FAST_TORCH_VERSION", facts["torch_version"])]
    cxx = list(m.get("cxx_flag", [])) + defines
    if facts["openmp"] and sys.platform.startswith("linux"):
        # at::parallel_for is inline OpenMP code when ATen uses OpenMP: without -fopenmp the glue's
        # loops run on one thread. Compile-only: GOMP_* resolve to the runtime torch already loaded.
        cxx.append("-fopenmp")
    includes = [os.path.join(src, "include"), src]
    out = {"cpu": {"name": "_C", "sources": [os.path.join(src, p) for p in m["cpu_kernels"] + m["torch_cpu"]],
                   "extra_cflags": cxx, "extra_include_paths": includes, "extra_ldflags": [],
                   "build_directory": os.path.join(bdir, "cpu"), "with_cuda": False, "is_python_module": True}}
    if cuda.get("build"):
        extra = _cuda_flags(cuda, bdir)
        nv = list(m.get("cuda_flag", [])) + defines
        out["cuda"] = {"name": "_C_cuda",
                       "sources": [os.path.join(src, p) for p in m["cuda_kernels"] + m["torch_cuda"]],
                       "extra_cflags": cxx, "extra_cuda_cflags": nv,
                       "extra_include_paths": includes + extra["include"], "extra_ldflags": extra["ldflags"],
                       "build_directory": os.path.join(bdir, "cuda"), "with_cuda": True, "is_python_module": False,
                       "env": {"CUDA_HOME": cuda["cuda_home"]}}
    return out


def library_path(spec: dict) -> str:
    return os.path.join(spec["build_directory"], spec["name"] + ".so")


# ---- records -----------------------------------------------------------------------------------
def read_json(path: str) -> dict:
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):
        return {}


def write_json(path: str, data: dict) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path + ".tmp", "w") as f:
        json.dump(data, f, indent=1, sort_keys=True)
    os.replace(path + ".tmp", path)


def installed_record() -> dict:
    return read_json(os.path.join(PKG_DIR, INSTALLED_RECORD))


def part_is_current(record: dict, part: str, facts: dict, sha: Optional[str], cuda: Optional[dict] = None) -> bool:
    """Whether ``record`` holds a usable build (or a failure worth not retrying) of ``part`` for this
    torch and these sources."""
    entry = record.get(part) or {}
    if (record.get("torch_version"), record.get("torch_git", facts["torch_git"])) != (
            facts["torch_version"], facts["torch_git"]) or not entry.get("attempted"):
        return False
    if sha is not None and record.get("sources_sha") not in (None, sha):
        return False
    if part == "cuda" and cuda is not None and entry.get("archs", "") != cuda.get("archs", ""):
        return False
    return not entry.get("built") or os.path.exists(entry.get("path", ""))


@contextlib.contextmanager
def _lock(path: str):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "a") as f:
        try:
            import fcntl
        except ImportError:  # no flock (Windows): builds are not serialised
            yield
            return
        fcntl.flock(f, fcntl.LOCK_EX)  # released by the kernel if this process dies
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _build_part(spec: dict, logfile: str) -> dict:
    """Run torch's ninja build of one part in a child process; ``{"built", "seconds", "error"}``."""
    os.makedirs(spec["build_directory"], exist_ok=True)
    stale = os.path.join(spec["build_directory"], "lock")  # torch's own baton, left by a killed build
    if os.path.exists(stale):
        os.remove(stale)  # safe: we hold the build folder's lock
    spec_file = os.path.join(spec["build_directory"], "spec.json")
    write_json(spec_file, spec)
    env = dict(os.environ, **spec.get("env", {}))
    # pip's ninja (a dependency) sits next to this interpreter, on the PATH only in an activated venv
    env["PATH"] = os.pathsep.join([os.path.dirname(sys.executable), env.get("PATH", "")])
    # run this file by path from the build folder: the package (whose triton/ would shadow the
    # real triton) is not on the child's sys.path, and only the standard library and torch load
    code = ("import importlib.util as u, sys; s = u.spec_from_file_location('ddpm_fast_build', sys.argv[1]); "
            "m = u.module_from_spec(s); s.loader.exec_module(m); sys.exit(m._child(sys.argv[2]))")
    t0 = time.time()
    with open(logfile, "a") as out:
        out.write(f"\n==== building {spec['name']} ({time.strftime('%Y-%m-%d %H:%M:%S')})\n")
        out.flush()
        rc = subprocess.call([sys.executable, "-c", code, os.path.abspath(__file__), spec_file],
                             stdout=out, stderr=subprocess.STDOUT, env=env, cwd=spec["build_directory"])
    seconds = round(time.time() - t0, 1)
    if rc == 0 and os.path.exists(library_path(spec)):
        return {"built": True, "seconds": seconds, "error": None}
    return {"built": False, "seconds": seconds, "error": _error_summary(logfile, rc)}


def _error_summary(logfile: str, rc: int) -> str:
    try:
        with open(logfile, errors="replace") as f:
            tail = f.read().split("==== building")[-1]
    except OSError:
        tail = ""
    # the compiler's and linker's complaints, then the exception that ended the child
    tool = r"error:|FAILED:|cannot find|undefined reference|No such file|no known rule|fatal"
    lines = [ln.strip() for ln in tail.splitlines() if len(ln) < 400 and not ln.startswith(" ") and re.search(tool, ln)]
    exc = [ln.strip() for ln in tail.splitlines() if re.match(r"^[A-Za-z_.]*(Error|Exception)(:|$)", ln)]
    picked = [ln for ln in lines if not ln.startswith("FAILED:")][:3] + exc[-1:]
    what = "; ".join(dict.fromkeys(picked))[:700] or f"exit code {rc}"
    return f"{what} (full output: {logfile})"


def build(root: Optional[str] = None, *, want_cuda: Optional[bool] = None, at_install: bool = False,
          force: bool = False, quiet: bool = False, parts=("cpu", "cuda")) -> dict:
    """Build what is missing or stale and return the record (``<tag>/record.json``): per part
    ``{"attempted", "built", "path", "seconds", "error"}`` (CUDA: also ``"why"`` when left out).

    ``want_cuda``: None decides from torch, nvcc and (at first use) the device; False leaves the
    CUDA part out; True builds it without a device. ``parts`` limits the build (the CUDA part
    alone, beside an installed CPU part). A failed part is retried at install, with
    ``force``, or when the sources changed; at first use a recorded failure is reported instead."""
    root = root or source_root()
    if root is None:
        raise FileNotFoundError("the native sources (csrc/ or ddpm_fast/_csrc) are not there")
    facts = torch_facts()
    if want_cuda is False:
        cuda = {"build": False, "why": "not requested"}
    else:
        cuda = cuda_plan(facts, at_install=at_install, force=bool(want_cuda))
    bdir = build_dir(root, facts)
    sha = sources_sha(root)
    with _lock(os.path.join(bdir, ".lock")):
        record = read_json(os.path.join(bdir, RECORD))
        if record.get("sources_sha") != sha or record.get("torch_version") != facts["torch_version"] \
                or record.get("torch_git") != facts["torch_git"]:
            record = {}
        record.update(facts, sources_sha=sha, version=version(), build_dir=bdir, source_root=root)

        def current(part):
            if force or not part_is_current(record, part, facts, sha, cuda if part == "cuda" else None):
                return False
            return record[part].get("built") or not at_install

        todo = [p for p in parts if (p == "cpu" or cuda["build"]) and not current(p)]
        if not cuda["build"] and not (record.get("cuda") or {}).get("built"):
            record["cuda"] = {"attempted": False, "built": False, "why": cuda["why"]}
        if todo:
            mirror(root, os.path.join(bdir, "src"))
            all_specs = specs(root, facts, cuda, bdir)
            logfile = os.path.join(bdir, "build.log")
            for part in todo:
                spec = all_specs[part]
                what = "CPU kernels" if part == "cpu" else f"CUDA kernels (archs: {cuda['archs'] or 'torch default'})"
                if not quiet:
                    log(f"building the native {what} for torch {facts['torch_version']} in {bdir} "
                        f"({'install' if at_install else 'first use'}; minutes on 2 cores; log: build.log"
                        f"{'' if at_install else '; DDPM_FAST_NO_JIT=1 refuses'})")
                result = _build_part(spec, logfile)
                entry = dict(result, attempted=True, path=library_path(spec) if result["built"] else "")
                if part == "cuda":
                    entry.update(archs=cuda["archs"], cuda_home=cuda["cuda_home"])
                record[part] = entry
                if result["built"]:
                    if not quiet:
                        log(f"built the native {what} in {result['seconds']} s")
                else:
                    log(f"FAILED to build the native {what} after {result['seconds']} s: {result['error']}")
            write_json(os.path.join(bdir, RECORD), record)
    return record


# ---- the child process: one cpp_extension.load -------------------------------------------------
def _child(spec_file: str) -> int:
    spec = read_json(spec_file)
    from torch.utils import cpp_extension

    if spec.get("env", {}).get("CUDA_HOME"):
        cpp_extension.CUDA_HOME = spec["env"]["CUDA_HOME"]  # read when the ninja file is written
    kwargs = {k: spec[k] for k in ("sources", "extra_cflags", "extra_include_paths", "extra_ldflags",
                                   "build_directory", "with_cuda", "is_python_module")}
    if "extra_cuda_cflags" in spec:
        kwargs["extra_cuda_cflags"] = spec["extra_cuda_cflags"]
    cpp_extension.load(spec["name"], verbose=True, **kwargs)  # loads it too: a link error fails here
    print(f"built and loaded {library_path(spec)}", flush=True)
    return 0


def main(argv: Optional[List[str]] = None) -> int:
    import argparse

    argv = list(sys.argv[1:] if argv is None else argv)

    p = argparse.ArgumentParser(prog="python -m ddpm_fast._build",
                                description="Build the native extension now, as the first use would.")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--cuda", action="store_true", help="build the CUDA part even without a CUDA device")
    g.add_argument("--no-cuda", action="store_true", help="build the CPU part only")
    p.add_argument("--force", action="store_true", help="rebuild even when the record says it is current")
    p.add_argument("--json", action="store_true", help="print the record as JSON")
    args = p.parse_args(argv)
    record = build(want_cuda=True if args.cuda else (False if args.no_cuda else None), force=args.force)
    if args.json:
        print(json.dumps(record, indent=1, sort_keys=True))
    else:
        for part in ("cpu", "cuda"):
            e = record.get(part, {})
            state = "built" if e.get("built") else ("FAILED" if e.get("attempted") else "not built")
            print(f"{part:>5}: {state} {e.get('path') or e.get('error') or e.get('why') or ''}")
    cuda_failed = record.get("cuda", {}).get("attempted") and not record["cuda"].get("built")
    return 0 if record.get("cpu", {}).get("built") and not cuda_failed else 1


if __name__ == "__main__":
    sys.exit(main())
