"""The fused LM head in plain PyTorch (``backend="torch"``): log-probs from hidden states, never all logits.

Only counted tokens are projected (``TokenLayout``), one *tile* of rows at a
time, each tile holding the full vocabulary so that one in-place
``log_softmax`` gives exact log-probs. A tile never exceeds the memory budget,
which does not grow with ``B`` or ``T``.

Two schedules, chosen per call by ``plan_head``:

* **one pass** (a scalar reduction, and whole preference pairs fit a tile): the
  gradients are computed during the forward. A tile holds every counted token
  of a group of pairs, so the pair loss and its ``∂ℓ/∂π`` are known while the
  tile is resident; the tile turns into ``g·(onehot − p)`` in place and the two
  gradient GEMMs run at once. Three GEMMs over the counted tokens instead of
  four, and no recompute. The backward only scales the stored gradients by the
  upstream scalar (and adds a recompute pass for any extra gradient that reaches
  ``policy_logps`` directly, e.g. an SFT term).
* **two passes** (``reduction="none"``, or pairs too large for the budget): the
  forward keeps each token's log-sum-exp; the backward recomputes each tile.

Gradients accumulate in fp32 (float64 for float64 inputs) and land in the
inputs' dtypes at the end. With a frozen weight (``requires_grad=False``, e.g.
LoRA) the weight-gradient GEMM is skipped entirely.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..head import HeadPlan, HeadTransform, TokenLayout
from .first_order import first_order


# --------------------------------------------------------------------- one side
@dataclass
class HeadSide:
    """One model's output head applied to one batch: ``hidden_rows (R, H)``, ``weight (V, H)``, ``bias``."""

    hidden_rows: torch.Tensor
    weight: torch.Tensor
    bias: torch.Tensor | None
    compute_dtype: torch.dtype

    @property
    def acc_dtype(self) -> torch.dtype:
        return torch.float64 if self.compute_dtype == torch.float64 else torch.float32

    @property
    def vocab(self) -> int:
        return self.weight.shape[0]

    def weight_acc(self) -> torch.Tensor:
        """The weight in the accumulation dtype, for the gradient GEMMs (a copy only for half weights)."""
        return self.weight.to(self.acc_dtype)

    def project(self, rows: torch.Tensor, transform: HeadTransform) -> torch.Tensor:
        """``(n, V)`` transformed logits of the hidden rows ``rows``, in the accumulation dtype."""
        h = self.hidden_rows.index_select(0, rows).to(self.compute_dtype)
        tile = torch.mm(h, self.weight.to(self.compute_dtype).t())
        if tile.dtype != self.acc_dtype:
            tile = tile.to(self.acc_dtype)
        if self.bias is not None:
            tile.add_(self.bias.to(self.acc_dtype))
        return transform.apply_(tile)


def tile_element_bytes(side: HeadSide, transform: HeadTransform) -> int:
    """Bytes per logit a tile costs: the accumulation tile, plus the half-precision GEMM output
    and the soft-cap's saved copy when those exist."""
    acc = torch.finfo(side.acc_dtype).bits // 8
    extra = acc if transform.softcap is not None else 0
    if side.compute_dtype != side.acc_dtype:
        extra += torch.finfo(side.compute_dtype).bits // 8
    return acc + extra


