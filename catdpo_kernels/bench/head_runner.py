"""Runs the rows of one fused-head case: set-up, warm-up, memory, then interleaved timing rounds.

1. **prepare** every row in turn: build it, one warm-up forward + backward
   (``torch.compile``, Triton JIT, the allocator; the loss value and, for ours,
   the schedule are read off it), then its peak memory above the inputs during
   one forward and one forward + backward (``memory.peak_above_start``). A row
   that cannot run is recorded as ``skipped`` (with why), ``oom`` or ``error``.
2. **time** all ready rows in rounds: each round takes one sample of every mode
   of every row, plus one of the reference GEMM ``hidden_counted @ W.T``. The
   order rotates by one position every round and is reversed every other
   round, so no row always runs first (on a warm cache) or last (after the
   others heated the machine). Every figure is the median over the rounds.

A sample is wall-clock time between device synchronisations:

- ``fwd_bwd``: the forward, then ``torch.autograd.grad`` of the loss;
- ``fwd``: the forward alone, with autograd recording (the graph is freed after the clock stops);
- ``bwd``: ``torch.autograd.grad`` on a graph built just before (untimed), so
  every backward runs on a fresh graph: nothing is replayed.

Rows that compute their gradients in the forward (ours in the one-pass schedule,
Liger) have a ``fwd`` that includes the gradient work and a ``bwd`` that only
scales the stored gradients; their notes say so.
"""

from __future__ import annotations

import time
import traceback

import torch

from .cases import Skip
from .head_cases import HeadInputs, HeadShape, HeadVariant, flop_count, head_schedule, skip_reason
from .memory import OOM_ERRORS, record_rises, release, tensor_bytes
from .timing import summarize, synchronize

MODES = ("fwd_bwd", "fwd", "bwd")
# A CPU row is skipped when this many fp32 (2B, T, V) buffers would not fit the available memory:
# the naive step holds the policy logits, their log-softmax and its gradient, the reference
# logits and their log-softmax, and a transient copy.
NAIVE_LOGITS_BUFFERS = 6
MEMORY_GUARD_FRACTION = 0.85


class HeadSettings:
    def __init__(self, *, device, repeats: int, modes=MODES, memory: bool = True):
        self.device = torch.device(device)
        self.repeats = max(1, int(repeats))
        self.modes = tuple(modes)
        self.memory = memory

    @property
    def method(self) -> str:
        clock = "torch.cuda.synchronize + perf_counter" if self.device.type == "cuda" else "perf_counter"
        return f"wall clock ({clock}), median over {self.repeats} interleaved rounds"


class Prepared:
    """A row after set-up: its result dict and, when it can be timed, its forward."""

    def __init__(self, variant: HeadVariant, result: dict, forward=None):
        self.variant = variant
        self.result = result
        self.forward = forward
        self.samples: dict[str, list[float]] = {}

    @property
    def ready(self) -> bool:
        return self.forward is not None and self.result["status"] == "ok"


def blank_result(variant: HeadVariant, base: dict, *, status: str = "ok", note: str | None = None) -> dict:
    result = dict(
        base,
        label=variant.label,
        kind=variant.kind,
        role=variant.role,
        backend=variant.backend,
        frozen=variant.frozen,
        baseline=variant.baseline,
        inplace=False,
        grads_in_forward=variant.grads_in_forward,
    )
    notes = list(variant.notes) + ([note] if note else [])
    result.update(status=status, note="; ".join(notes) or None, time_ms={}, memory={}, flops=None, loss_value=None)
    return result


def _first_line(exc: BaseException, limit: int = 300) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0][:limit] if text else ''}".rstrip(": ")


def mem_available_bytes() -> int | None:
    """``MemAvailable`` of ``/proc/meminfo`` (Linux), else None."""
    try:
        with open("/proc/meminfo") as fh:
            for line in fh:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def estimated_peak_bytes(variant: HeadVariant, shape: HeadShape) -> int:
    """A generous estimate of a row's peak (CPU guard only; fp32 logits whatever the dtype)."""
    logits = shape.all_positions * shape.vocab * 4
    if variant.role in ("naive", "compiled"):
        return NAIVE_LOGITS_BUFFERS * logits
    if variant.label == "liger-dpo":  # one pair (2 rows, all T positions) at a time
        return 8 * 2 * shape.tokens * shape.vocab * 4
    if variant.label == "trl-chunked":  # a (min(N, 4096), min(V, chunk)) fp32 tile and its temporaries
        return 6 * min(shape.counted_tokens, 4096) * min(shape.vocab, 32768) * 4
    return 0


