"""Install ddpm_fast, building the native extension (ddpm_fast._C) against the installed torch.

    pip install --no-build-isolation -e .      # build against the torch already installed

Environment switches (each printed once):
  DDPM_FAST_SKIP_NATIVE=1   pure-Python install (the reference and Triton backends only)
  DDPM_FAST_FORCE_CUDA=1    build the CUDA kernels even where torch reports no CUDA (needs nvcc)
  MAX_JOBS=N                parallel compile jobs (torch's ninja build)
  TORCH_CUDA_ARCH_LIST      CUDA architectures, e.g. "9.0" (torch's default otherwise)

A missing compiler, a failed compile or a CPU-only torch is a warning and a working install
without that part: `ddpm_fast.backends()` then says why "native" is unavailable.
"""
import json
import os
import shutil
import sys

from setuptools import find_packages, setup

VERSION = "0.1.0"
HERE = os.path.dirname(os.path.abspath(__file__))
BUILD_INFO = "_native_build.json"  # written next to the extension: what it was built against


def log(msg):
    print(f"[ddpm_fast setup] {msg}", flush=True)


def env_flag(name):
    return os.environ.get(name, "") not in ("", "0", "false", "False")


SKIP_NATIVE = env_flag("DDPM_FAST_SKIP_NATIVE")
FORCE_CUDA = env_flag("DDPM_FAST_FORCE_CUDA")
log(f"DDPM_FAST_SKIP_NATIVE={int(SKIP_NATIVE)} DDPM_FAST_FORCE_CUDA={int(FORCE_CUDA)} "
    f"MAX_JOBS={os.environ.get('MAX_JOBS', '(unset)')} "
    f"TORCH_CUDA_ARCH_LIST={os.environ.get('TORCH_CUDA_ARCH_LIST', '(unset)')}")

CPU_SOURCES = [
    "csrc/torch_bindings.cpp",
    "csrc/torch/cpu_ops.cpp",
    "csrc/torch/autograd.cpp",
    "csrc/cpu/dispatch.cpp",
    "csrc/cpu/kernels_baseline.cpp",
    "csrc/cpu/kernels_avx2.cpp",
    "csrc/cpu/kernels_avx512.cpp",
]
CUDA_SOURCES = ["csrc/cuda/kernels.cu", "csrc/torch/cuda_ops.cu"]
# -fno-math-errno / -fno-trapping-math let GCC vectorise sqrt and if-convert the selects of the
# noise loops; neither changes a result (no -ffast-math: §3 needs IEEE arithmetic).
CXX_FLAGS = ["-O3", "-fno-math-errno", "-fno-trapping-math"]  # the C++ standard: torch's default
NVCC_FLAGS = ["-O3", "-std=c++17"]


def write_build_info(directory, info):
    os.makedirs(directory, exist_ok=True)
    with open(os.path.join(directory, BUILD_INFO), "w") as f:
        json.dump(info, f, indent=1)


