"""The fused LM head on ``backend="triton"``: cuBLAS tiles folded and differentiated by Triton kernels.

The schedule is ``catdpo_kernels.fused_head``'s; what differs from the torch
backend is the tile order and the tile work:

* tiles stay in the compute dtype (bf16 under autocast): the GEMM writes them,
  one Triton kernel folds each into per-token running statistics, and one
  turns it into its gradient in place. No fp32 copy of a tile ever exists;
* the scoring pass and the recompute pass run **vocabulary-outer**: one chunk
  of the weight at a time against all counted tokens. The weight is read once
  per pass, and the weight gradient needs an fp32 accumulator of one chunk
  only (an fp32 ``(V, H)`` accumulator is 2.1 GB at V=128256, H=4096). The
  hidden-state gradient accumulates in fp32 over the chunks, ``(N, H)`` for the
  counted tokens;
* the one-pass schedule (whole pairs in one tile, full vocabulary) is used when
  its tile and its fp32 weight-gradient accumulator fit the budget together.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton

from ..head import HeadPlan, HeadTransform, TokenLayout
from ..kernels.linear_head import fold_tile_kernel, grad_tile_kernel
from .device_guard import on_device_of
from .first_order import first_order
from .linear_head_torch import (
    HeadGrads,
    HeadSide,
    TwoPassHead,
    _group_tokens,
    group_pair_grads,
    one_pass_backward,
    sequence_logps,
)
from .triton_config import interpreting

__all__ = ["HeadSide", "OnePassHead", "TwoPassHead", "score_tokens", "sequence_logps", "tile_element_bytes"]

_FOLD_BLOCK = 2048
_GRAD_BLOCK = 1024
_MIN_CHUNK = 2048  # vocabulary columns per tile, at least (GEMM efficiency)


def tile_element_bytes(side: HeadSide, transform: HeadTransform) -> int:
    return torch.finfo(side.compute_dtype).bits // 8


def one_pass_extra_bytes(side: HeadSide, need_weight_grad: bool) -> int:
    """The one-pass schedule's fp32 weight-gradient accumulator, unless it is the returned gradient itself."""
    if not need_weight_grad or side.weight.dtype == side.acc_dtype:
        return 0
    return side.weight.numel() * torch.finfo(side.acc_dtype).bits // 8


def _transform_args(t: HeadTransform) -> dict:
    cap = t.softcap or 1.0
    return dict(
        logit_scale=t.logit_scale,
        inv_softcap=1.0 / cap,
        softcap=cap,
        inv_temp=1.0 / t.temperature,
        HAS_SCALE=t.logit_scale != 1.0 or t.temperature != 1.0,
        HAS_SOFTCAP=t.softcap is not None,
    )


