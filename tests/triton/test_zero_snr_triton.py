"""The zero-SNR thresholding rule of tests/test_zero_snr_backends.py on the Triton backend (this
lane's process has TRITON_INTERPRET=1 set before the kernels are imported)."""
import os

import pytest
import torch

import ddpm_fast

if os.environ.get("TRITON_INTERPRET") != "1":
    pytest.skip("CPU Triton tests need TRITON_INTERPRET=1 (the GPU lane is tests/triton/test_triton_ops.py)",
                allow_module_level=True)


def test_triton_zero_snr_thresholding_is_finite():
    s = ddpm_fast.NoiseSchedule.from_name("linear", 1000, rescale_zero_snr=True)
    g = torch.Generator().manual_seed(9)
    x_t, eps = torch.randn(2, 3, 4, generator=g), torch.randn(2, 3, 4, generator=g)
    prev, x0 = ddpm_fast.ddpm_step(eps, 999, x_t, s, seed=1, thresholding=True, sample_max_value=3.0,
                                   return_x0=True, backend="triton")
    assert torch.isfinite(prev).all()
    torch.testing.assert_close(x0, torch.sign(x_t - eps), rtol=0, atol=0)
