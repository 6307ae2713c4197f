"""The build steps of ddpm_fast that pyproject.toml cannot declare (metadata lives there).

* Where torch is importable at build time (``pip install --no-build-isolation ...``,
  ``python setup.py build_ext --inplace``, ``python -m build --no-isolation``), the native extension
  is built now, against that torch, by ddpm_fast/_build.py (the same builder as the first use):
  ``ddpm_fast._C`` (CPU) and, where torch has CUDA and nvcc is found, ``ddpm_fast._C_cuda``. Both go
  into the package with a record (``_native_build.json``) of what they were built for.
* Where it is not (pip's default build isolation installs setuptools but not your torch), nothing
  is compiled: the package is pure Python and builds the extension at first use against the torch
  it then runs with. This file says so in one line.
* Either way the C++/CUDA sources ship inside the package (``ddpm_fast/_csrc``) for that first-use
  build, and an editable install uses ``csrc/`` in place.

A failed part is a loud warning and an install without that part (a CUDA failure keeps the CPU
kernels); ``python -m ddpm_fast info`` then says what failed. pip shows this output with ``-v``.
Switches: DDPM_FAST_SKIP_NATIVE=1 (compile nothing now), DDPM_FAST_SKIP_CUDA=1, DDPM_FAST_FORCE_CUDA=1,
DDPM_FAST_CACHE (build folder root), MAX_JOBS, TORCH_CUDA_ARCH_LIST, CUDA_HOME.
"""
import importlib.util
import os
import shutil
import sys

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext
from setuptools.command.build_py import build_py

HERE = os.path.dirname(os.path.abspath(__file__))
CSRC = os.path.join(HERE, "csrc")


def _load_builder():
    spec = importlib.util.spec_from_file_location("ddpm_fast_build", os.path.join(HERE, "ddpm_fast", "_build.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


B = _load_builder()


def log(msg):
    print(f"[ddpm_fast setup] {msg}", flush=True)


def banner(lines):
    bar = "!" * 78
    print("\n".join(["", bar] + [f"!! {ln}" for ln in lines] + [bar, ""]), file=sys.stderr, flush=True)


def torch_importable():
    try:
        import torch  # noqa: F401
    except Exception as e:  # build isolation, or no torch yet
        return f"{type(e).__name__}: {e}"
    return None


class NativeExtension(Extension):
    """A library that ddpm_fast/_build.py builds (setuptools only places the result)."""

    def __init__(self, name, part):
        super().__init__(name, sources=[])
        self.part = part


class BuildNative(build_ext):
    """Builds both parts with the shared builder in its persistent folder (an unchanged tree is not
    recompiled, a changed one only in part), then copies the libraries and the record into place."""

    def run(self):
        self._record = B.build(CSRC, at_install=True)
        cpu, cuda = self._record.get("cpu", {}), self._record.get("cuda", {})
        failed = [(n, e) for n, e in (("CPU", cpu), ("CUDA", cuda)) if e.get("attempted") and not e.get("built")]
        if failed:
            banner([f"ddpm_fast: the native {n} kernels FAILED to build: {e.get('error')}" for n, e in failed]
                   + ["the install goes on without them" + (" (the CPU kernels are built)" if cpu.get("built") else
                                                            "; the reference backend still works"),
                      "`python -m ddpm_fast info` reports it; fix, then `python -m ddpm_fast._build --force`"])
        else:
            log(f"native extension: CPU built; CUDA {'built' if cuda.get('built') else 'not built: ' + cuda.get('why', '')}")
        super().run()
        self._write_record(os.path.dirname(self._built_path("ddpm_fast._C")))
        if self.inplace or getattr(self, "editable_mode", False):
            self._write_record(os.path.join(HERE, "ddpm_fast"))

    def build_extension(self, ext):
        entry = self._record.get(ext.part, {})
        dest = self.get_ext_fullpath(ext.name)
        if os.path.exists(dest):
            os.remove(dest)  # a process that mapped the old library keeps its copy
        if entry.get("built"):
            os.makedirs(os.path.dirname(dest), exist_ok=True)
            shutil.copyfile(entry["path"], dest + ".tmp")
            os.replace(dest + ".tmp", dest)

    def copy_extensions_to_source(self):
        """Inplace / editable: put each built library next to the sources, replacing the old file
        by a new one (a process that mapped the old library keeps it); a part that did not build
        leaves no stale library behind (the record says why)."""
        build_py = self.get_finalized_command("build_py")
        for ext in self.extensions:
            inplace_file, regular_file = self._get_inplace_equivalent(build_py, ext)
            if os.path.exists(inplace_file):
                os.remove(inplace_file)
            if os.path.exists(regular_file):
                shutil.copyfile(regular_file, inplace_file + ".tmp")
                os.replace(inplace_file + ".tmp", inplace_file)

    def _built_path(self, ext_name):
        inplace, self.inplace = self.inplace, 0
        try:
            return self.get_ext_fullpath(ext_name)
        finally:
            self.inplace = inplace

    def _write_record(self, directory):
        failed = [f"{p}: {self._record[p].get('error')}" for p in ("cpu", "cuda")
                  if (self._record.get(p) or {}).get("attempted") and not self._record[p].get("built")]
        # "built"/"error" summarise the parts for readers of the older one-part record
        rec = dict(self._record, origin="install", built=bool((self._record.get("cpu") or {}).get("built")),
                   error="; ".join(failed) or None)
        for ext in self.extensions:
            entry = dict(rec.get(ext.part, {}))
            if entry.get("built"):
                entry["file"] = os.path.basename(self.get_ext_fullpath(ext.name))
            rec[ext.part] = entry
        B.write_json(os.path.join(directory, B.INSTALLED_RECORD), rec)


class BuildPyWithSources(build_py):
    """Ships the native sources inside the package (``ddpm_fast/_csrc``) for the first-use build.
    Not in editable mode, where ``csrc/`` is used in place."""

    def run(self):
        super().run()
        if getattr(self, "editable_mode", False) or not os.path.isdir(CSRC):
            return
        dest = os.path.join(self.build_lib, "ddpm_fast", "_csrc")
        B.mirror(CSRC, dest)


def native_extensions():
    if B.env_flag("DDPM_FAST_SKIP_NATIVE"):
        log("DDPM_FAST_SKIP_NATIVE is set: nothing is compiled now (the first use builds it, "
            "unless DDPM_FAST_NO_JIT=1)")
        return []
    why = torch_importable()
    if why is not None:
        log("torch is not importable here (pip's build isolation?): nothing is compiled now; the first use "
            "builds the native extension against the torch it runs with (a few minutes, once). "
            f"[{why}]")
        return []
    if not os.path.isfile(os.path.join(CSRC, "sources.txt")):
        log("csrc/ is missing: nothing is compiled")
        return []
    return [NativeExtension("ddpm_fast._C", "cpu"), NativeExtension("ddpm_fast._C_cuda", "cuda")]


ext_modules = native_extensions()
setup(
    ext_modules=ext_modules,
    cmdclass={"build_ext": BuildNative, "build_py": BuildPyWithSources},
)
