"""Install ddpm_fast. The native extension is added by the native-backend build (see README)."""
from setuptools import find_packages, setup

setup(
    name="ddpm_fast",
    version="0.1.0",
    description="Fused CPU, CUDA and Triton kernels for DDPM/DDIM sampling and training",
    packages=find_packages(include=["ddpm_fast", "ddpm_fast.*"]),
    python_requires=">=3.10",
    install_requires=["torch>=2.6", "numpy", "tqdm"],
    extras_require={
        "test": ["pytest", "pytest-benchmark", "scipy", "diffusers", "matplotlib"],
        "triton": ["triton"],
        "plot": ["matplotlib"],
    },
    license="BSD-3-Clause",
)
