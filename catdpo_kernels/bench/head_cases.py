"""What the fused-head mode (``catdpo-bench --head``) runs: shapes, inputs, the rows compared and their FLOPs.

Every row computes a Cat-DPO (or, for Liger, DPO) training step of the output
head: from the last hidden states ``hidden (2B, T, H)`` and the output
embedding ``weight (V, H)`` of the policy, and ``ref_hidden``/``ref_weight`` of
the reference model (forward only), to a scalar loss and the gradients of
``hidden`` and ``weight`` (only ``hidden`` for the ``*-frozen`` rows, where
``weight.requires_grad=False`` as with LoRA). Labels are scored shifted
(``shift_labels=True``: position ``t`` predicts ``labels[:, t + 1]``) and the
first quarter of every row is a masked prompt (label ``-100``).

Rows (``HeadVariant.label``):

- ``naive`` (baseline of every ratio): all logits ``hidden @ weight.T`` (policy and
  reference), then the plain TRL-style loss (``bench.naive``);
- ``naive-compiled``: the same composition under ``torch.compile``;
- ``ours-torch`` / ``ours-triton``: ``linear_loss(..., backend="torch"|"triton")``
  (triton on CUDA only);
- ``naive-frozen``, ``ours-<backend>-frozen``: the same with a frozen head;
  their ratios are against ``naive-frozen``;
- ``trl-chunked``: TRL's ``ChunkedLogProbFunction`` (the fused head of its
  ``DPOTrainer``, with its vocabulary chunk) for policy and reference,
  per-token log-probs masked and summed per sequence, then the Cat-DPO pair
  loss ``-logsigmoid(β·h − s·Δ)`` in plain torch with the same margins;
- ``liger-dpo``: Liger-Kernel's ``LigerFusedLinearDPOLoss`` (``loss_type=sigmoid``,
  ``use_ref_model=True``, summed log-probs over all tokens, gradients computed
  in its forward). Plain DPO: it has no per-category margins;
- ``cce``: Cut Cross-Entropy's ``linear_cross_entropy(..., reduction="none",
  shift=True)`` per-token losses, summed per sequence for policy and reference,
  then the same pair loss (its default gradient filtering is on).

All rows take the same inputs; a peer that is not installed, or cannot run on
this device, is a ``skipped`` row whose note says why.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from .cases import BETA, LOSS_OPTIONS, NUM_CATEGORIES, PROMPT_FRACTION, Skip, make_categories, parse_dims, split_list

# Defaults per device: the targets of the brief are defined at these shapes.
CPU_HEAD_SHAPE = "8x512x256x32000"
GPU_HEAD_SHAPE = "8x2048x4096x128256"
GPU_LONG_SHAPE = "8x8192x4096x128256"  # --long
CPU_SCALING_TOKENS = (512, 1024, 2048)
GPU_SCALING_TOKENS = (2048, 4096, 8192)

HEAD_OPTIONS = dict(LOSS_OPTIONS, shift_labels=True)

# TRL's DPOTrainer: trl.trainer.utils._CHUNKED_LOGPROB_CHUNK_SIZE (vocabulary columns per tile);
# read from the installed TRL when it has it.
TRL_DEFAULT_CHUNK_SIZE = 32768

ROLES = ("naive", "compiled", "ours", "peer")
PEERS = ("trl-chunked", "liger-dpo", "cce")
PEER_MODULES = {"trl-chunked": "trl", "liger-dpo": "liger_kernel", "cce": "cut_cross_entropy"}
INSTALL_HINTS = {
    "trl": "pip install trl",
    "liger_kernel": "pip install liger-kernel",
    "cut_cross_entropy": "pip install cut-cross-entropy",
}


@dataclass(frozen=True)
class HeadShape:
    rows: int  # 2B
    tokens: int  # T
    hidden: int  # H
    vocab: int  # V

    @classmethod
    def parse(cls, text: str) -> HeadShape:
        rows, tokens, hidden, vocab = parse_dims(text, 4, "a head shape looks like 2BxTxHxV, e.g. 8x512x256x32000")
        if rows < 2 or rows % 2 or tokens < 2 or hidden < 1 or vocab < 2:
            raise ValueError(f"head shape {text!r}: 2B must be even and >= 2, T >= 2, H >= 1, V >= 2")
        return cls(rows, tokens, hidden, vocab)

    def with_tokens(self, tokens: int) -> HeadShape:
        return HeadShape(self.rows, tokens, self.hidden, self.vocab)

    @property
    def prompt_tokens(self) -> int:
        return int(self.tokens * PROMPT_FRACTION)

    @property
    def counted_tokens(self) -> int:
        """Tokens scored under ``shift_labels`` (labels ``[1, T)`` that are not the masked prompt)."""
        return self.rows * (self.tokens - max(1, self.prompt_tokens))

    @property
    def scored_positions(self) -> int:
        """Positions with a next-token label, masked or not: ``2B·(T − 1)``."""
        return self.rows * (self.tokens - 1)

    @property
    def all_positions(self) -> int:
        return self.rows * self.tokens

    def to_dict(self) -> dict:
        return {"rows": self.rows, "tokens": self.tokens, "hidden": self.hidden, "vocab": self.vocab}

    def __str__(self) -> str:
        return f"{self.rows}x{self.tokens}x{self.hidden}x{self.vocab}"


def parse_head_shapes(texts) -> list[HeadShape]:
    return [HeadShape.parse(part) for part in split_list(texts)]


def default_head_shapes(device_type: str, *, scaling: bool, long: bool) -> list[HeadShape]:
    base = HeadShape.parse(GPU_HEAD_SHAPE if device_type == "cuda" else CPU_HEAD_SHAPE)
    if scaling:
        tokens = GPU_SCALING_TOKENS if device_type == "cuda" else CPU_SCALING_TOKENS
        return [base.with_tokens(t) for t in tokens]
    shapes = [base]
    if long and device_type == "cuda":
        shapes.append(HeadShape.parse(GPU_LONG_SHAPE))
    return shapes


# ------------------------------------------------------------------ inputs
@dataclass
class HeadInputs:
    """One set of ``linear_loss()`` inputs; ``hidden`` and ``weight`` are leaves that require grad."""

    hidden: torch.Tensor  # (2B, T, H)
    weight: torch.Tensor  # (V, H)
    ref_hidden: torch.Tensor
    ref_weight: torch.Tensor
    labels: torch.Tensor  # (2B, T), the first quarter -100
    categories: torch.Tensor  # (B,)
    margins: torch.Tensor  # (C,)

    def tensors(self) -> tuple:
        return (self.hidden, self.weight, self.ref_hidden, self.ref_weight, self.labels, self.categories, self.margins)

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors())

    def logits_bytes(self) -> int:
        """What one ``(2B, T, V)`` logits tensor in the inputs' dtype would take (never allocated by ours)."""
        return self.hidden.shape[0] * self.hidden.shape[1] * self.weight.shape[0] * self.hidden.element_size()

    def counted_hidden(self) -> torch.Tensor:
        """``(N_counted, H)``: the hidden rows the fused head projects (shifted labels, prompt masked)."""
        mask = self.labels[:, 1:] != -100
        return self.hidden.detach()[:, :-1][mask].contiguous()


