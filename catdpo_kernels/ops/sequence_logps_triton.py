"""``backend="triton"`` sequence log-probs as ``torch.library`` custom ops.

Custom ops keep ``torch.compile`` from tracing into the Triton launches (no
graph break) and carry fake kernels for shape propagation. Autograd is
registered on the forward op: only the policy logits get a gradient.
"""

from __future__ import annotations

import torch
import triton
from torch import Tensor

from ..kernels.sequence_logps import logits_grad_kernel, row_reduce_kernel, token_logps_kernel
from .device_guard import on_device_of
from .first_order import refuse_double_backward
from .triton_config import alignment_flags, interpreting, vocab_loop_config

_ROW_BLOCK_T = 1024


def _launch_forward(policy, ref, labels, ignore_index, shift, average):
    rows, tokens, vocab = policy.shape
    t_eff = tokens - int(shift)
    sides = 1 if ref is None else 2
    dev = policy.device
    token_logp = torch.empty(sides, rows, t_eff, device=dev, dtype=torch.float32)
    max_logsum = torch.empty(2, rows, t_eff, device=dev, dtype=torch.float32)  # per token, for the backward
    logps = torch.empty(sides, rows, device=dev, dtype=torch.float32)
    counts = torch.empty(rows, device=dev, dtype=torch.int32)
    other = policy if ref is None else ref
    cfg = vocab_loop_config(vocab, policy.dtype)
    with on_device_of(policy):
        token_logps_kernel[(rows * t_eff, sides)](
            policy,
            other,
            labels,
            token_logp,
            max_logsum,
            t_eff,
            vocab,
            policy.stride(0),
            policy.stride(1),
            other.stride(0),
            other.stride(1),
            labels.stride(0),
            labels.stride(1),
            ignore_index,
            SHIFT=int(shift),
            HAS_REF=ref is not None,
            VEC=16 // policy.element_size(),
            ALIGNED_P=alignment_flags(policy)[0],
            ALIGNED_R=alignment_flags(other)[0],
            **cfg.launch_kwargs(),
        )
        row_reduce_kernel[(rows, sides)](
            token_logp,
            labels,
            logps,
            counts,
            t_eff,
            labels.stride(0),
            labels.stride(1),
            ignore_index,
            rows,
            SHIFT=int(shift),
            AVERAGE=bool(average),
            BLOCK_T=min(triton.next_power_of_2(t_eff), _ROW_BLOCK_T),
        )
    return logps, max_logsum, counts


