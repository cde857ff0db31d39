"""Launch configuration of the vocab-loop kernels, chosen from ``V`` and the dtype.

The kernels are memory-bound: one program streams one token's ``V`` logits,
so the block only has to be wide enough to keep enough bytes in flight per
SM. ``CATDPO_TRITON_CONFIG="BLOCK_V=8192,num_warps=16"`` overrides the choice;
it exists for ``catdpo-bench --triton-config`` sweeps on a GPU, not for users.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import triton

ENV_OVERRIDE = "CATDPO_TRITON_CONFIG"
# Upper bound on BLOCK_V; tests lower it to exercise multi-block vocab loops in the interpreter.
MAX_BLOCK_V = 8192


@dataclass(frozen=True)
class VocabLoopConfig:
    BLOCK_V: int
    num_warps: int

    def launch_kwargs(self) -> dict:
        return {"BLOCK_V": self.BLOCK_V, "num_warps": self.num_warps}


def _parse_override(text: str) -> dict:
    out = {}
    for part in text.split(","):
        key, _, value = part.partition("=")
        key = key.strip()
        if key not in ("BLOCK_V", "num_warps") or not value.strip().isdigit():
            raise ValueError(f"{ENV_OVERRIDE} must look like 'BLOCK_V=4096,num_warps=8', got {text!r}")
        out[key] = int(value)
    if "BLOCK_V" in out and out["BLOCK_V"] & (out["BLOCK_V"] - 1):
        raise ValueError(f"{ENV_OVERRIDE}: BLOCK_V must be a power of two, got {out['BLOCK_V']}")
    return out


def vocab_loop_config(vocab: int, dtype: torch.dtype) -> VocabLoopConfig:
    # 16 KiB of input per block iteration for any element size, capped by V.
    per_block = 16384 // dtype.itemsize
    # At least 16 columns: a block holds whole 16-byte vectors (the forward groups lanes by vector).
    block = max(16, min(triton.next_power_of_2(vocab), per_block, MAX_BLOCK_V))
    # 8 warps over a 16 KiB block: 16-32 logits per thread, the fewest SASS instructions per logit
    # of the configurations compared at sm_90 (see catdpo_kernels/bench/sass.py).
    warps = 8 if block >= 2048 else 4 if block >= 512 else 2
    override = os.environ.get(ENV_OVERRIDE)
    if override:
        parsed = _parse_override(override)
        block = parsed.get("BLOCK_V", block)
        warps = parsed.get("num_warps", warps)
    return VocabLoopConfig(BLOCK_V=block, num_warps=warps)


def interpreting() -> bool:
    """Running under ``TRITON_INTERPRET=1`` (the kernels then keep their exact integer rounding)."""
    return os.environ.get("TRITON_INTERPRET") == "1"


def alignment_flags(x: torch.Tensor, other: torch.Tensor | None = None) -> tuple[bool, bool]:
    """``(x is 16-byte aligned, other is too and its rows sit at the same 16-byte phase as x's)``.

    The kernels split each row into a masked head, an aligned body and a masked
    tail; the body's alignment hint is only given when it is true.
    """
    aligned = x.data_ptr() % 16 == 0
    if other is None:
        return aligned, False
    vec = 16 // x.element_size()
    same = (
        aligned
        and other.data_ptr() % 16 == 0
        and other.element_size() == x.element_size()
        and all((a - b) % vec == 0 for a, b in zip(x.stride()[:-1], other.stride()[:-1]))
    )
    return aligned, same
