"""Handing freed heap memory back: a trim returns resident memory a freed working set left behind, and
the block boundary it runs at is the identity in both directions."""

import ctypes
import sys

import psutil
import pytest
import torch

from hf_rbe.hf.calibration import heap


@pytest.mark.skipif(not sys.platform.startswith("linux") or heap.freed_bytes() is None, reason="glibc only")
def test_a_trim_returns_a_fragmented_heap_to_the_system():
    """Blocks from glibc's malloc itself, so the heap's state does not hang on which allocator torch
    was built with, or on what earlier tests left in its free lists."""
    libc = ctypes.CDLL(None)
    libc.malloc.restype, libc.malloc.argtypes = ctypes.c_void_p, [ctypes.c_size_t]
    libc.free.argtypes = [ctypes.c_void_p]
    rss = lambda: psutil.Process().memory_info().rss  # noqa: E731
    heap.trim(0)
    # many mid-sized blocks freed around small survivors: glibc keeps them resident, pinned by the survivors
    keep, chunks = [], []
    for _ in range(3200):
        # below glibc's mmap threshold, so from the heap, and below the size whose free consolidates
        # the heap and trims its top
        chunks.append(libc.malloc(32 * 1024))
        ctypes.memset(chunks[-1], 1, 32 * 1024)  # resident
        keep.append(libc.malloc(64))
    before = rss()
    for p in chunks:
        libc.free(p)
    held = rss()
    heap.trim(0)
    after = rss()
    for p in keep:
        libc.free(p)
    assert held > before - 20 * 2**20  # freeing alone gave little back
    assert after < held - 50 * 2**20, (before, held, after)


class _Libc:
    def __init__(self, freed: int) -> None:
        self.freed, self.trims = freed, 0

    def mallinfo2(self):  # type: ignore[no-untyped-def]
        return type("Info", (), {"fordblks": self.freed})()

    def malloc_trim(self, pad: int) -> int:
        self.trims += 1
        return 1


@pytest.mark.parametrize("freed, trims", [(10, 0), (1000, 1)])
def test_a_trim_runs_only_above_the_slack(monkeypatch, freed, trims):
    libc = _Libc(freed)
    monkeypatch.setattr(heap, "_LIBC", libc)
    heap.trim(slack=100)
    assert libc.trims == trims


def test_the_block_boundary_is_the_identity_both_ways():
    x = torch.randn(3, 4, requires_grad=True)
    y = heap.TrimBoundary.apply(x)
    assert torch.equal(y, x)
    g = torch.randn(3, 4)
    y.backward(g)
    assert torch.equal(x.grad, g)
