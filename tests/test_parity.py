"""The parity suite's main lane: every case of tests/parity_cases.py on each backend available on
the CPU here, against the reference. The Triton backend runs the same cases in its own lane
(tests/triton/test_parity_triton.py, under TRITON_INTERPRET=1 or on a CUDA device)."""
import pytest

from parity_cases import *  # noqa: F401,F403  (the shared test functions are collected here)
from parity_cases import Lane, lane_params, test_zero_snr_thresholding_is_finite as _zero_snr


@pytest.fixture(params=lane_params(["native"]))
def lane(request):
    return request.param


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_zero_snr_thresholding_is_finite_on_reference(dtype):
    """The zero-SNR rule holds on the specification itself (the other backends run it above)."""
    import torch
    _zero_snr(Lane("reference"), getattr(torch, dtype))