def _addmm_fp32(acc: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> None:
    """``acc += a @ b`` with an fp32 ``acc``, never rounding the product to the inputs' dtype first."""
    if acc.device.type == "cuda" and a.dtype in (torch.float16, torch.bfloat16):
        torch.addmm(acc, a, b, out_dtype=torch.float32, out=acc)
    else:
        acc.addmm_(a.to(acc.dtype), b.to(acc.dtype))


# --------------------------------------------------------------------- tiles
@dataclass
class _Chunking:
    """Vocabulary chunk width and token tile height for a budget of ``elements`` tile entries."""

    vocab_chunk: int
    token_tile: int

    @classmethod
    def for_call(cls, n_tokens: int, vocab: int, elements: int) -> _Chunking:
        if n_tokens * vocab <= elements:
            return cls(vocab, max(n_tokens, 1))
        # A multiple of 128 columns keeps each chunk's bias and weight rows aligned.
        chunk = min(vocab, max(_MIN_CHUNK, elements // max(n_tokens, 1) // 128 * 128))
        return cls(chunk, max(1, elements // chunk))


class _RunningStats:
    """Per-token online log-sum-exp state and metric sums (fp32, ``(N,)`` each)."""

    def __init__(self, n: int, device, metrics: bool):
        f32 = dict(device=device, dtype=torch.float32)
        self.max = torch.full((n,), float("-inf"), **f32)
        self.sum = torch.zeros(n, **f32)
        self.target = torch.zeros(n, **f32)
        self.ez = torch.zeros(n, **f32) if metrics else self.sum
        self.zsum = torch.zeros(n, **f32) if metrics else self.sum
        self.before = torch.full((n,), float("-inf"), **f32) if metrics else self.sum

    def lse(self) -> torch.Tensor:
        return self.max + torch.log(self.sum)

    def write_metrics(self, metrics: dict, index, vocab: int) -> None:
        lse = self.lse()
        metrics["entropy"][index] = (lse - self.ez / self.sum).to(metrics["entropy"].dtype)
        metrics["mean_logit"][index] = (self.zsum / vocab).to(metrics["mean_logit"].dtype)
        top1 = (self.target >= self.max) & (self.target > self.before)
        metrics["top1"][index] = top1.to(metrics["top1"].dtype)


def _fold(tile, bias, targets, stats: _RunningStats, sl, v0: int, transform: HeadTransform, metrics: bool):
    n = tile.shape[0]
    if n == 0:
        return
    fold_tile_kernel[(n,)](
        tile,
        tile.stride(0),
        bias if bias is not None else tile,
        targets,
        stats.max[sl],
        stats.sum[sl],
        stats.target[sl],
        stats.ez[sl],
        stats.zsum[sl],
        stats.before[sl],
        v0,
        tile.shape[1],
        **_transform_args(transform),
        HAS_BIAS=bias is not None,
        METRICS=metrics,
        GROUP=16 // tile.element_size(),
        BLOCK_V=max(16, min(_FOLD_BLOCK, triton.next_power_of_2(tile.shape[1]))),
    )


def _grad_in_place(tile, bias, targets, lse, g_tok, v0: int, transform: HeadTransform):
    n, cols = tile.shape
    if n == 0:
        return
    block = max(16, min(_GRAD_BLOCK, triton.next_power_of_2(cols)))
    grad_tile_kernel[(n,)](
        tile,
        tile.stride(0),
        bias if bias is not None else tile,
        targets,
        lse,
        g_tok,
        v0,
        cols,
        **_transform_args(transform),
        HAS_BIAS=bias is not None,
        INTERPRET=interpreting(),
        BLOCK_V=block,
    )


def _tile_mm(h: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """``h @ w.T`` into a tile whose row stride is padded to 16 elements, so that every row
    starts 16-byte aligned (vectorised loads and stores whatever the chunk width)."""
    cols = w.shape[0]
    buf = torch.empty(h.shape[0], -(-cols // 16) * 16, device=h.device, dtype=h.dtype)
    return torch.mm(h, w.t(), out=buf[:, :cols])


def _chunk_weight(side: HeadSide, v0: int, v1: int):
    w = side.weight[v0:v1].to(side.compute_dtype)
    return w, None if side.bias is None else side.bias


# --------------------------------------------------------------------- passes
def score_tokens(
    side: HeadSide,
    layout: TokenLayout,
    transform: HeadTransform,
    rows_per_tile: int,
    *,
    want_lse: bool = False,
    metrics: dict | None = None,
):
    """Vocabulary-outer scoring: per-token log-probs ``(N,)`` and, if asked, log-sum-exps and metrics."""
    n, vocab, dev = layout.num_tokens, side.vocab, side.hidden_rows.device
    stats = _RunningStats(n, dev, metrics is not None)
    plan = _Chunking.for_call(n, vocab, rows_per_tile * vocab)
    with on_device_of(side.hidden_rows):
        for v0 in range(0, vocab, plan.vocab_chunk):
            v1 = min(vocab, v0 + plan.vocab_chunk)
            w, bias = _chunk_weight(side, v0, v1)
            for t0 in range(0, n, plan.token_tile):
                t1 = min(n, t0 + plan.token_tile)
                h = side.hidden_rows.index_select(0, layout.hidden_index[t0:t1]).to(side.compute_dtype)
                tile = _tile_mm(h, w)
                _fold(tile, bias, layout.targets[t0:t1], stats, slice(t0, t1), v0, transform, metrics is not None)
                del tile
    lse = stats.lse()
    if metrics is not None:
        stats.write_metrics(metrics, slice(0, n), vocab)
    token_logp = (stats.target - lse).to(side.acc_dtype)
    return token_logp, (lse.to(side.acc_dtype) if want_lse else None)


def backward_tiles(
    side: HeadSide,
    layout: TokenLayout,
    transform: HeadTransform,
    lse,
    g_tok,
    rows_per_tile: int,
    need: tuple[bool, bool, bool],
) -> HeadGrads:
    """Vocabulary-outer recompute pass: each chunk against all tokens, fp32 accumulators of one chunk."""
    n, vocab, dev = layout.num_tokens, side.vocab, side.hidden_rows.device
    f32 = dict(device=dev, dtype=torch.float32)
    acc_hidden = torch.zeros(n, side.hidden_rows.shape[1], **f32) if need[0] else None
    # Written chunk by chunk from the fp32 accumulator: never an fp32 copy of the whole weight.
    grad_weight = torch.empty_like(side.weight) if need[1] else None
    grad_bias = torch.zeros(vocab, **f32) if need[2] and side.bias is not None else None
    plan = _Chunking.for_call(n, vocab, rows_per_tile * vocab)
    lse, g_tok = lse.float().contiguous(), g_tok.float().contiguous()
    with on_device_of(side.hidden_rows):
        for v0 in range(0, vocab, plan.vocab_chunk):
            v1 = min(vocab, v0 + plan.vocab_chunk)
            w, bias = _chunk_weight(side, v0, v1)
            acc_w = torch.zeros(v1 - v0, w.shape[1], **f32) if need[1] else None
            for t0 in range(0, n, plan.token_tile):
                t1 = min(n, t0 + plan.token_tile)
                h = side.hidden_rows.index_select(0, layout.hidden_index[t0:t1]).to(side.compute_dtype)
                tile = _tile_mm(h, w)
                _grad_in_place(tile, bias, layout.targets[t0:t1], lse[t0:t1], g_tok[t0:t1], v0, transform)
                if acc_hidden is not None:
                    _addmm_fp32(acc_hidden[t0:t1], tile, w)
                if acc_w is not None:
                    _addmm_fp32(acc_w, tile.t(), h)
                if grad_bias is not None:
                    grad_bias[v0:v1] += tile.sum(0, dtype=torch.float32)
                del tile
            if acc_w is not None:
                grad_weight[v0:v1] = acc_w.to(grad_weight.dtype)
    grad_hidden = None
    if acc_hidden is not None:
        grad_hidden = torch.zeros_like(side.hidden_rows)
        grad_hidden.index_copy_(0, layout.hidden_index, acc_hidden.to(grad_hidden.dtype))
    return HeadGrads(grad_hidden, grad_weight, grad_bias)


# --------------------------------------------------------------------- autograd
class OnePassHead(torch.autograd.Function):
    """Whole pairs per tile, full vocabulary: the gradients are computed in the forward
    (see ``linear_head_torch.OnePassHead`` for the contract)."""

    @staticmethod
    def forward(ctx, hidden_rows, weight, bias, plan: HeadPlan):
        ctx.set_materialize_grads(False)
        side = HeadSide(hidden_rows, weight, bias, plan.compute_dtype)
        layout, transform, dev = plan.layout, plan.transform, hidden_rows.device
        need = tuple(ctx.needs_input_grad[:3])
        grads = HeadGrads.zeros(side, (False, *need[1:]))
        grad_hidden = torch.zeros(hidden_rows.shape, device=dev, dtype=side.acc_dtype) if need[0] else None
        w = side.weight.to(side.compute_dtype)
        policy = torch.empty(layout.num_sequences, dtype=torch.float32, device=dev)
        lse_all = torch.empty(layout.num_tokens, dtype=torch.float32, device=dev)
        metrics = plan.new_metrics()
        with on_device_of(hidden_rows):
            for i0, i1 in plan.groups:
                tok, local = _group_tokens(layout, i0, i1)
                rows, tgt = layout.hidden_index[tok], layout.targets[tok]
                h = hidden_rows.index_select(0, rows).to(side.compute_dtype)
                tile = _tile_mm(h, w)
                stats = _RunningStats(tok.shape[0], dev, metrics is not None)
                _fold(tile, side.bias, tgt, stats, slice(None), 0, transform, metrics is not None)
                lse = stats.lse()
                lse_all[tok] = lse
                if metrics is not None:
                    stats.write_metrics(metrics, tok, side.vocab)
                seq, pi, g_tok = group_pair_grads(plan, i0, i1, stats.target - lse, local, torch.float32)
                policy[seq] = pi
                _grad_in_place(tile, side.bias, tgt, lse, g_tok, 0, transform)
                if grad_hidden is not None:
                    part = torch.zeros(tile.shape[0], w.shape[1], device=dev, dtype=torch.float32)
                    _addmm_fp32(part, tile, w)
                    grad_hidden.index_copy_(0, rows, part.to(side.acc_dtype))
                if grads.weight is not None:
                    _addmm_fp32(grads.weight, tile.t(), h)
                if grads.bias is not None:
                    grads.bias += tile.sum(0, dtype=torch.float32).to(grads.bias.dtype)
                del tile
        grads.hidden = grad_hidden
        loss = plan.finish(policy)
        plan.metrics = metrics
        ctx.save_for_backward(hidden_rows, weight, bias, lse_all)
        ctx.plan, ctx.grads = plan, grads
        return policy, loss.detach()

    @staticmethod
    @first_order
    def backward(ctx, g_policy, g_loss):
        return one_pass_backward(ctx, g_policy, g_loss)