def _grad_bytes(grads) -> int:
    return tensor_bytes(*[g for g in grads if g is not None])


def _fwd_bwd(forward, inp):
    loss, targets = forward(inp)
    return torch.autograd.grad(loss, targets)


def prepare(variant: HeadVariant, inp: HeadInputs, base: dict, settings: HeadSettings) -> Prepared:
    """Build, warm up and measure the memory of one row. Never raises for a row that fails."""
    device = settings.device
    result = blank_result(variant, base)
    reason = skip_reason(variant, device)
    if reason:
        result.update(status="skipped", note=_join(result["note"], reason))
        return Prepared(variant, result)
    shape: HeadShape = base["_shape"]
    if device.type == "cpu":
        need, avail = estimated_peak_bytes(variant, shape), mem_available_bytes()
        if avail is not None and need > MEMORY_GUARD_FRACTION * avail:
            result.update(
                status="skipped",
                note=_join(
                    result["note"],
                    f"estimated peak {need / 2**30:.1f} GiB exceeds {int(MEMORY_GUARD_FRACTION * 100)}% of "
                    f"MemAvailable {avail / 2**30:.1f} GiB (not run, to spare the machine)",
                ),
            )
            return Prepared(variant, result)
    forward = None
    try:
        try:
            forward = variant.build(device)
        except Skip:
            raise
        except Exception as exc:  # noqa: BLE001 - e.g. a peer that fails to import
            raise Skip(f"could not set up: {_first_line(exc)}") from exc
        # 1. warm-up
        try:
            loss, targets = forward(inp)
            schedule = head_schedule(loss) if variant.role == "ours" else None
            result["loss_value"] = float(loss.detach().float().item())
            grads = torch.autograd.grad(loss, targets)
        except OOM_ERRORS:
            raise
        except Exception as exc:
            if variant.role == "peer":
                raise Skip(f"cannot run on {device.type}: {_first_line(exc)}") from exc
            if variant.role == "compiled":
                raise Skip(f"torch.compile failed: {_first_line(exc)}") from exc
            raise
        result["schedule"] = schedule
        result["flops"] = flop_count(variant, shape, schedule)
        grad_bytes = _grad_bytes(grads)
        del loss, targets, grads
        synchronize(device)
        # 2. memory
        mem = {"input_bytes": inp.nbytes(), "logits_bytes": inp.logits_bytes(), "grad_bytes": grad_bytes}
        if settings.memory:
            # The peak can come before the gradients exist (subtracting their bytes would understate it):
            # on CPU, replay the allocations without them.
            record_rises(mem, lambda: forward(inp), lambda: _fwd_bwd(forward, inp), device, replay_returned=True)
        result["memory"] = mem
    except Skip as exc:
        result.update(status="skipped", note=_join(result["note"], str(exc)))
        forward = None
    except OOM_ERRORS as exc:
        result.update(status="oom", note=_join(result["note"], f"out of memory: {_first_line(exc, 200)}"))
        forward = None
    except Exception as exc:  # noqa: BLE001 - one broken row must not stop the run
        tb = traceback.format_exc(limit=4).strip().splitlines()
        where = tb[-3].strip() if len(tb) >= 3 else ""
        result.update(status="error", note=_join(result["note"], f"{_first_line(exc)} ({where})"))
        forward = None
    finally:
        release(device)
    if result["status"] != "ok":
        result.update(time_ms={}, memory={}, flops=None)
    if variant.grads_in_forward or result.get("schedule") == "one-pass":
        result["grads_in_forward"] = True
        result["note"] = _join(result["note"], "gradients computed in the forward: fwd includes them, bwd only scales")
    return Prepared(variant, result, forward)


