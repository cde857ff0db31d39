"""``segment_reduce``: the compiled op (csrc/), the pure-torch fallback and the package entry point.

Oracle: ``index_add_`` in float64 on CPU. Both implementations sum in float64 and
round once, so they agree with it to fp32 rounding.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest
import torch

import catdpo_kernels
from catdpo_kernels import _ext
from catdpo_kernels.constants import NUM_STATS, STAT_INDEX
from catdpo_kernels.margins import CategoryMargins
from catdpo_kernels.ops import category_stats
from catdpo_kernels.ops.segment_reduce import (
    compiled_op_available,
    segment_gather,
    segment_reduce,
    segment_reduce_torch,
)

HAS_OP = compiled_op_available("cpu")
needs_op = pytest.mark.skipif(not HAS_OP, reason=f"compiled op not loaded: {_ext.build_info()['errors']}")


def compiled_op(values, ids, num_segments):
    return torch.ops.catdpo.segment_reduce(values, ids, num_segments)


IMPLS = {
    "compiled": pytest.param(compiled_op, marks=needs_op, id="compiled"),
    "fallback": pytest.param(segment_reduce_torch, id="fallback"),
    "entry": pytest.param(segment_reduce, id="entry"),
}
ALL_IMPLS = list(IMPLS.values())


def oracle(values: torch.Tensor, ids: torch.Tensor, num_segments: int) -> torch.Tensor:
    v = values.detach().cpu().double()
    ids = ids.cpu()
    out = torch.zeros(num_segments + 1, v.shape[1], dtype=torch.float64)
    if ids.dim() == 2:
        member = torch.cat([ids, ~ids.any(-1, keepdim=True)], dim=1)
        pair, row = member.nonzero(as_tuple=True)
        out.index_add_(0, row, v[pair])
    else:
        keep = (ids >= -1) & (ids < num_segments)
        row = torch.where(ids == -1, torch.full_like(ids, num_segments), ids)
        out.index_add_(0, row[keep], v[keep])
    return out.float()


def random_ids(n, num_segments, gen, *, used=None, none_frac=0.2, bad_frac=0.0):
    """Ids over ``used`` segments (others stay empty), some -1, some out of range."""
    used = torch.arange(num_segments) if used is None else torch.as_tensor(used)
    ids = used[torch.randint(0, max(1, len(used)), (n,), generator=gen)] if len(used) else torch.full((n,), -1)
    u = torch.rand(n, generator=gen)
    ids = torch.where(u < none_frac, torch.full_like(ids, -1), ids)
    bad = torch.tensor([-2, -7, num_segments, num_segments + 5, 2**40, -(2**40)])
    bad_pick = bad[torch.randint(0, len(bad), (n,), generator=gen)]
    return torch.where(u > 1 - bad_frac, bad_pick, ids)


def random_multi_hot(n, num_segments, gen, p=0.15):
    return torch.rand(n, num_segments, generator=gen) < p


def assert_matches_oracle(impl, values, ids, num_segments):
    got = impl(values, ids, num_segments)
    assert got.dtype == torch.float32 and got.shape == (num_segments + 1, values.shape[1])
    torch.testing.assert_close(got.cpu(), oracle(values, ids, num_segments), rtol=2e-6, atol=2e-5, equal_nan=True)
    return got


# ------------------------------------------------------------------ loading
def test_compiled_extension_is_loaded():
    """The install builds the extension (AOT); CI must not silently run on the fallback."""
    if os.environ.get(_ext.ENV_DISABLE):
        pytest.skip(f"{_ext.ENV_DISABLE} is set")
    info = _ext.build_info()
    assert info["source"] in ("aot", "jit"), info
    assert info["cpu_kernel"] and HAS_OP
    assert torch._C._dispatch_has_kernel_for_dispatch_key(_ext.OP_NAME, "Meta")


def _cuda_toolkit_present() -> bool:
    home = os.environ.get("CUDA_HOME") or "/usr/local/cuda"
    return torch.version.cuda is not None and (Path(home, "bin", "nvcc").is_file() or shutil.which("nvcc") is not None)


@needs_op
def test_cuda_kernel_registered_after_cuda_build():
    info = _ext.build_info()
    if not info["cuda"]:
        if info["source"] == "aot" and _cuda_toolkit_present() and os.environ.get("CATDPO_BUILD_CUDA") != "0":
            pytest.fail(f"nvcc and a CUDA torch are present but the AOT build has no CUDA kernel: {info}")
        pytest.skip(f"extension built without CUDA ({info['source']}; torch.version.cuda={torch.version.cuda})")
    assert torch._C._dispatch_has_kernel_for_dispatch_key("catdpo::segment_reduce", "CUDA")
    assert info["cuda_kernel"]


# ------------------------------------------------------------ correctness
@pytest.mark.parametrize("impl", ALL_IMPLS)
@pytest.mark.parametrize("n", [0, 1, 2, 17, 4097, 70_000])
@pytest.mark.parametrize("num_segments", [0, 1, 5, 19])
def test_int_ids_random(impl, n, num_segments):
    gen = torch.Generator().manual_seed(n * 100 + num_segments)
    values = torch.randn(n, 6, generator=gen) * 3
    ids = random_ids(n, num_segments, gen, bad_frac=0.05)
    assert_matches_oracle(impl, values, ids, num_segments)


@pytest.mark.parametrize("impl", ALL_IMPLS)
def test_empty_segments_stay_zero(impl):
    gen = torch.Generator().manual_seed(1)
    values = torch.randn(3000, 6, generator=gen)
    ids = random_ids(3000, 8, gen, used=[1, 4, 6])
    got = assert_matches_oracle(impl, values, ids, 8)
    assert torch.equal(got[[0, 2, 3, 5, 7]], torch.zeros(5, 6))
    assert bool((got[[1, 4, 6, 8], 0] != 0).all())


@pytest.mark.parametrize("impl", ALL_IMPLS)
def test_all_none(impl):
    values = torch.randn(257, 6, generator=torch.Generator().manual_seed(2))
    got = assert_matches_oracle(impl, values, torch.full((257,), -1), 4)
    assert torch.equal(got[:4], torch.zeros(4, 6))


@pytest.mark.parametrize("impl", ALL_IMPLS)
def test_out_of_range_ids_count_nowhere(impl):
    values = torch.randn(6, 3, generator=torch.Generator().manual_seed(3))
    ids = torch.tensor([-2, 3, 2**62, -(2**62), 7, -100])
    assert torch.equal(impl(values, ids, 3), torch.zeros(4, 3))


@pytest.mark.parametrize("impl", ALL_IMPLS)
@pytest.mark.parametrize("n", [0, 1, 33, 9000])
@pytest.mark.parametrize("num_segments", [0, 3, 19])
def test_multi_hot(impl, n, num_segments):
    gen = torch.Generator().manual_seed(7 + n + num_segments)
    values = torch.randn(n, 6, generator=gen)
    member = random_multi_hot(n, num_segments, gen)
    if n >= 2 and num_segments >= 2:
        member[0] = False  # a pair with no category: row num_segments
        member[1] = True  # a pair in every row
    assert_matches_oracle(impl, values, member, num_segments)
    if n:
        # Each pair counts once per row it carries, and once in the none row if it carries none.
        carried = member.sum() + (~member.any(-1)).sum() if num_segments else torch.tensor(n)
        ones = impl(torch.ones(n, 1), member, num_segments)
        assert ones.sum().item() == carried.item()


@pytest.mark.parametrize("impl", ALL_IMPLS)
def test_zero_columns(impl):
    assert impl(torch.empty(5, 0), torch.tensor([0, -1, 1, 2, 9]), 3).shape == (4, 0)
    assert impl(torch.empty(5, 0), torch.zeros(5, 3, dtype=torch.bool), 3).shape == (4, 0)


@pytest.mark.parametrize("impl", ALL_IMPLS)
def test_non_contiguous_inputs(impl):
    gen = torch.Generator().manual_seed(4)
    values = torch.randn(6, 4000, generator=gen).T  # (4000, 6), column-major
    ids = random_ids(8000, 5, gen)[::2]
    member = random_multi_hot(4000, 10, gen)[:, ::2]
    assert not values.is_contiguous() and not ids.is_contiguous() and not member.is_contiguous()
    assert_matches_oracle(impl, values, ids, 5)
    assert_matches_oracle(impl, values, member, 5)


@pytest.mark.parametrize("impl", ALL_IMPLS)
def test_non_finite_values_stay_in_their_row(impl):
    values = torch.ones(6, 2)
    values[0, 0] = float("nan")  # row 0
    values[2, 1] = float("inf")  # row 1
    values[3, 1] = float("-inf")  # row 1: inf + -inf = nan
    values[4, 0] = float("inf")  # row 2 (none)
    ids = torch.tensor([0, 0, 1, 1, -1, 9])
    values[5] = float("nan")  # out of range: counts nowhere
    got = assert_matches_oracle(impl, values, ids, 2)
    assert got[0, 0].isnan() and got[0, 1] == 2
    assert got[1, 0] == 2 and got[1, 1].isnan()
    assert got[2, 0] == float("inf") and got[2, 1] == 1


def test_large_n_compiled_and_entry():
    gen = torch.Generator().manual_seed(5)
    n = 1_000_000
    values = torch.randn(n, 6, generator=gen)
    ids = random_ids(n, 19, gen, bad_frac=0.01)
    expected = oracle(values, ids, 19)
    impls = [segment_reduce] + ([compiled_op] if HAS_OP else [])
    for impl in impls:
        torch.testing.assert_close(impl(values, ids, 19), expected, rtol=2e-6, atol=1e-4)
    member = random_multi_hot(200_000, 19, gen)
    torch.testing.assert_close(
        segment_reduce(values[:200_000], member, 19), oracle(values[:200_000], member, 19), rtol=2e-6, atol=1e-4
    )


# ------------------------------------------------------------ determinism
@pytest.mark.parametrize("impl", ALL_IMPLS)
def test_bitwise_deterministic(impl):
    gen = torch.Generator().manual_seed(6)
    values = torch.randn(100_000, 6, generator=gen) * 1e3  # several CPU blocks and fallback chunks
    ids = random_ids(100_000, 19, gen)
    member = random_multi_hot(50_000, 19, gen)
    first = impl(values, ids, 19)
    first_mh = impl(values[:50_000], member, 19)
    for _ in range(3):
        assert torch.equal(impl(values, ids, 19), first)
        assert torch.equal(impl(values[:50_000], member, 19), first_mh)


@needs_op
def test_bits_do_not_depend_on_thread_count():
    gen = torch.Generator().manual_seed(8)
    values = torch.randn(500_000, 6, generator=gen) * 1e3
    ids = random_ids(500_000, 19, gen)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = compiled_op(values, ids, 19)
        torch.set_num_threads(max(2, threads))
        many = compiled_op(values, ids, 19)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(one, many)


# ------------------------------------------------------------------ errors
@pytest.mark.parametrize("impl", [segment_reduce, segment_reduce_torch])
def test_python_entry_rejects_bad_shapes(impl):
    v = torch.randn(4, 3)
    with pytest.raises(ValueError, match="multi-hot"):
        impl(v, torch.zeros(4, 5, dtype=torch.bool), 4)
    with pytest.raises(ValueError, match="segment_ids"):
        impl(v, torch.zeros(4, dtype=torch.float32), 4)
    with pytest.raises(ValueError, match="segment_ids"):
        impl(v, torch.zeros(3, dtype=torch.long), 4)
    with pytest.raises(ValueError, match="values"):
        impl(torch.randn(4), torch.zeros(4, dtype=torch.long), 4)
    with pytest.raises(ValueError, match="num_segments"):
        impl(v, torch.zeros(4, dtype=torch.long), -1)


@needs_op
def test_compiled_op_checks_its_arguments():
    v = torch.randn(4, 3)
    with pytest.raises(RuntimeError, match="float32"):
        compiled_op(v.double(), torch.zeros(4, dtype=torch.long), 2)
    with pytest.raises(RuntimeError, match="int64"):
        compiled_op(v, torch.zeros(4, dtype=torch.int32), 2)
    with pytest.raises(RuntimeError, match="multi-hot"):
        compiled_op(v, torch.zeros(4, 3, dtype=torch.bool), 2)
    with pytest.raises(RuntimeError, match="num_segments"):
        compiled_op(v, torch.zeros(4, dtype=torch.long), -1)


def test_entry_accepts_other_int_and_float_dtypes():
    gen = torch.Generator().manual_seed(9)
    values = torch.randn(100, 6, generator=gen, dtype=torch.float64)
    ids = random_ids(100, 4, gen)
    expected = oracle(values.float(), ids, 4)
    torch.testing.assert_close(segment_reduce(values, ids.int(), 4), expected, rtol=2e-6, atol=2e-5)


# ------------------------------------------------------- autograd, compile
@pytest.mark.parametrize("multi_hot", [False, True])
def test_gradient_matches_fallback(multi_hot):
    gen = torch.Generator().manual_seed(10)
    values = torch.randn(50, 3, generator=gen, requires_grad=True)
    ids = random_multi_hot(50, 4, gen, p=0.3) if multi_hot else random_ids(50, 4, gen, bad_frac=0.1)
    grad_out = torch.randn(5, 3, generator=gen)
    (g_entry,) = torch.autograd.grad(segment_reduce(values, ids, 4), values, grad_out)
    (g_fallback,) = torch.autograd.grad(segment_reduce_torch(values, ids, 4), values, grad_out)
    torch.testing.assert_close(g_entry, g_fallback)
    torch.testing.assert_close(g_entry, segment_gather(grad_out, ids, 4))


@needs_op
def test_meta_kernel_shapes():
    out = compiled_op(torch.empty(7, 6, device="meta"), torch.empty(7, dtype=torch.long, device="meta"), 19)
    assert out.shape == (20, 6) and out.dtype == torch.float32 and out.device.type == "meta"
    out = compiled_op(torch.empty(7, 6, device="meta"), torch.empty(7, 19, dtype=torch.bool, device="meta"), 19)
    assert out.shape == (20, 6)


@needs_op
@pytest.mark.parametrize("dynamic", [False, True])
def test_torch_compile_fullgraph(dynamic):
    torch._dynamo.reset()

    def f(values, ids):
        return torch.ops.catdpo.segment_reduce(values * 2, ids, 5) + 1

    def g(values, ids):
        return segment_reduce(values, ids, 5).sum(0)

    gen = torch.Generator().manual_seed(11)
    for n in (40, 73):  # a second size exercises the symbolic-shape meta kernel when dynamic
        values = torch.randn(n, 6, generator=gen)
        ids = random_ids(n, 5, gen, bad_frac=0.1)
        cf = torch.compile(f, fullgraph=True, backend="eager", dynamic=dynamic)
        cg = torch.compile(g, fullgraph=True, backend="eager", dynamic=dynamic)
        torch.testing.assert_close(cf(values, ids), oracle(values * 2, ids, 5) + 1)
        torch.testing.assert_close(cg(values, ids), oracle(values, ids, 5).sum(0))


# ---------------------------------------------------------------- wire-in
@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_category_table_goes_through_segment_reduce(monkeypatch, backend):
    """The package passes canonical rows (``CategoryAssignment.segment_ids``): the
    no-category row is the ordinary segment ``C`` of ``C + 1``, and the op's own
    extra row is cut off."""
    calls = []

    def spy(values, ids, num_segments):
        calls.append((tuple(values.shape), ids.clone(), num_segments))
        return segment_reduce(values, ids, num_segments)

    monkeypatch.setattr(category_stats, "segment_reduce", spy)
    gen = torch.Generator().manual_seed(12)
    b, t, v, c = 4, 3, 11, 3
    logits = torch.randn(2 * b, t, v, generator=gen)
    labels = torch.randint(0, v, (2 * b, t), generator=gen)
    ref_logps = torch.randn(2 * b, generator=gen)
    margins = torch.full((c,), 0.5)
    dev = "cuda" if backend == "triton" and torch.cuda.is_available() else "cpu"
    logits, labels, ref_logps, margins = (x.to(dev) for x in (logits, labels, ref_logps, margins))
    kw = dict(ref_logps=ref_logps, backend=backend, reduction="category_mean")
    out = catdpo_kernels.loss(logits, labels, torch.tensor([0, 2, -1, 2], device=dev), margins, **kw)
    ((shape, ids, num_segments),) = calls
    assert shape == (b, NUM_STATS) and num_segments == c + 1
    assert torch.equal(ids.cpu(), torch.tensor([0, 2, 3, 2]))
    counts = out.category_stats[:, STAT_INDEX["count"]].cpu()
    assert torch.equal(counts, torch.tensor([1.0, 0.0, 2.0, 1.0]))
    # Multi-hot: the bool matrix with the explicit no-category column.
    calls.clear()
    hot = torch.tensor([[True, False, True], [False, False, False], [False, True, False], [True, True, True]])
    out = catdpo_kernels.loss(logits, labels, hot.to(dev), margins, **kw)
    ((shape, ids, num_segments),) = calls
    assert num_segments == c + 1 and ids.dtype == torch.bool
    assert torch.equal(ids.cpu(), torch.cat([hot, torch.tensor([[False], [True], [False], [False]])], dim=1))
    assert torch.equal(out.category_stats[:, STAT_INDEX["count"]].cpu(), torch.tensor([2.0, 2.0, 2.0, 1.0]))


def test_category_margins_update_accepts_the_table():
    gen = torch.Generator().manual_seed(13)
    c, n = 3, 400
    ids = random_ids(n, c, gen)
    values = torch.zeros(n, NUM_STATS)
    values[:, STAT_INDEX["count"]] = 1
    # Category 0 prefers unsafe responses often, category 1 rarely, category 2 never appears.
    ids = torch.where(ids == 2, torch.full_like(ids, -1), ids)
    unsafe = torch.where(ids == 0, torch.full((n,), 0.9), torch.full((n,), 0.01))
    values[:, STAT_INDEX["unsafe_pref_sum"]] = unsafe
    table = segment_reduce(values, ids, c)
    margins = CategoryMargins(c, init=1.0, lr=1.0, target=0.1, ema=0.0, min_count=1.0)
    new = margins.update(table)
    torch.testing.assert_close(new[0], torch.tensor(1.8), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(new[1], torch.tensor(0.91), rtol=1e-5, atol=1e-5)
    assert new[2] == 1.0  # no pairs: not active, unchanged
    assert margins.ema_count[:2].tolist() == table[:2, 0].double().tolist()


# -------------------------------------------------------------------- GPU
@pytest.mark.gpu
def test_cuda_op_matches_cpu_op():
    if not _ext.has_compiled_op("cuda"):
        pytest.fail(f"a GPU is present but the op has no CUDA kernel: {_ext.build_info()}")
    gen = torch.Generator().manual_seed(14)
    cases = []
    for n, c in [(0, 3), (1, 0), (1, 19), (4097, 5), (300_000, 19), (1_000_000, 64)]:
        values = torch.randn(n, 6, generator=gen) * 10
        cases.append((values, random_ids(n, c, gen, bad_frac=0.02), c))
        cases.append((values[: min(n, 100_000)], random_multi_hot(min(n, 100_000), c, gen), c))
    cases.append((torch.randn(3000, 19, generator=gen), random_ids(3000, 7, gen), 7))  # K > one column tile
    for values, ids, c in cases:
        cpu = segment_reduce(values, ids, c)
        values_d, ids_d = values.cuda(), ids.cuda()
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")  # the op itself must never wait on the device
        try:
            gpu = segment_reduce(values_d, ids_d, c)
            again = segment_reduce(values_d, ids_d, c)
        finally:
            torch.cuda.set_sync_debug_mode(0)
        assert gpu.device.type == "cuda" and gpu.shape == cpu.shape
        assert torch.equal(gpu, again)
        torch.testing.assert_close(gpu.cpu(), cpu, rtol=2e-6, atol=1e-4)
        torch.testing.assert_close(gpu.cpu(), oracle(values, ids, c), rtol=2e-6, atol=1e-4)
