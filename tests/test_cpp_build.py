"""The torch-free layer builds and passes its C++ tests on its own, and every CUDA source compiles.

* CMake configures and builds ``CMakeLists.txt`` in a temporary directory (the CPU kernels for
  every instruction set and the C++ unit tests: Philox known answers, the docs/noise.md normals, dtype
  conversions, formulas), then ``ctest`` runs them.
* ``nvcc -std=c++17 -arch=sm_90 -c`` compiles every ``.cu`` file under ``csrc/`` that includes no
  torch header (no GPU needed), so a CUDA compile error fails here. The torch CUDA glue
  (``csrc/torch/cuda_ops.cu``) needs a CUDA build of torch and is compiled by ``setup.py`` there.
Skipped, with the reason, where cmake or nvcc is missing.
"""
import os
import re
import shutil
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
JOBS = os.environ.get("MAX_JOBS", "2")


def _run(cmd, cwd, timeout=600):
    proc = subprocess.run(cmd, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=timeout)
    assert proc.returncode == 0, f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stdout[-6000:]}"
    return proc.stdout


@pytest.mark.skipif(shutil.which("cmake") is None, reason="cmake not found on PATH")
def test_cmake_build_and_ctest(tmp_path):
    build = str(tmp_path / "build")
    # the CUDA sources are compiled once, by test_nvcc_compiles_every_cuda_source
    _run(["cmake", "-S", ROOT, "-B", build, "-DDDPM_FAST_WITH_CUDA=OFF", "-DCMAKE_BUILD_TYPE=Release"], ROOT)
    _run(["cmake", "--build", build, "-j", JOBS], ROOT)
    out = _run(["ctest", "--test-dir", build, "--output-on-failure"], ROOT)
    assert "tests passed" in out


def _cuda_sources():
    found = []
    for dirpath, _, files in os.walk(os.path.join(ROOT, "csrc")):
        for f in sorted(files):
            if f.endswith(".cu"):
                found.append(os.path.join(dirpath, f))
    return sorted(found)


_TORCH_INCLUDE = re.compile(r'^\s*#\s*include\s*[<"](torch/|ATen/|c10/)', re.M)


def _includes_torch(path):
    with open(path) as f:
        return bool(_TORCH_INCLUDE.search(f.read()))


def test_cuda_sources_exist_and_glue_is_known():
    # csrc/cuda holds only torch-free kernels (the benchmark and CMake compile csrc/cuda/*.cu alone)
    sources = [os.path.relpath(p, ROOT) for p in _cuda_sources()]
    assert "csrc/cuda/kernels.cu" in sources
    torch_glue = [p for p in sources if _includes_torch(os.path.join(ROOT, p))]
    assert torch_glue == ["csrc/torch/cuda_ops.cu"], torch_glue


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="nvcc not found on PATH")
@pytest.mark.parametrize("source", [os.path.relpath(p, ROOT) for p in _cuda_sources()
                                    if not _includes_torch(p)])
def test_nvcc_compiles_every_cuda_source(source, tmp_path):
    obj = str(tmp_path / (os.path.basename(source) + ".o"))
    _run(["nvcc", "-std=c++17", "-arch=sm_90", "-O3", "-I", os.path.join(ROOT, "csrc", "include"),
          "-c", os.path.join(ROOT, source), "-o", obj], ROOT)
    assert os.path.getsize(obj) > 0