def _join(*parts) -> str | None:
    text = "; ".join(p for p in parts if p)
    return text or None


def _sample(forward, inp: HeadInputs, mode: str, device) -> float:
    """One timed call in ms (see the module docstring). No ``gc.collect()`` here: with transformers
    imported (TRL, Liger) one collection takes a quarter of a second, and tensors are freed by refcount."""
    synchronize(device)
    if mode == "bwd":
        loss, targets = forward(inp)
        synchronize(device)
        start = time.perf_counter()
        grads = torch.autograd.grad(loss, targets)
        synchronize(device)
        elapsed = time.perf_counter() - start
        del loss, targets, grads
        return elapsed * 1e3
    start = time.perf_counter()
    out = forward(inp) if mode == "fwd" else _fwd_bwd(forward, inp)
    synchronize(device)
    elapsed = time.perf_counter() - start
    del out
    return elapsed * 1e3


class GemmReference:
    """``hidden_counted (N, H) @ W.T`` timed alone: the matmul rate each row's TFLOP/s is compared with."""

    label = "gemm"

    def __init__(self, inp: HeadInputs):
        self.hidden = inp.counted_hidden()
        self.weight = inp.weight.detach()
        # Into a buffer allocated once: the matmul alone, without the allocation (and, on CPU, page faults).
        self.out = torch.empty(
            self.hidden.shape[0], self.weight.shape[0], dtype=self.hidden.dtype, device=self.hidden.device
        )
        self.samples: list[float] = []

    @property
    def flops(self) -> int:
        return 2 * self.hidden.shape[0] * self.hidden.shape[1] * self.weight.shape[0]

    def sample(self, device) -> float:
        synchronize(device)
        start = time.perf_counter()
        torch.mm(self.hidden, self.weight.t(), out=self.out)
        synchronize(device)
        return (time.perf_counter() - start) * 1e3

    def to_dict(self, method: str) -> dict:
        out = {
            "tokens": self.hidden.shape[0],
            "hidden": self.hidden.shape[1],
            "vocab": self.weight.shape[0],
            "dtype": str(self.hidden.dtype).replace("torch.", ""),
            "flops": self.flops,
            "method": f"torch.mm(hidden_counted, W.T, out=preallocated) of the counted tokens; {method}",
        }
        if self.samples:
            t = summarize(self.samples, method)
            out.update(time_ms=t.to_dict(), TFLOPs=self.flops / (t.median_ms * 1e-3) / 1e12)
        return out


def time_rounds(prepared: list[Prepared], inp: HeadInputs, settings: HeadSettings, *, gemm: bool = True, say=None):
    """Interleaved timing rounds over the ready rows; fills ``result["time_ms"]``. Returns the GEMM reference dict."""
    device = settings.device
    ref = GemmReference(inp) if gemm else None
    if ref is not None:
        ref.sample(device)  # warm-up
    items = [p for p in prepared if p.ready] + ([ref] if ref is not None else [])
    for p in items:
        if isinstance(p, Prepared):
            p.samples = {m: [] for m in settings.modes}
    n = len(items)
    for r in range(settings.repeats):
        k = r % n if n else 0
        order = items[k:] + items[:k]
        if r % 2:
            order.reverse()
        for item in order:
            if item is ref:
                ref.samples.append(ref.sample(device))
                continue
            if not item.ready:
                continue
            try:
                for mode in settings.modes:
                    item.samples[mode].append(_sample(item.forward, inp, mode, device))
            except OOM_ERRORS as exc:
                item.result.update(status="oom", note=_join(item.result["note"], f"out of memory while timing: {exc}"))
            except Exception as exc:  # noqa: BLE001
                item.result.update(status="error", note=_join(item.result["note"], f"while timing: {_first_line(exc)}"))
        if say is not None:
            say(f"  round {r + 1}/{settings.repeats} done")
    for p in prepared:
        if p.ready and p.samples:
            p.result["time_ms"] = {m: summarize(v, settings.method).to_dict() for m, v in p.samples.items() if v}
        elif p.result["status"] != "ok":
            p.result["time_ms"] = {}
    return ref.to_dict(settings.method) if ref is not None else None
