"""q_sample: ``x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) eps`` with the noise a given tensor or
the docs/noise.md normals drawn in registers, as the op ``ddpm_fast_triton::q_sample`` (grad in x0:
``sqrt(abar_t) * grad``)."""
from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from . import _helpers as H


@triton.jit
def _q_sample_kernel(x0_ptr, out_ptr, t_ptr, abar_ptr, noise_ptr, seed_ptr, offset_ptr, B, N, T,
                     NOISE_MODE: tl.constexpr, PER_ROW_SEED: tl.constexpr, ALIGNED: tl.constexpr,
                     USE_LIBDEVICE: tl.constexpr, FLAT: tl.constexpr, BLOCK: tl.constexpr):
    row, blk, cols, mask = H.row_and_block(B, N, BLOCK, FLAT)
    abar = H.abar_in_table(abar_ptr, tl.load(t_ptr + row), T)                # float64
    sqrt_abar = H.sqrt64(abar).to(tl.float32)
    sqrt_1m_abar = H.sqrt64(1.0 - abar).to(tl.float32)
    x0 = tl.load(x0_ptr + row * N + cols, mask=mask, other=0.0).to(tl.float32)
    eps = H.row_noise(noise_ptr, seed_ptr, offset_ptr, row, blk, cols, mask, N,
                      NOISE_MODE, PER_ROW_SEED, ALIGNED, BLOCK, FLAT, USE_LIBDEVICE)
    x_t = sqrt_abar * x0 + sqrt_1m_abar * eps
    tl.store(out_ptr + row * N + cols, H.to_dtype(x_t, out_ptr.dtype.element_ty, USE_LIBDEVICE), mask=mask)


_tuned = H.maybe_autotune(_q_sample_kernel)


@H.register_op("ddpm_fast_triton::q_sample", mutates_args={})
def q_sample(x0: torch.Tensor, t: torch.Tensor, alphas_cumprod: torch.Tensor, noise: Optional[torch.Tensor],
             seed: Optional[torch.Tensor], offset: Optional[torch.Tensor]) -> torch.Tensor:
    x0c = x0.contiguous()  # explicit copy for strided inputs: the kernel indexes row-major
    out = torch.empty_like(x0c)
    B, N = x0.shape[0], H.row_view(x0)
    if out.numel() == 0:
        return out
    mode, per_row, aligned, noise = H.noise_flags(noise, seed, B, N)
    dev = x0.device
    H.launch(_q_sample_kernel, _tuned, B=B, N=N, device=dev, allow_tune=True,
             args=(x0c, out, t, alphas_cumprod, noise if noise is not None else H.dummy(dev),
                   seed if seed is not None else H.dummy(dev, torch.int64),
                   offset if offset is not None else H.dummy(dev, torch.int64), B, N,
                   alphas_cumprod.numel()),
             kwargs=dict(NOISE_MODE=mode, PER_ROW_SEED=per_row, ALIGNED=aligned,
                         USE_LIBDEVICE=H.use_libdevice(dev)))
    return out


@q_sample.register_fake
def _(x0, t, alphas_cumprod, noise, seed, offset):
    return torch.empty(x0.shape, device=x0.device, dtype=x0.dtype)


def _setup_context(ctx, inputs, output):
    ctx.save_for_backward(inputs[1], inputs[2])
    ctx.x0_dtype = inputs[0].dtype


def _backward(ctx, grad):
    t, alphas_cumprod = ctx.saved_tensors
    shape = (-1,) + (1,) * (grad.dim() - 1)
    sqrt_abar = H.abar_rows(alphas_cumprod, t).sqrt().to(torch.float32).reshape(shape)   # NaN outside
    return (grad.to(torch.float32) * sqrt_abar).to(ctx.x0_dtype), None, None, None, None, None


q_sample.register_autograd(_backward, setup_context=_setup_context)
