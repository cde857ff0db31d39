"""The torch path's CPU blocks on worker threads: the same bits as the plain loop, nothing leaked."""

from __future__ import annotations

import pytest
import torch

import catdpo_kernels
from catdpo_kernels.ops import cpu_parallel
from catdpo_kernels.ops import sequence_logps_torch as slt

needs_omp = pytest.mark.skipif(cpu_parallel._SET_THREADS is None, reason="no OpenMP runtime visible")


@pytest.fixture
def two_threads():
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(before)


def _loss_and_grad(logits, ref, labels, categories, margins, *, inplace=False):
    x = logits.clone().requires_grad_(True) if not inplace else logits.clone()
    leaf = x
    if inplace:  # the in-place backward refuses a leaf: differentiate through an op
        leaf = logits.clone().requires_grad_(True)
        x = leaf * 1.0
    out = catdpo_kernels.loss(
        x,
        labels,
        categories,
        margins,
        ref_logits=ref,
        backend="torch",
        shift_labels=True,
        inplace_backward=inplace,
    )
    out.loss.backward()
    return out.loss.detach(), out.policy_logps.detach(), leaf.grad


@needs_omp
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("inplace", [False, True])
def test_worker_threads_give_the_bits_of_the_plain_loop(two_threads, monkeypatch, dtype, inplace):
    g = torch.Generator().manual_seed(11)
    rows, T, V = 6, 9, 301
    logits = (torch.randn(rows, T, V, generator=g) * 3).to(dtype)
    ref = torch.randn(rows, T, V, generator=g).to(dtype)
    labels = torch.randint(0, V, (rows, T), generator=g)
    labels[:, :3] = -100
    labels[1] = -100  # a fully masked sequence
    categories = torch.tensor([0, -1, 2])
    margins = torch.tensor([0.5, 1.0, 2.0])
    monkeypatch.setattr(slt, "CHUNK_ELEMENTS", 4 * V)  # two tokens per worker's block: many blocks
    assert cpu_parallel.block_workers(torch.device("cpu")) == 2
    calls = []
    real = cpu_parallel.for_each_block

    def spy(fn, blocks, workers):
        calls.append((len(blocks), workers))
        real(fn, blocks, workers)

    monkeypatch.setattr(slt, "for_each_block", spy)
    pooled = _loss_and_grad(logits, ref, labels, categories, margins, inplace=inplace)
    assert calls and all(n > 2 and w == 2 for n, w in calls)  # the workers really ran
    monkeypatch.setattr(slt, "block_workers", lambda device: 1)
    plain = _loss_and_grad(logits, ref, labels, categories, margins, inplace=inplace)
    for a, b in zip(pooled, plain, strict=True):
        assert torch.equal(a, b)
    assert torch.isfinite(pooled[2]).all() and pooled[2].abs().sum() > 0


@needs_omp
def test_the_calling_threads_count_and_grad_mode_are_left_alone(two_threads):
    seen = []

    def block(i):
        seen.append((i, torch.is_grad_enabled(), torch.get_num_threads()))

    cpu_parallel.for_each_block(block, [(i,) for i in range(6)], cpu_parallel.block_workers(torch.device("cpu")))
    assert sorted(i for i, _, _ in seen) == list(range(6))
    # Workers run without autograd recording, on one intra-op thread each...
    assert all(not grad and threads == 1 for _, grad, threads in seen)
    # ...and the caller keeps its own setting.
    assert torch.get_num_threads() == 2 and torch.is_grad_enabled()


def test_an_error_in_a_block_reaches_the_caller(two_threads):
    def block(i):
        if i == 3:
            raise RuntimeError("block 3 failed")

    with pytest.raises(RuntimeError, match="block 3 failed"):
        cpu_parallel.for_each_block(block, [(i,) for i in range(5)], 2)


def test_plain_loop_where_workers_do_not_help(two_threads, monkeypatch):
    cpu = torch.device("cpu")
    assert cpu_parallel.block_workers(torch.device("meta")) == 1  # not a CPU tensor
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]):
        assert cpu_parallel.block_workers(cpu) == 1  # the profiler sees the calling thread only
    torch.set_num_threads(1)
    assert cpu_parallel.block_workers(cpu) == 1  # one thread asked for
    torch.set_num_threads(2)
    assert cpu_parallel.block_workers(cpu) == (1 if cpu_parallel._SET_THREADS is None else 2)
    if cpu_parallel._SET_THREADS is not None:
        monkeypatch.setenv("CATDPO_CPU_BLOCK_WORKERS", "1")
        assert cpu_parallel.block_workers(cpu) == 1  # the user's switch
        monkeypatch.setenv("CATDPO_CPU_BLOCK_WORKERS", "0")
        with pytest.raises(ValueError, match="CATDPO_CPU_BLOCK_WORKERS must be a positive integer"):
            cpu_parallel.block_workers(cpu)
        monkeypatch.delenv("CATDPO_CPU_BLOCK_WORKERS")
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    assert cpu_parallel.block_workers(cpu) == 1  # being traced
    # One block, or one worker: the calling thread runs it.
    seen = []
    cpu_parallel.for_each_block(lambda: seen.append(torch.get_num_threads()), [()], 2)
    assert seen == [2]


@needs_omp
def test_blocks_in_flight_hold_one_budget_together(two_threads, monkeypatch):
    """Each worker's block is 1/workers of the budget: memory does not grow with the thread count."""
    V = 100
    monkeypatch.setattr(slt, "CHUNK_ELEMENTS", 8 * V)
    sizes = []
    monkeypatch.setattr(
        slt,
        "for_each_block",
        lambda fn, blocks, workers: sizes.extend((rs.stop - rs.start) * (ts.stop - ts.start) * V for rs, ts in blocks),
    )
    slt._run_blocks(None, 4, 16, V, torch.device("cpu"))
    assert sizes and max(sizes) * 2 <= 8 * V
    assert sum(sizes) == 4 * 16 * V
