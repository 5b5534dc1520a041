"""Handing freed heap memory back: a trim returns resident memory a freed working set left behind, and
the block boundary it runs at is the identity in both directions."""

import sys

import psutil
import pytest
import torch

from hf_rbe.hf.calibration import heap


@pytest.mark.skipif(not sys.platform.startswith("linux") or heap.freed_bytes() is None, reason="glibc only")
def test_a_trim_returns_a_fragmented_heap_to_the_system():
    rss = lambda: psutil.Process().memory_info().rss  # noqa: E731
    heap.trim(0)
    # many mid-sized blocks freed around small survivors: glibc keeps them resident, pinned by the survivors
    keep, chunks = [], []
    for _ in range(1600):
        chunks.append(torch.ones(16 * 1024))  # 64 KiB: below glibc's mmap threshold, so from the heap
        keep.append(torch.ones(16))
    before = rss()
    del chunks
    held = rss()
    heap.trim(0)
    after = rss()
    assert held > before - 20 * 2**20  # freeing alone gave little back
    assert after < held - 50 * 2**20, (before, held, after)
    del keep


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