@torch.library.custom_op("catdpo_triton::sequence_logps_fwd", mutates_args=())
def sequence_logps_fwd(
    policy: Tensor, ref: Tensor | None, labels: Tensor, ignore_index: int, shift: bool, average: bool, inplace: bool
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Returns ``(policy_logps (2B,), ref_logps (2B,) or (0,), max_logsum (2, 2B, T'), counts (2B,) int32)``.

    ``max_logsum[0]`` is the per-token max logit and ``max_logsum[1]`` the log-sum of
    ``exp(x − max)``; kept apart, because one rounded fp32 sum loses accuracy at large logits.
    """
    logps, max_logsum, counts = _launch_forward(policy, ref, labels, ignore_index, shift, average)
    ref_logps = logps[1].clone() if ref is not None else logps.new_empty(0)
    return logps[0].clone(), ref_logps, max_logsum, counts


@sequence_logps_fwd.register_fake
def _(policy, ref, labels, ignore_index, shift, average, inplace):
    rows, tokens, _ = policy.shape
    f32 = dict(device=policy.device, dtype=torch.float32)
    ref_logps = policy.new_empty(rows if ref is not None else 0, dtype=torch.float32)
    return (
        policy.new_empty(rows, **f32),
        ref_logps,
        policy.new_empty(2, rows, tokens - int(shift), **f32),
        policy.new_empty(rows, dtype=torch.int32),
    )


def _launch_backward(grad_logps, logits, grad, labels, max_logsum, counts, ignore_index, shift, average):
    rows, tokens, vocab = logits.shape
    cfg = vocab_loop_config(vocab, logits.dtype)
    with on_device_of(logits):
        logits_grad_kernel[(rows * tokens,)](
            logits,
            grad,
            labels,
            max_logsum,
            grad_logps.contiguous(),
            counts,
            tokens,
            tokens - int(shift),
            vocab,
            logits.stride(0),
            logits.stride(1),
            grad.stride(0),
            grad.stride(1),
            labels.stride(0),
            labels.stride(1),
            ignore_index,
            SHIFT=int(shift),
            AVERAGE=bool(average),
            VEC=16 // logits.element_size(),
            ALIGNED=alignment_flags(logits)[0],
            SAME_PHASE=alignment_flags(logits, grad)[1],
            INTERPRET=interpreting(),
            **cfg.launch_kwargs(),
        )


@torch.library.custom_op("catdpo_triton::sequence_logps_bwd", mutates_args=())
def sequence_logps_bwd(
    grad_logps: Tensor,
    logits: Tensor,
    labels: Tensor,
    max_logsum: Tensor,
    counts: Tensor,
    ignore_index: int,
    shift: bool,
    average: bool,
) -> Tensor:
    grad = torch.empty(logits.shape, device=logits.device, dtype=logits.dtype)
    _launch_backward(grad_logps, logits, grad, labels, max_logsum, counts, ignore_index, shift, average)
    return grad


@sequence_logps_bwd.register_fake
def _(grad_logps, logits, labels, max_logsum, counts, ignore_index, shift, average):
    return torch.empty(logits.shape, device=logits.device, dtype=logits.dtype)


@torch.library.custom_op("catdpo_triton::sequence_logps_bwd_", mutates_args=("logits",))
def sequence_logps_bwd_inplace(
    grad_logps: Tensor,
    logits: Tensor,
    labels: Tensor,
    max_logsum: Tensor,
    counts: Tensor,
    ignore_index: int,
    shift: bool,
    average: bool,
) -> None:
    _launch_backward(grad_logps, logits, logits, labels, max_logsum, counts, ignore_index, shift, average)


@sequence_logps_bwd_inplace.register_fake
def _(grad_logps, logits, labels, max_logsum, counts, ignore_index, shift, average):
    return None


def _setup_context(ctx, inputs, output):
    policy, _, labels, ignore_index, shift, average, inplace = inputs
    _, _, max_logsum, counts = output
    ctx.save_for_backward(policy, labels, max_logsum, counts)
    ctx.opts = (ignore_index, shift, average, inplace)


def _backward(ctx, grad_policy, _grad_ref, _grad_max_logsum, _grad_counts):
    refuse_double_backward()
    policy, labels, max_logsum, counts = ctx.saved_tensors
    ignore_index, shift, average, inplace = ctx.opts
    if grad_policy is None:
        grad_policy = torch.zeros(policy.shape[0], device=policy.device, dtype=torch.float32)
    grad_policy = grad_policy.float()
    if inplace:
        sequence_logps_bwd_inplace(grad_policy, policy, labels, max_logsum, counts, ignore_index, shift, average)
        grad = policy
    else:
        grad = sequence_logps_bwd(grad_policy, policy, labels, max_logsum, counts, ignore_index, shift, average)
    return grad, None, None, None, None, None, None


sequence_logps_fwd.register_autograd(_backward, setup_context=_setup_context)


def policy_ref_logps_triton(
    policy_logits: Tensor,
    ref_logits: Tensor | None,
    labels: Tensor,
    *,
    ignore_index: int,
    average_log_prob: bool,
    shift_labels: bool,
    inplace_backward: bool = False,
) -> tuple[Tensor, Tensor | None]:
    """Policy and (optionally) reference sequence log-probs ``(2B,)`` fp32, in one launch."""
    policy_logps, ref_logps, _, _ = sequence_logps_fwd(
        policy_logits, ref_logits, labels, ignore_index, shift_labels, average_log_prob, inplace_backward
    )
    return policy_logps, (ref_logps.detach() if ref_logits is not None else None)
