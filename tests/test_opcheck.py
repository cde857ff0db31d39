"""``torch.library.opcheck`` on every custom op of the package: schema, fake (meta)
kernel, autograd registration and tracing under AOTAutograd (docs/design.md, "Testing").

The Triton ops run on small CPU inputs under the interpreter when there is no GPU.
Inputs hold no NaN: opcheck compares eager and traced outputs with NaN != NaN.
"""

from __future__ import annotations

import pytest
import torch

from catdpo_kernels.ops.segment_reduce import compiled_op_available

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
IGNORE = -100


def opcheck(op, args):
    result = torch.library.opcheck(op, args)
    assert result and all(v == "SUCCESS" for v in result.values()), result


# ------------------------------------------------------------ Triton ops
@pytest.fixture(scope="module")
def triton_ops():
    pytest.importorskip("triton")
    from catdpo_kernels.ops import pair_terms_triton, sequence_logps_triton  # noqa: F401 - registers the ops

    return torch.ops.catdpo_triton


def logits_and_labels(seed=0, rows=4, tokens=3, vocab=11, dtype=torch.float32):
    gen = torch.Generator().manual_seed(seed)
    logits = (torch.randn(rows, tokens, vocab, generator=gen) * 2).to(dtype).to(DEVICE)
    labels = torch.randint(0, vocab, (rows, tokens), generator=gen)
    labels[0, 1] = IGNORE
    labels[rows - 1, :] = IGNORE  # a fully masked row
    return logits, labels.to(DEVICE)


@pytest.mark.parametrize(
    "with_ref, shift, average, dtype",
    [(True, False, False, torch.float32), (False, True, True, torch.bfloat16), (True, True, False, torch.float16)],
)
def test_sequence_logps_fwd(triton_ops, with_ref, shift, average, dtype):
    policy, labels = logits_and_labels(1, dtype=dtype)
    ref = logits_and_labels(2, dtype=dtype)[0] if with_ref else None
    # The policy requires grad, so the check also traces the registered backward.
    opcheck(triton_ops.sequence_logps_fwd, (policy.requires_grad_(), ref, labels, IGNORE, shift, average, False))


def _saved(triton_ops, logits, labels, shift, average):
    _, _, max_logsum, counts = triton_ops.sequence_logps_fwd(logits, None, labels, IGNORE, shift, average, False)
    return max_logsum, counts


@pytest.mark.parametrize("shift, average", [(False, False), (True, True)])
def test_sequence_logps_bwd(triton_ops, shift, average):
    logits, labels = logits_and_labels(3)
    max_logsum, counts = _saved(triton_ops, logits, labels, shift, average)
    grad = torch.linspace(-1.0, 2.0, logits.shape[0], device=DEVICE)
    opcheck(triton_ops.sequence_logps_bwd, (grad, logits, labels, max_logsum, counts, IGNORE, shift, average))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_sequence_logps_bwd_in_place(triton_ops, dtype):
    logits, labels = logits_and_labels(4, dtype=dtype)
    max_logsum, counts = _saved(triton_ops, logits, labels, True, False)
    grad = torch.linspace(-1.0, 2.0, logits.shape[0], device=DEVICE)
    args = (grad, logits.clone(), labels, max_logsum, counts, IGNORE, True, False)
    opcheck(triton_ops.sequence_logps_bwd_, args)  # checks the declared mutation of `logits` too
    # The mutated logits hold what the out-of-place op returns.
    expected = triton_ops.sequence_logps_bwd(grad, logits, labels, max_logsum, counts, IGNORE, True, False)
    buf = logits.clone()
    assert triton_ops.sequence_logps_bwd_(grad, buf, labels, max_logsum, counts, IGNORE, True, False) is None
    assert torch.equal(buf, expected)


def pair_inputs(seed=5, num_pairs=5, num_cats=3):
    gen = torch.Generator().manual_seed(seed)
    policy = torch.randn(2 * num_pairs, generator=gen).to(DEVICE).requires_grad_()
    ref = torch.randn(2 * num_pairs, generator=gen).to(DEVICE)
    # [Δ_c…, Δ_none, NaN], as CategoryAssignment.margin_table builds it.
    margins = torch.rand(num_cats, generator=gen, dtype=torch.float64) * 2
    table = torch.cat([margins, torch.tensor([0.0, float("nan")], dtype=torch.float64)]).to(DEVICE)
    signs = (torch.rand(num_pairs, generator=gen) < 0.6).float().to(DEVICE)
    return policy, ref, table, signs


@pytest.mark.parametrize("family", ["sigmoid", "ipo"])
def test_pair_terms_with_row_ids(triton_ops, family):
    policy, ref, table, signs = pair_inputs()
    rows = torch.tensor([0, 3, 2, 1, 3], device=DEVICE)  # row C = 3: no category (the NaN row would fail opcheck)
    opcheck(triton_ops.pair_terms, (policy, ref, rows, None, table, signs, 0.3, family))


@pytest.mark.parametrize("family", ["sigmoid", "ipo"])
def test_pair_terms_with_multi_hot(triton_ops, family):
    policy, ref, table, signs = pair_inputs(6)
    member = torch.tensor(
        [[1, 0, 1, 0], [0, 0, 0, 1], [0, 1, 0, 0], [1, 1, 1, 0], [0, 0, 0, 1]], dtype=torch.bool, device=DEVICE
    )
    opcheck(triton_ops.pair_terms, (policy, ref, None, member, table, signs, 0.3, family))


# ------------------------------------------------------------ compiled segment_reduce
needs_op = pytest.mark.skipif(not compiled_op_available("cpu"), reason="the compiled catdpo op is not available")


@needs_op
@pytest.mark.parametrize("multi_hot", [False, True])
def test_segment_reduce(multi_hot):
    gen = torch.Generator().manual_seed(7)
    values = torch.randn(9, 6, generator=gen).requires_grad_()
    if multi_hot:
        ids = torch.rand(9, 4, generator=gen) < 0.4
    else:
        ids = torch.tensor([0, 3, -1, 2, 7, -5, 1, 1, 3])  # -1: the op's none row; 7, -5: nowhere
    opcheck(torch.ops.catdpo.segment_reduce, (values, ids, 4))


@pytest.mark.gpu
def test_segment_reduce_cuda():
    if not compiled_op_available("cuda"):
        pytest.skip("the compiled catdpo op has no CUDA kernel (test_segment_reduce.py fails on that)")
    gen = torch.Generator().manual_seed(8)
    values = torch.randn(9, 6, generator=gen).cuda().requires_grad_()
    ids = torch.tensor([0, 3, -1, 2, 7, -5, 1, 1, 3]).cuda()
    opcheck(torch.ops.catdpo.segment_reduce, (values, ids, 4))
