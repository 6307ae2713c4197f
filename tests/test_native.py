"""What is particular to the native backend (fused C++ kernels): the torch.library registration
(opcheck over every op, torch.compile), the build info and dispatch, the CUDA lane, and every
per-ISA build of the CPU kernels. Its parity with the reference, op by op, is the shared suite
(tests/parity_cases.py, run for native by tests/test_parity.py)."""
import pytest
import torch

import ddpm_fast
from parity_cases import SCHED, Lane

_INFO = ddpm_fast.backends()["native"]
pytestmark = pytest.mark.skipif(not _INFO["available"]["cpu"],
                                reason=f"native backend unavailable on cpu: {_INFO['reason']}")


# ---- torch.library -------------------------------------------------------------------------------
def _opcheck_cases():
    ops = torch.ops.ddpm_fast
    abar = SCHED.table("cpu")
    x = torch.randn(2, 3, 4)
    mo = torch.randn(2, 3, 4, requires_grad=True)
    mo2 = torch.randn(2, 6, 4, requires_grad=True)
    t, pt = torch.tensor([5, 300]), torch.tensor([4, 200])
    seed, off = torch.tensor([3]), torch.tensor([1])
    clip = (True, 1.0, False, 0.995, 1.0, None, True)
    return [  # (op, args): the ids of test_opcheck are the op names, numbered where an op repeats
        (ops.gaussian_noise, ([2, 3], seed, off, torch.float32)),
        (ops.q_sample, (torch.randn(2, 3, 4, requires_grad=True), t, abar, None, seed, off)),
        (ops.ddpm_step, (mo, t, pt, x.clone().requires_grad_(True), abar, None, seed, off, "epsilon", "fixed_small")
         + clip),
        (ops.ddpm_step, (mo2, t, pt, x, abar, None, seed, off, "v_prediction", "learned_range") + clip),
        (ops.ddpm_step_out, (mo.detach(), t, pt, x, abar, None, seed, off, "epsilon", "fixed_small") + clip
         + (x.clone(),)),
        (ops.ddim_step, (mo, t, pt, x, abar, None, seed, off, 0.5, "epsilon", False, 1.0) + clip),
        (ops.ddim_step_out, (mo.detach(), t, pt, x, abar, None, seed, off, 0.5, "epsilon", False, 1.0) + clip
         + (x.clone(),)),
        (ops.ddim_reverse_step, (mo, pt, t, x, abar, "sample", True) + clip),
        (ops.ddim_reverse_step_out, (mo.detach(), pt, t, x, abar, "sample", True) + clip + (x.clone(),)),
        (ops.diffusion_loss, (mo, x, t, abar, None, seed, off, "v_prediction", 5.0)),
        (ops.diffusion_loss_backward, (torch.ones(2), mo.detach(), x, t, abar, None, seed, off, "epsilon", None)),
        (ops.vlb_loss, (mo2, x.clamp(-1, 1), x, t, abar, "epsilon", "learned_range")),
    ]


def _opcheck_ids():
    names = [op._qualified_op_name.split("::")[-1] if hasattr(op, "_qualified_op_name") else str(op)
             for op, _ in _opcheck_cases()]
    return [f"{n}-{names[:i].count(n)}" if names.count(n) > 1 else n for i, n in enumerate(names)]


@pytest.mark.parametrize("case", range(len(_opcheck_cases())), ids=_opcheck_ids())
def test_opcheck(case):
    op, args = _opcheck_cases()[case]
    torch.library.opcheck(op, args)


def _compile_usable():
    try:
        torch.compile(lambda x: x + 1, fullgraph=True)(torch.ones(2))
        return True, ""
    except Exception as e:  # no C compiler for inductor, etc.
        return False, f"torch.compile unusable here: {type(e).__name__}: {e}"


def test_torch_compile_fullgraph():
    ok, why = _compile_usable()
    if not ok:
        pytest.skip(why)
    abar = SCHED.table("cpu")
    ops = torch.ops.ddpm_fast

    def loop(mo, x, x0, t, seed, off):
        x_t = ops.q_sample(x0, t, abar, None, seed, off)
        loss = ops.diffusion_loss(mo, x0, t, abar, None, seed, off, "epsilon", None)
        x_prev, _ = ops.ddpm_step(mo, t, t - 1, x, abar, None, seed, off, "epsilon", "fixed_small", True, 1.0, False,
                                  0.995, 1.0, None, False)
        return x_t, loss, x_prev

    compiled = torch.compile(loop, fullgraph=True)
    args = (torch.randn(2, 3, 4), torch.randn(2, 3, 4), torch.randn(2, 3, 4), torch.tensor([10, 20]),
            torch.tensor([1]), torch.tensor([0]))
    for a, b in zip(compiled(*args), loop(*args)):
        torch.testing.assert_close(a, b)


