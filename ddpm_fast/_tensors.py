"""Facts about tensors that every layer asks (a leaf module: it imports torch only).

Where two tensors share memory (the ``out=`` checks of the dispatch and of the backends' ``_out``
ops) and what device a ``device`` argument names (a ``ValueError`` naming the argument, for the
schedule, the schedulers and the public ops alike).
"""
from __future__ import annotations

import torch


def _check_device(name: str, device) -> torch.device:
    """``device`` as a ``torch.device`` (``cuda`` with its current index), or a ``ValueError``
    naming the argument when it is malformed or this torch cannot use it (no CUDA, no such GPU)."""
    if isinstance(device, bool):
        raise TypeError(f"{name} must be a torch.device, a string or an int, got bool")
    try:
        device = torch.device(device)
    except (RuntimeError, TypeError, ValueError) as e:
        raise ValueError(f"{name}={device!r} is not a device: {e}") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            why = ("this torch is built without CUDA" if torch.version.cuda is None
                   else "torch.cuda.is_available() is False (no GPU visible)")
            raise ValueError(f"{name}={str(device)!r} asks for CUDA, but {why}: use a CPU device")
        if device.index is None:
            device = torch.device("cuda", torch.cuda.current_device())
        elif device.index >= torch.cuda.device_count():
            raise ValueError(f"{name}={str(device)!r}: there are only {torch.cuda.device_count()} CUDA devices")
    return device


def _same_view(a: torch.Tensor, b: torch.Tensor) -> bool:
    """a and b are the same elements of the same memory (a full alias: an in-place update)."""
    return a is b or (a.data_ptr() == b.data_ptr() and a.dtype == b.dtype and a.shape == b.shape
                      and a.stride() == b.stride() and a.device == b.device)


def _element_offsets(x: torch.Tensor) -> torch.Tensor:
    """Storage offsets (in elements) of every element of x, as an int64 tensor."""
    offsets = torch.full((), x.storage_offset(), dtype=torch.int64)
    for size, stride in zip(x.shape, x.stride()):
        offsets = offsets.unsqueeze(-1) + torch.arange(size, dtype=torch.int64) * stride
    return offsets.reshape(-1)


def _has_internal_overlap(x: torch.Tensor) -> bool:
    """Whether two elements of x share memory (an expanded, stride-0 view or an overlapping
    as_strided one). Exact: a cheap stride test decides the usual layouts, offsets the rest."""
    if x.numel() <= 1 or x.is_contiguous():
        return False
    extent = 0  # the largest offset reachable by the dimensions of smaller stride
    for stride, size in sorted((st, sz) for st, sz in zip(x.stride(), x.shape) if sz > 1):
        if stride <= extent:
            offs = _element_offsets(x)
            return bool(offs.unique().numel() != offs.numel())
        extent += stride * (size - 1)
    return False


def _dense(x: torch.Tensor) -> bool:
    """Non-overlapping and dense: a permutation of a contiguous layout (what torch's overlap
    status decides exactly)."""
    expected = 1
    for stride, size in sorted((st, sz) for st, sz in zip(x.stride(), x.shape) if sz != 1):
        if stride != expected:
            return False
        expected *= size
    return True


def _shares_memory(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Whether some byte of a is also a byte of b (exact; same storage assumed possible)."""
    if a.numel() == 0 or b.numel() == 0 or a.device != b.device:
        return False
    if not torch._C._overlaps(a, b):  # at::get_overlap_status: No
        return False
    if _dense(a) and _dense(b):
        return True  # the status was exact there (partial or full)
    # strided layouts: compare the byte ranges element by element
    ia, ib = a.element_size(), b.element_size()
    sa = torch.sort(_element_offsets(a) * ia + (a.data_ptr() - a.storage_offset() * ia)).values
    sb = _element_offsets(b) * ib + (b.data_ptr() - b.storage_offset() * ib)
    # an element [s, s + ib) of b meets the a-element starting at the largest start < s + ib
    k = torch.searchsorted(sa, sb + ib) - 1
    valid = k >= 0
    return bool((valid & (sa[k.clamp(min=0)] + ia > sb)).any())
