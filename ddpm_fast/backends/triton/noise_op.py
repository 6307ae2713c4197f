"""gaussian_noise: the docs/noise.md normals of (seed, offset) written to a tensor, as the op
``ddpm_fast_triton::gaussian_noise``."""
from __future__ import annotations

import math
from typing import List

import torch
import triton
import triton.language as tl

from . import _helpers as H


@triton.jit
def _gaussian_noise_kernel(out_ptr, seed_ptr, offset_ptr, B, N,
                           PER_ROW_SEED: tl.constexpr, ALIGNED: tl.constexpr, USE_LIBDEVICE: tl.constexpr,
                           FLAT: tl.constexpr, BLOCK: tl.constexpr):
    row, blk, cols, mask = H.row_and_block(B, N, BLOCK, FLAT)
    z = H.row_noise(out_ptr, seed_ptr, offset_ptr, row, blk, cols, mask, N,
                    2, PER_ROW_SEED, ALIGNED, BLOCK, FLAT, USE_LIBDEVICE)
    tl.store(out_ptr + row * N + cols, H.to_dtype(z, out_ptr.dtype.element_ty, USE_LIBDEVICE), mask=mask)


_tuned = H.maybe_autotune(_gaussian_noise_kernel)


@H.register_op("ddpm_fast_triton::gaussian_noise", mutates_args={})
def gaussian_noise(shape: List[int], seed: torch.Tensor, offset: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    out = torch.empty(shape, device=seed.device, dtype=dtype)
    B = shape[0]
    N = math.prod(shape[1:]) if len(shape) > 1 else 1
    if out.numel() == 0:
        return out
    per_row = bool(seed.numel() == B and B != 1)
    H.launch(_gaussian_noise_kernel, _tuned, B=B, N=N, device=seed.device, allow_tune=True,
             args=(out, seed, offset, B, N),
             kwargs=dict(PER_ROW_SEED=per_row,
                         ALIGNED=(not per_row) if H.is_flat(N) else (per_row or N % 4 == 0),
                         USE_LIBDEVICE=H.use_libdevice(seed.device)))
    return out


@gaussian_noise.register_fake
def _(shape, seed, offset, dtype):
    return torch.empty(shape, device=seed.device, dtype=dtype)
