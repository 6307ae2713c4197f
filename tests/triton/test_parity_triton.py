"""The parity suite's Triton lane: the cases of tests/parity_cases.py on the Triton backend.

Runs in its own process: ``TRITON_INTERPRET=1 python -m pytest tests/triton -q`` (the variable is
read when Triton kernels are decorated, so it cannot be switched inside a session that already
imported them). On CPU it needs TRITON_INTERPRET=1 (the large-shape cases skip: the interpreter
is slow); on a CUDA machine it runs the compiled kernels on the GPU. The worst error per op and
dtype is printed at the end of the module."""
import os

import pytest
import torch

INTERPRET = os.environ.get("TRITON_INTERPRET", "") == "1"
CUDA = torch.cuda.is_available()
if not (INTERPRET or CUDA):
    _why = ("the Triton lane needs TRITON_INTERPRET=1 (CPU, its own process: "
            "TRITON_INTERPRET=1 python -m pytest tests/triton -q) or a CUDA device")
    print(f"SKIP tests/triton: {_why}")
    pytest.skip(_why, allow_module_level=True)

from parity_cases import *  # noqa: E402,F401,F403  (the shared test functions are collected here)
from parity_cases import WORST, Lane  # noqa: E402

DEVICE = torch.device("cuda" if (CUDA and not INTERPRET) else "cpu")
TRITON = Lane("triton", DEVICE, large=not INTERPRET)


@pytest.fixture
def lane():
    return TRITON


def teardown_module(module):
    if WORST:
        print("\nTriton vs reference, worst |abs| / rel error per op and dtype (device %s):" % DEVICE)
        for (op, dt), (a, r) in sorted(WORST.items()):
            print(f"  {op:28s} {dt:9s} abs {a:.3g}  rel {r:.3g}")