def test_build_info_and_dispatch():
    from ddpm_fast.backends import native as _native_backend

    info = _native_backend.build_info()
    assert info["torch_version"] == torch.__version__
    assert "baseline" in info["cpu_isas_built"]
    # backend=None prefers native on the CPU
    x0 = torch.randn(2, 3)
    a = ddpm_fast.q_sample(x0, 5, SCHED, seed=1)
    b = ddpm_fast.q_sample(x0, 5, SCHED, seed=1, backend="native")
    assert torch.equal(a, b)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device: the native CUDA kernels are tested on a GPU")
def test_cuda_parity_q_sample_and_step():
    if not _INFO["available"].get("cuda", False):
        pytest.skip(f"native CUDA unavailable: {_INFO['reason']}")
    cuda = Lane("native", torch.device("cuda"))
    x0 = torch.randn(4, 3, 16, 16, device="cuda")
    got, ref = cuda.both(ddpm_fast.q_sample, x0, torch.randint(0, 1000, (4,), device="cuda"), SCHED, seed=1)
    cuda.assert_close(got, ref, op="q_sample")
    mo, x_t = torch.randn_like(x0), torch.randn_like(x0)
    got, ref = cuda.both(ddpm_fast.ddpm_step, mo, 500, x_t, SCHED, seed=3, thresholding=True, sample_max_value=2.0)
    cuda.assert_close(got, ref, op="ddpm_step")


_ISA_SCRIPT = r"""
import torch, ddpm_fast
from ddpm_fast import NoiseSchedule
from ddpm_fast.backends import native as _native_backend
print(_native_backend.build_info()["cpu_isa_selected"])
S = NoiseSchedule.from_name("linear", 1000)
g = torch.Generator().manual_seed(0)
worst = 0.0
for dtype in (torch.float32, torch.float16, torch.float64):
    mo = torch.randn(3, 4, 5, 7, generator=g).to(dtype)
    x = torch.randn(3, 4, 5, 7, generator=g).to(dtype)
    v = torch.cat([mo, torch.rand_like(mo) * 2 - 1], 1)
    t = torch.tensor([999, 0, 400])
    pairs = [
        [ddpm_fast.ddpm_step(v, t, x, S, variance_type="learned_range", thresholding=True, sample_max_value=2.0,
                             seed=3, backend=b) for b in ("native", "reference")],
        [ddpm_fast.ddim_step(mo, t, x, S, prev_t=t - 1, eta=0.5, seed=4, backend=b) for b in ("native", "reference")],
        [ddpm_fast.q_sample(x, t, S, seed=5, backend=b) for b in ("native", "reference")],
        [ddpm_fast.diffusion_loss(mo, x, t, S, target="v_prediction", seed=6, reduction="none", backend=b)
         for b in ("native", "reference")],
    ]
    for a, b in pairs:
        err = ((a.double() - b.double()).abs() / (1e-5 + 2.0 ** -10 * b.double().abs())).max().item()
        worst = max(worst, err)
print(worst)
"""


@pytest.mark.parametrize("isa", ["baseline", "avx2", "avx512"])
def test_every_instruction_set_matches_reference(isa):
    """Each per-ISA build of the kernels (DDPM_FAST_CPU_ISA picks one at load) against the reference,
    in a subprocess; within one fp16 ulp (2^-10 relative, the fp16 row of parity_cases.ROUNDING) plus 1e-5."""
    import os
    import subprocess
    import sys

    env = dict(os.environ, DDPM_FAST_CPU_ISA=isa, OMP_NUM_THREADS="1")
    r = subprocess.run([sys.executable, "-c", _ISA_SCRIPT], env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    selected, worst = r.stdout.split()
    if selected != isa:
        pytest.skip(f"this CPU does not support {isa} (selected {selected})")
    assert float(worst) <= 1.0, f"{isa}: worst error {worst} tolerance units"