def make_head_inputs(shape: HeadShape, dtype, device, *, seed: int = 0) -> HeadInputs:
    """Random hidden states (unit variance) and heads scaled so that logits have a std of about 2."""
    device = torch.device(device)
    gen = torch.Generator(device=device).manual_seed(seed)
    scale = 2.0 * shape.hidden**-0.5

    def randn(*size, mul=1.0):
        x = torch.randn(*size, device=device, dtype=torch.float32, generator=gen)
        return (x.mul_(mul) if mul != 1.0 else x).to(dtype)

    hidden = randn(shape.rows, shape.tokens, shape.hidden).requires_grad_(True)
    weight = randn(shape.vocab, shape.hidden, mul=scale).requires_grad_(True)
    ref_hidden = randn(shape.rows, shape.tokens, shape.hidden)
    ref_weight = randn(shape.vocab, shape.hidden, mul=scale)
    labels = torch.randint(0, shape.vocab, (shape.rows, shape.tokens), device=device, generator=gen)
    labels[:, : max(1, shape.prompt_tokens)] = -100
    categories, margins = make_categories(shape.rows // 2, device)
    return HeadInputs(hidden, weight, ref_hidden, ref_weight, labels, categories, margins)


# ---------------------------------------------------------------- variants
ForwardFn = Callable[[HeadInputs], tuple[torch.Tensor, list[torch.Tensor]]]


@dataclass
class HeadVariant:
    """One row. ``build(device)`` returns ``forward(inputs) -> (loss, tensors whose gradient is returned)``."""

    label: str
    role: str  # naive | compiled | ours | peer
    build: Callable[[torch.device], ForwardFn]
    backend: str | None = None  # ours: torch | triton
    frozen: bool = False
    baseline: bool = False
    notes: list = field(default_factory=list)
    # True: the gradients are computed during the forward, so "fwd" includes them and "bwd" only scales them
    grads_in_forward: bool = False

    @property
    def kind(self) -> str:
        return self.role if self.role != "ours" else f"ours-{self.backend}"


def _targets(inp: HeadInputs, frozen: bool) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """The policy weight as the variant sees it, and the tensors whose gradient it returns."""
    if frozen:
        return inp.weight.detach(), [inp.hidden]
    return inp.weight, [inp.hidden, inp.weight]


def _linear_loss_forward(backend: str, frozen: bool) -> ForwardFn:
    import catdpo_kernels

    def forward(inp: HeadInputs):
        weight, targets = _targets(inp, frozen)
        out = catdpo_kernels.linear_loss(
            inp.hidden,
            weight,
            inp.labels,
            inp.categories,
            inp.margins,
            ref_hidden=inp.ref_hidden,
            ref_weight=inp.ref_weight,
            backend=backend,
            **HEAD_OPTIONS,
        )
        return out.loss, targets

    return forward


def _naive_composition(hidden, weight, ref_hidden, ref_weight, labels, categories, margins):
    from .naive import naive_head_loss

    return naive_head_loss(hidden, weight, ref_hidden, ref_weight, labels, categories, margins, **HEAD_OPTIONS)


def _naive_forward(frozen: bool) -> ForwardFn:
    def forward(inp: HeadInputs):
        weight, targets = _targets(inp, frozen)
        args = (inp.ref_hidden, inp.ref_weight, inp.labels, inp.categories, inp.margins)
        return _naive_composition(inp.hidden, weight, *args), targets

    return forward


_COMPILED: dict = {}


def _compiled_forward(device: torch.device) -> ForwardFn:
    # One compiled function per process: dynamo recompiles (then goes dynamic) on new shapes.
    if "fn" not in _COMPILED:
        _COMPILED["fn"] = torch.compile(_naive_composition)
    fn = _COMPILED["fn"]

    def forward(inp: HeadInputs):
        return fn(inp.hidden, inp.weight, inp.ref_hidden, inp.ref_weight, inp.labels, inp.categories, inp.margins), [
            inp.hidden,
            inp.weight,
        ]

    return forward


def catdpo_pair_loss(policy: torch.Tensor, ref: torch.Tensor, categories: torch.Tensor, margins: torch.Tensor):
    """Cat-DPO's per-pair loss in plain torch, for the peers that only give log-probs:
    ``mean(-logsigmoid(β·h − s·Δ_c))``, ``s = 1`` for pairs with a category (no unsafe flags given)."""
    b = policy.shape[0] // 2
    policy, ref = policy.float(), ref.float()
    h = (policy[:b] - ref[:b]) - (policy[b:] - ref[b:])
    s = (categories >= 0).to(h.dtype)
    delta = margins.to(h.dtype)[categories.clamp(min=0)] * s
    return -F.logsigmoid(BETA * h - delta).mean()


def installed(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        return False


def not_installed(module: str) -> str | None:
    """Why an optional peer library cannot be used (with its pip command); None when it is importable."""
    return None if installed(module) else f"{module} is not installed ({INSTALL_HINTS[module]})"


def require(module: str) -> None:
    reason = not_installed(module)
    if reason:
        raise Skip(reason)


def pair_loss_forward(sequence_logps) -> ForwardFn:
    """A row for a library that only gives log-probs: ``sequence_logps(hidden, weight, labels)`` of the
    policy (with autograd) and of the reference (without), then ``catdpo_pair_loss``."""

    def forward(inp: HeadInputs):
        policy = sequence_logps(inp.hidden, inp.weight, inp.labels)
        with torch.no_grad():
            ref = sequence_logps(inp.ref_hidden, inp.ref_weight, inp.labels)
        return catdpo_pair_loss(policy, ref, inp.categories, inp.margins), [inp.hidden, inp.weight]

    return forward


def trl_chunk_size() -> int:
    """The vocabulary chunk TRL's ``DPOTrainer`` passes to ``ChunkedLogProbFunction`` (``add_fused_lm_head``)."""
    try:
        from trl.trainer import utils as trl_utils

        return int(getattr(trl_utils, "_CHUNKED_LOGPROB_CHUNK_SIZE", TRL_DEFAULT_CHUNK_SIZE))
    except Exception:  # noqa: BLE001 - an old or partial TRL: the documented value
        return TRL_DEFAULT_CHUNK_SIZE


def _trl_forward(device: torch.device) -> ForwardFn:
    require("trl")
    try:
        from trl.kernels.chunked_logprob import ChunkedLogProbFunction
    except ImportError as exc:
        raise Skip(f"this trl has no trl.kernels.chunked_logprob.ChunkedLogProbFunction ({exc})") from exc
    chunk = trl_chunk_size()

    def sequence_logps(hidden, weight, labels):
        # As TRL's add_fused_lm_head does on Triton devices: only the positions with a label are projected.
        h, tgt = hidden[:, :-1], labels[:, 1:]
        mask = tgt != -100
        logp = ChunkedLogProbFunction.apply(h[mask], weight, None, tgt[mask], 1.0, chunk, None, 1.0, ("log_probs",))[0]
        return logp.new_zeros(mask.shape).masked_scatter(mask, logp).sum(1)

    return pair_loss_forward(sequence_logps)


def liger_dpo_module():
    from liger_kernel.chunked_loss import LigerFusedLinearDPOLoss

    kwargs = dict(ignore_index=-100, beta=BETA, use_ref_model=True)
    try:
        return LigerFusedLinearDPOLoss(**kwargs, compute_nll_loss=False, average_log_prob=False)
    except TypeError:
        try:
            return LigerFusedLinearDPOLoss(**kwargs)
        except TypeError as exc:  # an old Liger without reference-model support
            raise Skip(f"this liger_kernel has no use_ref_model ({exc})") from exc


def _liger_forward(device: torch.device) -> ForwardFn:
    require("liger_kernel")
    module = liger_dpo_module()

    def forward(inp: HeadInputs):
        # Liger scores hidden[t] against target[t]: shift by hand (views, no copies).
        out = module(
            inp.weight,
            inp.hidden[:, :-1],
            inp.labels[:, 1:],
            ref_input=inp.ref_hidden[:, :-1],
            ref_weight=inp.ref_weight,
        )
        loss = out[0] if isinstance(out, (tuple, list)) else out
        return loss, [inp.hidden, inp.weight]

    return forward


def _cce_forward(device: torch.device) -> ForwardFn:
    require("cut_cross_entropy")
    from cut_cross_entropy import linear_cross_entropy

    def sequence_logps(hidden, weight, labels):
        nll = linear_cross_entropy(hidden, weight, labels, ignore_index=-100, reduction="none", shift=True)
        return -nll.float().sum(-1)  # (2B, T - 1), zero where the label is -100

    return pair_loss_forward(sequence_logps)


def fused_backend(device_type: str) -> str:
    """The backend of ours that the targets hold to: triton on CUDA, torch elsewhere."""
    return "triton" if device_type == "cuda" else "torch"


def head_variants(device: torch.device, *, scaling: bool = False) -> list[HeadVariant]:
    """The rows of one case, in the order of the table (the timing order rotates, see ``head_runner``)."""
    fused = fused_backend(device.type)
    ours = [
        HeadVariant("ours-torch", "ours", lambda d: _linear_loss_forward("torch", False), backend="torch"),
        HeadVariant("ours-triton", "ours", lambda d: _linear_loss_forward("triton", False), backend="triton"),
    ]
    if device.type == "cuda":
        ours.reverse()  # the fused row first
    if scaling:
        return [
            HeadVariant("naive", "naive", lambda d: _naive_forward(False), baseline=True),
            *[v for v in ours if v.backend == fused],
        ]
    rows = [
        HeadVariant("naive", "naive", lambda d: _naive_forward(False), baseline=True),
        HeadVariant(
            "naive-compiled",
            "compiled",
            _compiled_forward,
            notes=["torch.compile of hidden @ weight.T + loss(backend='reference') (linear_loss is compile-disabled)"],
        ),
        *ours,
        HeadVariant("naive-frozen", "naive", lambda d: _naive_forward(True), frozen=True, baseline=True),
        HeadVariant(
            f"ours-{fused}-frozen",
            "ours",
            lambda d: _linear_loss_forward(fused, True),
            backend=fused,
            frozen=True,
        ),
        HeadVariant("trl-chunked", "peer", _trl_forward),
        HeadVariant(
            "liger-dpo",
            "peer",
            _liger_forward,
            grads_in_forward=True,
            notes=["plain DPO (no per-category margins); gradients computed in its forward"],
        ),
        HeadVariant("cce", "peer", _cce_forward),
    ]
    return rows


def skip_reason(variant: HeadVariant, device: torch.device) -> str | None:
    """Why a row cannot run here, known before trying it (a peer that fails on this device is skipped later)."""
    if variant.backend == "triton":
        if device.type != "cuda":
            return "triton needs a CUDA device (the TRITON_INTERPRET=1 interpreter is never benchmarked)"
        if not installed("triton"):
            return "triton is not installed"
    if variant.role == "peer":
        return not_installed(PEER_MODULES[variant.label])
    return None


# ------------------------------------------------------------------- FLOPs
def head_schedule(loss: torch.Tensor) -> str | None:
    """``one-pass`` or ``two-pass``: which fused-head schedule built this loss (read off its autograd graph)."""
    seen, stack = set(), [loss.grad_fn]
    while stack:
        fn = stack.pop()
        if fn is None or id(fn) in seen:
            continue
        seen.add(id(fn))
        name = type(fn).__name__
        if "OnePassHead" in name:
            return "one-pass"
        if "TwoPassHead" in name:
            return "two-pass"
        stack.extend(f for f, _ in getattr(fn, "next_functions", ()))
    return None


FLOP_MODEL = (
    "GFLOP = GEMMs x 2*M*H*V, M = the tokens each row projects: "
    "naive and naive-compiled: 4 GEMMs over all 2B*T positions (policy logits, grad hidden, grad weight; "
    "reference logits); ours: 3 over the counted tokens in the one-pass schedule (the logits gradient is formed "
    "while the tile is resident) or 4 in the two-pass one (+ recompute), +1 for the reference; "
    "trl-chunked and cce: 5 over the counted tokens (forward, recompute, 2 gradient GEMMs; reference); "
    "liger-dpo: 4 over all 2B*(T-1) scored positions (no recompute, no masking); a frozen head: one GEMM less. "
    "TFLOP/s = GFLOP / fwd+bwd time; % GEMM = TFLOP/s / that of hidden_counted @ W.T timed alone"
)


def flop_count(variant: HeadVariant, shape: HeadShape, schedule: str | None) -> dict | None:
    """The GEMMs a row does in one fwd+bwd (see ``FLOP_MODEL``)."""
    if variant.role in ("naive", "compiled"):
        tokens, gemms = shape.all_positions, 4
    elif variant.role == "ours":
        if schedule is None:
            return None
        tokens, gemms = shape.counted_tokens, (3 if schedule == "one-pass" else 4) + 1
    elif variant.label == "liger-dpo":
        tokens, gemms = shape.scored_positions, 4
    elif variant.label in ("trl-chunked", "cce"):
        tokens, gemms = shape.counted_tokens, 5
    else:
        return None
    if variant.frozen:
        gemms -= 1
    flops = gemms * 2 * tokens * shape.hidden * shape.vocab
    return {"gemms": gemms, "tokens": tokens, "flops": flops, "schedule": schedule}


__all__ = [
    "HeadInputs",
    "HeadShape",
    "HeadVariant",
    "NUM_CATEGORIES",
    "catdpo_pair_loss",
    "default_head_shapes",
    "flop_count",
    "head_schedule",
    "head_variants",
    "make_head_inputs",
    "parse_head_shapes",
    "skip_reason",
]
