import os

import pytest
import torch

import ddpm_fast


def available_backends(device_type="cpu"):
    """Backends that can run on ``device_type`` in this environment (the rest are reported)."""
    out = []
    for name, entry in ddpm_fast.backends().items():
        if entry["available"].get(device_type, False):
            out.append(name)
    return out


def backend_param(device_type="cpu"):
    """pytest params for every backend; unavailable ones skip with their reason."""
    params = []
    info = ddpm_fast.backends()
    for name, entry in info.items():
        ok = entry["available"].get(device_type, False)
        marks = [] if ok else [pytest.mark.skip(reason=f"backend {name!r} unavailable on {device_type}: "
                                                       f"{entry['reason']}")]
        params.append(pytest.param(name, marks=marks, id=name))
    return params


class RecordingModel(torch.nn.Module):
    """A small fixed model for the loop tests: a seeded ``(channels * out_factor, channels)`` matrix
    ``W`` (out_factor 2: learned variances); records the timesteps it is called with in ``seen``.
    Subclasses say what it returns (``out(x, t)``)."""

    def __init__(self, channels=2, out_factor=1):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.W = torch.nn.Parameter(torch.randn(channels * out_factor, channels, generator=g) * 0.3)
        self.seen = []

    def forward(self, x, t):
        self.seen.append(t.clone())
        return self.out(x, t)

    def out(self, x, t):
        raise NotImplementedError


@pytest.fixture(autouse=True)
def _seed_torch():
    torch.manual_seed(1234)
    yield


def pytest_report_header(config):
    lines = [f"torch {torch.__version__}, cuda available: {torch.cuda.is_available()}"]
    for name, entry in ddpm_fast.backends().items():
        lines.append(f"backend {name}: {entry['available']} ({entry['reason']})")
    if os.environ.get("TRITON_INTERPRET"):
        lines.append("TRITON_INTERPRET=" + os.environ["TRITON_INTERPRET"])
    return lines