def one_pass_extra_bytes(side: HeadSide, need_weight_grad: bool) -> int:
    """The weight-gradient accumulator of either schedule, unless it is the returned gradient itself."""
    if not need_weight_grad or side.weight.dtype == side.acc_dtype:
        return 0
    return side.weight.numel() * (torch.finfo(side.acc_dtype).bits // 8)


# --------------------------------------------------------------------- metrics
METRIC_NAMES = ("entropy", "mean_logit", "top1")


def _tile_metrics(z: torch.Tensor, logp: torch.Tensor | None, targets: torch.Tensor, out: dict, sl: slice) -> None:
    """Per-token metrics of a tile of transformed logits ``z`` (before its softmax) into ``out``."""
    out["mean_logit"][sl] = z.mean(-1)
    out["top1"][sl] = (z.argmax(-1) == targets).to(out["top1"].dtype)


def _entropy_rows(logp: torch.Tensor, chunk: int = 256) -> torch.Tensor:
    """``−Σ p·log p`` per row of a log-softmax tile, a few rows at a time (bounded temporary)."""
    out = torch.empty(logp.shape[0], dtype=logp.dtype, device=logp.device)
    for r in range(0, logp.shape[0], chunk):
        block = logp[r : r + chunk]
        out[r : r + chunk] = -(block.exp() * block).sum(-1)
    return out


# --------------------------------------------------------------------- forward
def score_tokens(
    side: HeadSide,
    layout: TokenLayout,
    transform: HeadTransform,
    rows_per_tile: int,
    *,
    want_lse: bool = False,
    metrics: dict | None = None,
):
    """Per-token log-probs ``(N,)`` (and log-sum-exps, and ``metrics``) over token tiles.

    The tile is turned into its ``log_softmax`` in place, so the target's
    log-prob is read off exactly, and ``lse = z_target − log p_target``.
    """
    n = layout.num_tokens
    dev = side.hidden_rows.device
    token_logp = torch.empty(n, dtype=side.acc_dtype, device=dev)
    lse = torch.empty(n, dtype=side.acc_dtype, device=dev) if want_lse else None
    for t0 in range(0, n, rows_per_tile):
        sl = slice(t0, min(n, t0 + rows_per_tile))
        tgt = layout.targets[sl].unsqueeze(1)
        tile = side.project(layout.hidden_index[sl], transform)
        if metrics is not None:
            _tile_metrics(tile, None, layout.targets[sl], metrics, sl)
        z_t = tile.gather(1, tgt).squeeze(1)
        torch.log_softmax(tile, -1, out=tile)
        lp = tile.gather(1, tgt).squeeze(1)
        token_logp[sl] = lp
        if lse is not None:
            lse[sl] = z_t - lp
        if metrics is not None and "entropy" in metrics:
            metrics["entropy"][sl] = _entropy_rows(tile)
        del tile
    return token_logp, lse


def sequence_logps(token_logp: torch.Tensor, layout: TokenLayout, average: bool) -> torch.Tensor:
    """``(2B,)`` sums (or means) of the token log-probs; NaN for sequences with an out-of-range label."""
    sums = layout.sequence_sums(token_logp)
    if average:
        sums = sums / layout.counts.clamp(min=1).to(sums.dtype)
    sums = torch.where(layout.bad, float("nan"), sums)
    return sums.to(token_logp.dtype)


def token_grads(g_seq: torch.Tensor, layout: TokenLayout, average: bool) -> torch.Tensor:
    """``(N,)`` upstream gradient of each counted token's log-prob."""
    if average:
        g_seq = g_seq / layout.counts.clamp(min=1).to(g_seq.dtype)
    return g_seq[layout.seq_ids]


# --------------------------------------------------------------------- gradients
@dataclass
class HeadGrads:
    """Gradient accumulators: ``hidden (R, H)``, ``weight (V, H)``, ``bias (V,)``; ``None`` where not needed."""

    hidden: torch.Tensor | None
    weight: torch.Tensor | None
    bias: torch.Tensor | None

    @classmethod
    def zeros(cls, side: HeadSide, need: tuple[bool, bool, bool]) -> HeadGrads:
        acc, dev = side.acc_dtype, side.hidden_rows.device
        return cls(
            torch.zeros(side.hidden_rows.shape, dtype=acc, device=dev) if need[0] else None,
            torch.zeros(side.weight.shape, dtype=acc, device=dev) if need[1] else None,
            torch.zeros(side.vocab, dtype=acc, device=dev) if need[2] and side.bias is not None else None,
        )

    def add_tile(self, grad_tile: torch.Tensor, rows: torch.Tensor, side: HeadSide, weight_acc: torch.Tensor) -> None:
        """Fold one tile's logits gradient ``(n, V)`` into the three accumulators."""
        if self.hidden is not None:
            self.hidden.index_add_(0, rows, torch.mm(grad_tile, weight_acc))
        if self.weight is not None:
            h = side.hidden_rows.index_select(0, rows).to(grad_tile.dtype)
            self.weight.addmm_(grad_tile.t(), h)
        if self.bias is not None:
            self.bias.add_(grad_tile.sum(0))

    def scale_(self, factor: torch.Tensor) -> HeadGrads:
        for g in (self.hidden, self.weight, self.bias):
            if g is not None:
                g.mul_(factor)
        return self

    def add_(self, other: HeadGrads) -> HeadGrads:
        for mine, theirs in ((self.hidden, other.hidden), (self.weight, other.weight), (self.bias, other.bias)):
            if mine is not None and theirs is not None:
                mine.add_(theirs)
        return self

    def cast(self, side: HeadSide) -> tuple:
        def to(g, like):
            return None if g is None else g.to(like.dtype)

        return to(self.hidden, side.hidden_rows), to(self.weight, side.weight), to(self.bias, side.bias)


def logp_to_grad_(tile: torch.Tensor, targets: torch.Tensor, g_tok: torch.Tensor) -> torch.Tensor:
    """In place: a ``log_softmax`` tile becomes ``g·(onehot − p)``; the target entry is ``g·(1 − p)``,
    folded in as ``−g·p + g`` in the accumulation dtype."""
    g = g_tok.unsqueeze(1)
    tile.exp_().mul_(-g)
    tile.scatter_add_(1, targets.unsqueeze(1), g)
    return tile


def backward_tiles(
    side: HeadSide,
    layout: TokenLayout,
    transform: HeadTransform,
    lse: torch.Tensor,
    g_tok: torch.Tensor,
    rows_per_tile: int,
    need: tuple[bool, bool, bool],
) -> HeadGrads:
    """The recompute pass: each tile again, ``g·(onehot − softmax)``, then the gradient GEMMs."""
    grads = HeadGrads.zeros(side, need)
    w_acc = side.weight_acc() if need[0] else None
    for t0 in range(0, layout.num_tokens, rows_per_tile):
        sl = slice(t0, min(layout.num_tokens, t0 + rows_per_tile))
        rows = layout.hidden_index[sl]
        tile = side.project(rows, transform)
        z = tile.clone() if transform.softcap is not None else None
        tile.sub_(lse[sl].unsqueeze(1))  # log p
        logp_to_grad_(tile, layout.targets[sl], g_tok[sl].to(tile.dtype))
        transform.chain_grad_(tile, z)
        grads.add_tile(tile, rows, side, w_acc)
        del tile, z
    return grads


# --------------------------------------------------------------------- autograd
class TwoPassHead(torch.autograd.Function):
    """``hidden, weight, bias -> (2B,)`` policy log-probs; the backward recomputes every tile.

    Shared by the fused backends: ``plan.kernels`` supplies ``score_tokens`` and ``backward_tiles``.
    """

    @staticmethod
    def forward(ctx, hidden_rows, weight, bias, plan: HeadPlan):
        side = HeadSide(hidden_rows, weight, bias, plan.compute_dtype)
        metrics = plan.new_metrics()
        token_logp, lse = plan.kernels.score_tokens(
            side, plan.layout, plan.transform, plan.rows_per_tile, want_lse=True, metrics=metrics
        )
        ctx.save_for_backward(hidden_rows, weight, bias, lse)
        ctx.plan = plan
        plan.metrics = metrics
        return sequence_logps(token_logp, plan.layout, plan.average)

    @staticmethod
    @first_order
    def backward(ctx, g_logps):
        hidden_rows, weight, bias, lse = ctx.saved_tensors
        plan = ctx.plan
        side = HeadSide(hidden_rows, weight, bias, plan.compute_dtype)
        g_tok = token_grads(g_logps.to(side.acc_dtype), plan.layout, plan.average)
        grads = plan.kernels.backward_tiles(
            side, plan.layout, plan.transform, lse, g_tok, plan.rows_per_tile, ctx.needs_input_grad[:3]
        )
        return (*grads.cast(side), None)


def one_pass_backward(ctx, g_policy, g_loss):
    """The backward of a one-pass head: the stored gradients scaled by the loss's upstream scalar,
    plus a recompute pass (``plan.kernels.backward_tiles``) for a gradient that reaches
    ``policy_logps`` by another route. ``ctx`` saved ``(hidden_rows, weight, bias, lse)``,
    ``ctx.plan`` and ``ctx.grads``."""
    hidden_rows, weight, bias, lse = ctx.saved_tensors
    plan, side = ctx.plan, HeadSide(hidden_rows, weight, bias, ctx.plan.compute_dtype)
    total = None
    if g_loss is not None:
        if ctx.grads is None:
            raise RuntimeError(
                "the fused head computed its gradients in the forward and they were already used: "
                "backpropagate the loss only once per forward (no retain_graph reuse of the loss)"
            )
        total, ctx.grads = ctx.grads.scale_(g_loss.to(side.acc_dtype)), None
    if g_policy is not None:
        g_tok = token_grads(g_policy.to(side.acc_dtype), plan.layout, plan.average)
        extra = plan.kernels.backward_tiles(
            side, plan.layout, plan.transform, lse, g_tok, plan.rows_per_tile, ctx.needs_input_grad[:3]
        )
        total = extra if total is None else total.add_(extra)
    if total is None:
        return None, None, None, None
    return (*total.cast(side), None)


def _group_tokens(layout: TokenLayout, i0: int, i1: int) -> tuple[torch.Tensor, list[int]]:
    """The counted tokens of pairs ``[i0, i1)`` (chosen sequences, then rejected) and local offsets."""
    b, off = layout.num_sequences // 2, layout.offsets
    spans = [(off[i0], off[i1]), (off[b + i0], off[b + i1])]
    dev = layout.targets.device
    tok = torch.cat([torch.arange(lo, hi, device=dev) for lo, hi in spans])
    local = [o - off[i0] for o in off[i0 : i1 + 1]]
    shift = local[-1] - off[b + i0]
    local += [o + shift for o in off[b + i0 + 1 : b + i1 + 1]]
    return tok, local


def _local_sums(per_token: torch.Tensor, local_offsets: list[int]) -> torch.Tensor:
    cs = torch.cat([per_token.new_zeros(1, dtype=torch.float64), torch.cumsum(per_token.double(), 0)])
    off = torch.tensor(local_offsets, device=per_token.device)
    return cs[off[1:]] - cs[off[:-1]]


def group_pair_grads(plan: HeadPlan, i0: int, i1: int, token_logp: torch.Tensor, local: list[int], dtype):
    """A one-pass group's sequences, their log-probs and each token's upstream gradient.

    Returns ``(seq (2k,), π (2k,), g_tok (n,))``: the group's sequence ids (chosen
    ones first), their log-probs from the tile's token log-probs, and
    ``∂(reduced loss)/∂ log p`` of every token of the tile (``plan.pair_grad`` per
    sequence, divided by the token count with ``average_log_prob``).
    """
    layout, dev = plan.layout, token_logp.device
    b = layout.num_sequences // 2
    seq = torch.cat([torch.arange(i0, i1, device=dev), torch.arange(b + i0, b + i1, device=dev)])
    counts = layout.counts[seq].clamp(min=1).double()
    sums = _local_sums(token_logp, local)
    pi = torch.where(layout.bad[seq], float("nan"), sums / counts if plan.average else sums).to(dtype)
    g_seq = plan.pair_grad(pi, i0, i1).to(dtype)
    if plan.average:
        g_seq = g_seq / counts.to(dtype)
    lengths = torch.tensor(local, device=dev).diff()
    return seq, pi, g_seq[torch.repeat_interleave(torch.arange(len(local) - 1, device=dev), lengths)].contiguous()


class OnePassHead(torch.autograd.Function):
    """``hidden, weight, bias -> (policy_logps (2B,), reduced loss)``, gradients computed in the forward.

    ``plan.groups`` are ranges of whole pairs that fit one tile; ``plan.pair_grad``
    gives each group's ``∂(reduced loss)/∂π`` and ``plan.finish`` the reduced loss
    from all log-probs. The backward scales the stored gradients by the loss's
    upstream scalar, and runs the recompute pass only for a gradient that reaches
    ``policy_logps`` by another route.
    """

    @staticmethod
    def forward(ctx, hidden_rows, weight, bias, plan: HeadPlan):
        ctx.set_materialize_grads(False)
        side = HeadSide(hidden_rows, weight, bias, plan.compute_dtype)
        layout, transform = plan.layout, plan.transform
        need = tuple(ctx.needs_input_grad[:3])
        grads = HeadGrads.zeros(side, need)
        w_acc = side.weight_acc() if need[0] else None
        acc, dev = side.acc_dtype, hidden_rows.device
        policy = torch.empty(layout.num_sequences, dtype=acc, device=dev)
        lse = torch.empty(layout.num_tokens, dtype=acc, device=dev)
        metrics = plan.new_metrics()
        for i0, i1 in plan.groups:
            tok, local = _group_tokens(layout, i0, i1)
            rows, tgt = layout.hidden_index[tok], layout.targets[tok]
            tile = side.project(rows, transform)
            if metrics is not None:
                _tile_metrics(tile, None, tgt, metrics, tok)
            z = tile.clone() if transform.softcap is not None else None
            z_t = tile.gather(1, tgt.unsqueeze(1)).squeeze(1)
            torch.log_softmax(tile, -1, out=tile)
            lp = tile.gather(1, tgt.unsqueeze(1)).squeeze(1)
            lse[tok] = z_t - lp
            if metrics is not None and "entropy" in metrics:
                metrics["entropy"][tok] = _entropy_rows(tile)
            seq, pi, g_tok = group_pair_grads(plan, i0, i1, lp, local, acc)
            policy[seq] = pi
            logp_to_grad_(tile, tgt, g_tok)
            transform.chain_grad_(tile, z)
            grads.add_tile(tile, rows, side, w_acc)
            del tile, z
        loss = plan.finish(policy)
        plan.metrics = metrics
        ctx.save_for_backward(hidden_rows, weight, bias, lse)
        ctx.plan, ctx.grads = plan, grads
        return policy, loss.detach()

    @staticmethod
    @first_order
    def backward(ctx, g_policy, g_loss):
        return one_pass_backward(ctx, g_policy, g_loss)
