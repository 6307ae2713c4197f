"""The tools on top of the library, each a ``python -m ddpm_fast COMMAND``: ``bench`` (the
benchmark, one spec per op), ``profile`` (torch.profiler traces), ``demo`` (the main job, and
``demo --digits``: the real-data example in ``digits``), ``gpucheck`` (the GPU machine's one-call
check). Nothing in the library imports them."""