def native_extension():
    """(ext_modules, cmdclass) for the native build, or ([], {}) with a printed reason."""
    if SKIP_NATIVE:
        log("DDPM_FAST_SKIP_NATIVE is set: pure-Python install")
        return [], {}, None
    try:
        import torch
        from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension
    except Exception as e:  # no torch at build time (e.g. build isolation)
        log(f"WARNING: torch is not importable ({e}); installing without the native extension. "
            "Install torch first and use `pip install --no-build-isolation -e .`")
        return [], {}, None
    nvcc = shutil.which("nvcc") or (os.path.join(CUDA_HOME, "bin", "nvcc") if CUDA_HOME else None)
    with_cuda = bool(nvcc) and os.path.exists(nvcc) and (bool(torch.version.cuda) or FORCE_CUDA)
    if FORCE_CUDA and not with_cuda:
        log("WARNING: DDPM_FAST_FORCE_CUDA is set but nvcc was not found: building the CPU part only")
    elif not with_cuda:
        why = "torch has no CUDA" if not torch.version.cuda else "nvcc was not found"
        log(f"building the CPU kernels only ({why})")
    cxx_flags = list(CXX_FLAGS)
    if "OpenMP" in torch.__config__.parallel_info() and sys.platform.startswith("linux"):
        # at::parallel_for is inline OpenMP code when ATen uses OpenMP: without -fopenmp the glue's
        # loops run on one thread. Compile-only: GOMP_* resolve to the runtime torch already loaded.
        cxx_flags.append("-fopenmp")
    defines = [("DDPM_FAST_VERSION", f'"{VERSION}"'), ("DDPM_FAST_TORCH_VERSION", f'"{torch.__version__}"')]
    include_dirs = [os.path.join(HERE, "csrc", "include"), os.path.join(HERE, "csrc")]
    info = {"version": VERSION, "torch_version": torch.__version__, "cuda": with_cuda,
            "torch_cuda_version": torch.version.cuda, "built": False}
    if with_cuda:
        archs = os.environ.get("TORCH_CUDA_ARCH_LIST", "")
        defines += [("DDPM_FAST_WITH_CUDA", None), ("DDPM_FAST_CUDA_ARCHS", f'"{archs or "torch default"}"')]
        # pip's CUDA wheels keep the toolkit headers (cusparse.h, ...) in site-packages/nvidia/*/include
        for sp in sys.path:
            for sub in ("cu13", "cu12"):
                inc = os.path.join(sp, "nvidia", sub, "include")
                if os.path.isdir(inc):
                    include_dirs.append(inc)
        ext = CUDAExtension("ddpm_fast._C", CPU_SOURCES + CUDA_SOURCES, include_dirs=include_dirs,
                            define_macros=defines,
                            extra_compile_args={"cxx": cxx_flags, "nvcc": NVCC_FLAGS})
    else:
        ext = CppExtension("ddpm_fast._C", CPU_SOURCES, include_dirs=include_dirs, define_macros=defines,
                           extra_compile_args={"cxx": cxx_flags})

    class TolerantBuild(BuildExtension):
        """Builds the extension; a failure is a warning and a pure-Python install."""

        def run(self):
            try:
                super().run()
            except Exception as e:  # e.g. no working compiler: torch's ABI check fails before any build
                log(f"WARNING: building the native extension failed: {type(e).__name__}: {e}")
                log("WARNING: installing without it; ddpm_fast.backends() reports native as unavailable")
                for ext_ in self.extensions:
                    for d in {os.path.dirname(self.get_ext_fullpath(ext_.name)), os.path.join(HERE, "ddpm_fast")}:
                        write_build_info(d, dict(info, built=False, error=f"{type(e).__name__}: {e}"))

        def build_extension(self, extension):
            # next to the built library, and in the source package (editable installs copy only
            # the library there)
            out_dirs = {os.path.dirname(self.get_ext_fullpath(extension.name)), os.path.join(HERE, "ddpm_fast")}
            try:
                super().build_extension(extension)
            except Exception as e:  # compiler missing or compile error: keep the install working
                log(f"WARNING: building the native extension failed: {e}")
                log("WARNING: installing without it; ddpm_fast.backends() reports native as unavailable")
                for d in out_dirs:
                    write_build_info(d, dict(info, built=False, error=f"{type(e).__name__}: {e}"))
                return
            for d in out_dirs:
                write_build_info(d, dict(info, built=True))
            log(f"built the native extension ({'CPU + CUDA' if with_cuda else 'CPU'}) against torch "
                f"{torch.__version__}")

    return [ext], {"build_ext": TolerantBuild.with_options(use_ninja=shutil.which("ninja") is not None)}, info


ext_modules, cmdclass, _ = native_extension()

setup(
    name="ddpm_fast",
    version=VERSION,
    description="Fused CPU, CUDA and Triton kernels for DDPM/DDIM sampling and training",
    packages=find_packages(include=["ddpm_fast", "ddpm_fast.*"]),
    python_requires=">=3.10",
    install_requires=["torch>=2.6", "numpy", "tqdm"],
    extras_require={
        "test": ["pytest", "pytest-benchmark", "hypothesis", "scipy", "diffusers", "matplotlib"],
        "triton": ["triton"],
        "plot": ["matplotlib"],
    },
    ext_modules=ext_modules,
    cmdclass=cmdclass,
    license="BSD-3-Clause",
)
