"""Train and sample a small image DDPM on scikit-learn's handwritten digits, with a quality figure.

    python examples/digits.py                 # the full run (about 5 CPU minutes on one core)
    python examples/digits.py --quick         # the CI-sized run (under a minute)
    torchrun --nproc_per_node 2 examples/digits.py
    python -m ddpm_fast demo --digits         # the same, from an installed package

The code lives in ddpm_fast/tools/digits.py (shipped with the package); see docs/examples.md.
"""
import os
import sys

try:
    from ddpm_fast.tools.digits import main
except ImportError:  # run from a source checkout without an install
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), os.pardir))
    from ddpm_fast.tools.digits import main

if __name__ == "__main__":
    raise SystemExit(main())
