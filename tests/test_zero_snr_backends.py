"""§1/§6 on every backend: a zero-SNR epsilon step at T-1 under thresholding is finite.

Every |x0_hat| is +inf there, so the per-row quantile's two neighbours are both inf; a plain lerp
gives inf - inf = NaN (as torch.quantile, hence diffusers, does). The threshold must instead be
sample_max_value and x0_hat = sign(x_t - eps)."""
import pytest
import torch

import ddpm_fast
from conftest import backend_param


@pytest.mark.parametrize("backend", backend_param("cpu"))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_zero_snr_thresholding_is_finite(backend, dtype):
    if dtype == torch.float64 and backend == "triton":
        pytest.skip("triton does not take fp64")
    s = ddpm_fast.NoiseSchedule.from_name("linear", 1000, rescale_zero_snr=True)
    g = torch.Generator().manual_seed(9)
    x_t = torch.randn(2, 3, 4, generator=g).to(dtype)
    eps = torch.randn(2, 3, 4, generator=g).to(dtype)
    kw = dict(thresholding=True, sample_max_value=3.0, return_x0=True, backend=backend)
    prev, x0 = ddpm_fast.ddpm_step(eps, 999, x_t, s, seed=1, **kw)
    assert torch.isfinite(prev).all() and torch.isfinite(x0).all()
    torch.testing.assert_close(x0, torch.sign(x_t - eps), rtol=0, atol=0)
    prev, x0 = ddpm_fast.ddim_step(eps, 999, x_t, s, prev_t=899, **kw)
    assert torch.isfinite(prev).all() and torch.isfinite(x0).all()
