"""What the benchmark runs: shapes, dtypes, the variants compared, and their inputs.

A *case* is one ``(2B, T, V, dtype)`` point of the sweep. A *variant* is one way
of computing the Cat-DPO loss on it (a row of the table):

- ``reference``: the naive eager path (``bench.naive``, the plain TRL-style loss: fp32
  upcast, ``log_softmax``, gather). It is the baseline of every ratio.
- ``compiled``: the same naive path under ``torch.compile``.
- ``torch``: the chunked, memory-bounded torch backend.
- ``triton``: the fused kernels (CUDA only; the interpreter is never timed),
  optionally once per ``--triton-config``.
- ``*-inplace``: ``inplace_backward=True`` (the gradient overwrites the logits).

Every timed call uses ``check_inputs=False``: the value checks read tensor
contents, which on CUDA is a host sync, and training loops turn them off too.
The logits handed to ``loss()`` are an intermediate that shares the leaf's
buffer (as an ``lm_head`` output is not a leaf either), so
``inplace_backward=True`` is allowed; the gradient is taken with
``torch.autograd.grad`` with respect to that intermediate, so nothing accumulates.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

DTYPES = {
    "fp32": torch.float32,
    "float32": torch.float32,
    "bf16": torch.bfloat16,
    "bfloat16": torch.bfloat16,
    "fp16": torch.float16,
    "float16": torch.float16,
}
DTYPE_NAMES = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}

# Defaults per device. The first entry is the target shape of docs/design.md
# ("Performance model"); the others give the plot a V axis and a T axis.
CPU_DEFAULT_SHAPES = ("8x512x32000", "8x512x4000", "8x64x32000")
CPU_DEFAULT_DTYPES = ("fp32",)
GPU_DEFAULT_SHAPES = ("8x2048x128256", "8x2048x32000", "8x512x128256")
GPU_DEFAULT_DTYPES = ("bf16",)
CPU_DEFAULT_BACKENDS = ("reference", "torch", "compiled")
GPU_DEFAULT_BACKENDS = ("reference", "triton", "compiled", "torch")
KNOWN_BACKENDS = ("reference", "compiled", "torch", "triton")

# The loss every variant computes (the full Cat-DPO step: per-category margins,
# per-category stats table, mean reduction).
NUM_CATEGORIES = 19  # PKU-SafeRLHF
BETA = 0.1
PROMPT_FRACTION = 0.25  # the first quarter of every row is a masked prompt
LOSS_OPTIONS = dict(beta=BETA, loss_type="catdpo", reduction="mean", check_inputs=False)

TRITON_ENV = "CATDPO_TRITON_CONFIG"


@dataclass(frozen=True)
class Shape:
    rows: int  # 2B
    tokens: int  # T
    vocab: int  # V

    @classmethod
    def parse(cls, text: str) -> Shape:
        rows, tokens, vocab = parse_dims(text, 3, "a shape looks like 2BxTxV, e.g. 8x512x32000")
        if rows < 2 or rows % 2 or tokens < 1 or vocab < 2:
            raise ValueError(f"shape {text!r}: 2B must be even and >= 2, T >= 1, V >= 2")
        return cls(rows, tokens, vocab)

    @property
    def numel(self) -> int:
        return self.rows * self.tokens * self.vocab

    def __str__(self) -> str:
        return f"{self.rows}x{self.tokens}x{self.vocab}"


def parse_dims(text: str, count: int, form: str) -> tuple[int, ...]:
    """``"8x512x32000"`` -> ``(8, 512, 32000)``; ``form`` starts the error for anything else."""
    parts = text.lower().replace("×", "x").split("x")
    if len(parts) != count or not all(p.strip().isdigit() for p in parts):
        raise ValueError(f"{form}; got {text!r}")
    return tuple(int(p) for p in parts)


def split_list(texts) -> list[str]:
    """The items of a repeatable, comma-separated option (``--shapes a,b --shapes c``), blanks dropped."""
    return [part.strip() for text in texts for part in str(text).split(",") if part.strip()]


def parse_shapes(texts) -> list[Shape]:
    return [Shape.parse(part) for part in split_list(texts)]


def parse_dtypes(texts) -> list[torch.dtype]:
    out = []
    for part in split_list(texts):
        if part.lower() not in DTYPES:
            raise ValueError(f"unknown dtype {part!r}; use one of fp32, bf16, fp16")
        out.append(DTYPES[part.lower()])
    return out


def parse_modes(text: str) -> list[str]:
    """``--modes``: which of fwd_bwd, fwd, bwd to time."""
    modes = split_list([text])
    if not modes or any(m not in ("fwd_bwd", "fwd", "bwd") for m in modes):
        raise ValueError(f"--modes takes fwd_bwd, fwd, bwd; got {text!r}")
    return modes


def dtype_name(dtype: torch.dtype) -> str:
    return DTYPE_NAMES.get(dtype, str(dtype).replace("torch.", ""))


# ------------------------------------------------------------------ inputs
@dataclass
class LogitsInputs:
    """One set of ``loss()`` inputs; ``policy`` is a leaf that requires grad."""

    policy: torch.Tensor
    ref: torch.Tensor
    labels: torch.Tensor
    categories: torch.Tensor
    margins: torch.Tensor

    def nbytes(self) -> int:
        return sum(
            t.numel() * t.element_size() for t in (self.policy, self.ref, self.labels, self.categories, self.margins)
        )

    def logits_bytes(self) -> int:
        return self.policy.numel() * self.policy.element_size()


def make_labels(shape: Shape, device, generator) -> torch.Tensor:
    labels = torch.randint(0, shape.vocab, (shape.rows, shape.tokens), device=device, generator=generator)
    labels[:, : int(shape.tokens * PROMPT_FRACTION)] = -100
    return labels


def make_categories(num_pairs: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """Category ids cycling through ``-1, 0, ..., C-1`` and a margin ramp ``(C,)``."""
    categories = (torch.arange(num_pairs, device=device) % (NUM_CATEGORIES + 1)) - 1
    margins = torch.linspace(0.1, 2.0, NUM_CATEGORIES, device=device)
    return categories, margins


def random_logits(shape: Shape, dtype, device, generator) -> torch.Tensor:
    x = torch.randn(shape.rows, shape.tokens, shape.vocab, device=device, dtype=dtype, generator=generator)
    return x.mul_(2.0)


def make_logits_inputs(shape: Shape, dtype, device, *, sets: int = 1, seed: int = 0) -> list[LogitsInputs]:
    """``sets`` independent logits buffers (for L2 rotation) sharing labels and categories."""
    device = torch.device(device)
    gen = torch.Generator(device=device).manual_seed(seed)
    labels = make_labels(shape, device, gen)
    categories, margins = make_categories(shape.rows // 2, device)
    out = []
    for _ in range(sets):
        policy = random_logits(shape, dtype, device, gen).requires_grad_(True)
        ref = random_logits(shape, dtype, device, gen)
        out.append(LogitsInputs(policy, ref, labels, categories, margins))
    return out


# ---------------------------------------------------------------- variants
class Skip(Exception):
    """A variant that cannot run here; the message says why (recorded in the results)."""


ForwardFn = Callable[[object], tuple[torch.Tensor, list[torch.Tensor]]]


@dataclass
class Variant:
    """One row of the table. ``build()`` returns ``forward(inputs) -> (loss, grad targets)``."""

    label: str
    kind: str  # reference | compiled | torch | triton | anchor
    build: Callable[[], ForwardFn]
    group: str = "logits"  # "logits": loss from given logits; "lm_head": from hidden states (anchors)
    inplace: bool = False
    triton_config: str | None = None  # None: not triton; "default": no override
    baseline: bool = False
    env: dict = field(default_factory=dict)  # set while the variant runs (None value: unset)
    notes: list = field(default_factory=list)
    # False: the backward cannot be run twice on one graph (in-place gradient; a compiled
    # backward with donated buffers), so bwd is timed as fwd_bwd - fwd.
    replay_backward: bool = True

    def __post_init__(self):
        if self.inplace:
            self.replay_backward = False


class _Intermediate(torch.autograd.Function):
    """The leaf's buffer as a non-leaf, non-view tensor: stands in for an lm_head output
    (no allocation, and ``inplace_backward`` may overwrite it)."""

    @staticmethod
    def forward(ctx, x):
        return x.detach()

    @staticmethod
    def backward(ctx, grad):
        return grad


def as_intermediate(leaf: torch.Tensor) -> torch.Tensor:
    return _Intermediate.apply(leaf)


def _loss_forward(backend: str, inplace: bool = False) -> ForwardFn:
    import catdpo_kernels

    def forward(inp: LogitsInputs):
        logits = as_intermediate(inp.policy)
        out = catdpo_kernels.loss(
            logits,
            inp.labels,
            inp.categories,
            inp.margins,
            ref_logits=inp.ref,
            backend=backend,
            inplace_backward=inplace,
            **LOSS_OPTIONS,
        )
        return out.loss, [logits]

    return forward


def _naive_loss(logits, ref, labels, categories, margins):
    from .naive import naive_loss

    return naive_loss(logits, ref, labels, categories, margins, **LOSS_OPTIONS)


def _naive_forward() -> ForwardFn:
    def forward(inp: LogitsInputs):
        logits = as_intermediate(inp.policy)
        return _naive_loss(logits, inp.ref, inp.labels, inp.categories, inp.margins), [logits]

    return forward


_COMPILED = {}


def _compiled_forward() -> ForwardFn:
    # One compiled function per process: dynamo recompiles (then goes dynamic) on new shapes.
    if "fn" not in _COMPILED:
        _COMPILED["fn"] = torch.compile(_naive_loss)
    fn = _COMPILED["fn"]

    def forward(inp: LogitsInputs):
        logits = as_intermediate(inp.policy)
        return fn(logits, inp.ref, inp.labels, inp.categories, inp.margins), [logits]

    return forward


def triton_config_label(config: str) -> str:
    return "triton" if config == "default" else f"triton[{config}]"


def validate_triton_config(config: str) -> str:
    """``default`` or ``BLOCK_V=4096,num_warps=8`` (checked like the env override is)."""
    config = config.strip().replace(" ", "")
    if config == "default":
        return config
    for part in config.split(","):
        key, _, value = part.partition("=")
        if key not in ("BLOCK_V", "num_warps") or not value.isdigit() or int(value) < 1:
            raise ValueError(f"--triton-config takes 'default' or 'BLOCK_V=4096,num_warps=8', got {config!r}")
        if key == "BLOCK_V" and int(value) & (int(value) - 1):
            raise ValueError(f"--triton-config: BLOCK_V must be a power of two, got {value}")
    return config


def logits_variants(backends, *, device: torch.device, inplace: bool, triton_configs) -> list[Variant]:
    """The rows for one case: baseline first, then ``backends`` in order, then the in-place rows.

    The in-place rows overwrite the shared logits with their gradient, so they run
    last: every other row sees the original random logits.
    """
    out, last = [], []
    backends = list(dict.fromkeys(backends))
    if "reference" in backends:
        backends.remove("reference")
        backends.insert(0, "reference")
    for name in backends:
        if name == "reference":
            out.append(Variant("reference", "reference", _naive_forward, baseline=True))
        elif name == "compiled":
            out.append(Variant("compiled", "compiled", _compiled_forward, replay_backward=False))
        elif name == "torch":
            out.append(Variant("torch", "torch", lambda: _loss_forward("torch")))
            if inplace:
                last.append(Variant("torch-inplace", "torch", lambda: _loss_forward("torch", True), inplace=True))
        elif name == "triton":
            for cfg in triton_configs or ["default"]:
                env = {TRITON_ENV: None if cfg == "default" else cfg}
                out.append(
                    Variant(
                        triton_config_label(cfg), "triton", lambda: _loss_forward("triton"), triton_config=cfg, env=env
                    )
                )
            if inplace:
                cfg = (triton_configs or ["default"])[0]
                env = {TRITON_ENV: None if cfg == "default" else cfg}
                label = "triton-inplace" if cfg == "default" else f"triton-inplace[{cfg}]"
                last.append(
                    Variant(
                        label, "triton", lambda: _loss_forward("triton", True), inplace=True, triton_config=cfg, env=env
                    )
                )
        else:
            raise ValueError(f"unknown backend {name!r}; use {', '.join(KNOWN_BACKENDS)}")
    return out + last


def skip_reason(variant: Variant, device: torch.device) -> str | None:
    """Why a variant cannot be timed on this device, or None."""
    if variant.kind == "triton":
        if device.type != "cuda":
            return "triton needs a CUDA device (the TRITON_INTERPRET=1 interpreter is never benchmarked)"
        try:
            import triton  # noqa: F401
        except ImportError:
            return "triton is not installed"
    return None


class scoped_env:
    """Set (value) or unset (None) environment variables for a ``with`` block."""

    def __init__(self, env: dict):
        self.env = env
        self.saved = {}

    def __enter__(self):
        for key, value in self.env.items():
            self.saved[key] = os.environ.get(key)
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
        return self

    def __exit__(self, *exc):
        for key, value in self.saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
        return False


def effective_triton_config(shape: Shape, dtype) -> dict | None:
    """The launch config the vocab-loop kernels use for this case under the current env."""
    try:
        from ..ops.triton_config import vocab_loop_config
    except Exception:  # noqa: BLE001 - no triton: nothing to report
        return None
    cfg = vocab_loop_config(shape.vocab, dtype)
    return {"BLOCK_V": cfg.BLOCK_V, "num_warps": cfg.num_warps}
