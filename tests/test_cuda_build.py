"""The CUDA build lane: the current CUDA torch (``pip install torch``) in a fresh venv, and the real
extension built by the GPU machine's install command for sm_90 with nvcc, on a copy of the tree:

    TORCH_CUDA_ARCH_LIST=9.0 pip install --no-build-isolation -e .

It fails when the CUDA part does not compile, link and load (no GPU is needed to load it), or when
its ops are not registered for the CUDA dispatch key; the CPU part must build beside it. CI only
(tests/_install_helpers.py); skipped, with the reason, where nvcc is missing or the CUDA torch cannot
be installed.
"""
import glob
import json
import os
import shutil

import pytest

from _install_helpers import SKIP_LANES, Lane, copy_tree, last_lines


@SKIP_LANES
@pytest.mark.skipif(shutil.which("nvcc") is None, reason="nvcc not found on PATH: the CUDA build lane needs it")
def test_lane_cuda_torch_builds_cpu_and_cuda_parts_for_sm90(tmp_path):
    lane = Lane(tmp_path).create()
    try:
        torch_install = lane.run("pip install torch (CUDA)", [lane.py, "-m", "pip", "install", "-q", "torch"],
                                 timeout=1800, check=False)
        if torch_install.returncode != 0:
            pytest.skip(f"the CUDA torch could not be installed here:\n{torch_install.stdout[-2000:]}")
        facts = lane.python("torch facts", "import torch, json; print(json.dumps([torch.__version__, torch.version.cuda]))")
        torch_version, torch_cuda = json.loads(facts.stdout.strip().splitlines()[-1])
        if not torch_cuda:
            pytest.skip(f"`pip install torch` gave a CPU torch ({torch_version}) here")
        tree = copy_tree(os.path.join(lane.base, "tree"))
        cache = os.path.join(lane.base, "cache")
        env = {"TORCH_CUDA_ARCH_LIST": "9.0", "DDPM_FAST_CACHE": cache}
        install = lane.run("CUDA install (CPU + CUDA parts)",
                           [lane.py, "-m", "pip", "install", "-v", "--no-build-isolation", "-e", "."],
                           cwd=tree, env=env, timeout=3000)
        record = json.load(open(os.path.join(tree, "ddpm_fast", "_native_build.json")))
        bdir = record["build_dir"]
        log = last_lines(os.path.join(bdir, "build.log"), 80)
        assert record["cpu"]["built"], f"the CPU part failed with torch {torch_version}: {record['cpu']}\n{log}"
        assert record["cuda"].get("attempted"), f"the CUDA part was not attempted: {record['cuda']}\n{install.stdout[-3000:]}"
        assert record["cuda"]["built"], f"the CUDA part failed with torch {torch_version}: {record['cuda']['error']}\n{log}"
        assert record["cuda"]["archs"] == "9.0"
        with open(os.path.join(bdir, "cuda", "build.ninja")) as f:
            assert "code=sm_90" in f.read(), "compiled for sm_90"
        assert glob.glob(os.path.join(tree, "ddpm_fast", "_C_cuda*.so")), "the CUDA library is installed"
        check = lane.python(
            "load check",
            "import json, torch, ddpm_fast; from ddpm_fast.backends import native as n\n"
            "info = n.build_info(); b = ddpm_fast.backends()['native']\n"
            "has = {op: torch._C._dispatch_has_kernel_for_dispatch_key('ddpm_fast::' + op, 'CUDA')\n"
            "       for op in ('q_sample', 'ddpm_step', 'ddim_step', 'diffusion_loss', 'gaussian_noise', 'vlb_loss')}\n"
            "print(json.dumps([info.get('cuda'), info.get('origin'), b, has]))",
            cwd=tree)
        loaded, origin, native, has = json.loads(check.stdout.strip().splitlines()[-1])
        assert native["available"]["cpu"] is True, native["reason"]
        assert loaded is True and origin["cuda"] == "installed", (origin, native)
        assert all(has.values()), f"ops without a CUDA kernel: {has}"
        lane.run("info", [lane.py, "-m", "ddpm_fast", "info"], cwd=tree)
        print(f"[lane] CUDA build: torch {torch_version} (CUDA {torch_cuda}); CPU part {record['cpu']['seconds']} s, "
              f"CUDA part {record['cuda']['seconds']} s; timings (s): {lane.timings}; CPU (s): {lane.cpu}")
    finally:
        lane.remove()
