"""Runs one variant on one case: warm-up, memory, then fwd / bwd / fwd+bwd timings.

Order per variant:

1. warm-up: one forward + backward (Triton JIT, ``torch.compile``, allocator);
2. memory: peak above the start of one forward, and of one forward + backward
   (the returned gradient is alive at the end, so it counts; the ``excl_grad``
   figure subtracts it);
3. timing of ``fwd_bwd`` (forward, then ``torch.autograd.grad``), ``fwd``
   (forward with autograd recording, as in training) and ``bwd``
   (``autograd.grad(..., retain_graph=True)`` on graphs built beforehand). The
   in-place variants overwrite the logits in backward, which bumps their
   version, and a compiled backward donates its saved buffers, so neither
   graph can be replayed: their ``bwd`` is ``fwd_bwd - fwd``, marked ``derived``.

On GPU every timed call cycles through ``len(inputs)`` input sets (see
``timing.rotation_sets``); memory is measured on the first set only.
"""

from __future__ import annotations

import itertools
import traceback

import torch

from .cases import Skip, Variant, scoped_env, skip_reason
from .memory import record_rises, release, tensor_bytes
from .timing import derived_timing, synchronize, time_cpu, time_gpu

_OOM = getattr(torch, "OutOfMemoryError", torch.cuda.OutOfMemoryError)


class Settings:
    def __init__(self, *, device, repeats=3, warmup_ms=25, rep_ms=200, memory=True, modes=("fwd_bwd", "fwd", "bwd")):
        self.device = torch.device(device)
        self.repeats = repeats
        self.warmup_ms = warmup_ms
        self.rep_ms = rep_ms
        self.memory = memory
        self.modes = tuple(modes)

    def time(self, fn):
        if self.device.type == "cuda":
            return time_gpu(fn, warmup_ms=self.warmup_ms, rep_ms=self.rep_ms)
        return time_cpu(fn, self.repeats)


def _grad_bytes(grads, targets) -> int:
    """Bytes of returned gradients that are new buffers (an in-place gradient aliases its target)."""
    fresh = []
    for g, t in zip(grads, targets):
        if g is None:
            continue
        if g.untyped_storage().data_ptr() == t.untyped_storage().data_ptr():
            continue
        fresh.append(g)
    return tensor_bytes(*fresh)


def _fwd_bwd(forward, inp):
    loss, targets = forward(inp)
    grads = torch.autograd.grad(loss, targets)
    return grads, targets


def blank_result(variant: Variant, base: dict, *, status: str = "ok", note: str | None = None) -> dict:
    """A result row with no measurements yet (or ever, for a skipped/oom row)."""
    result = dict(base, label=variant.label, kind=variant.kind, inplace=variant.inplace, baseline=variant.baseline)
    notes = list(variant.notes) + ([note] if note else [])
    result.update(
        triton_config=variant.triton_config, status=status, note="; ".join(notes) or None, time_ms={}, memory={}
    )
    return result


def run_variant(variant: Variant, inputs: list, base: dict, settings: Settings) -> dict:
    """One row of results. Never raises for a failing variant: it is recorded as error/oom/skipped."""
    device = settings.device
    result = blank_result(variant, base)
    reason = skip_reason(variant, device)
    if reason:
        result.update(status="skipped", note=reason)
        return result
    try:
        with scoped_env(variant.env):
            if variant.triton_config is not None:
                from .cases import effective_triton_config

                result["effective_triton_config"] = effective_triton_config(base["_shape"], base["_dtype"])
            _measure(variant, inputs, result, settings)
    except Skip as exc:
        result.update(status="skipped", note=str(exc), time_ms={}, memory={})
    except _OOM as exc:
        result.update(status="oom", note=f"out of memory: {str(exc).splitlines()[0][:200]}", time_ms={}, memory={})
    except Exception as exc:  # noqa: BLE001 - one broken variant must not stop the sweep
        tb = traceback.format_exc(limit=3).strip().splitlines()
        where = tb[-3].strip() if len(tb) >= 3 else ""
        result.update(
            status="error", note=f"{type(exc).__name__}: {str(exc).splitlines()[0][:300] if str(exc) else ''} ({where})"
        )
        result.update(time_ms={}, memory={})
    finally:
        release(device)
    return result


def _measure(variant: Variant, inputs: list, result: dict, settings: Settings) -> None:
    device = settings.device
    try:
        forward = variant.build()
    except Skip:
        raise
    except Exception as exc:  # noqa: BLE001 - e.g. an optional anchor that fails to import
        raise Skip(f"could not set up: {type(exc).__name__}: {exc}") from exc
    first = inputs[0]

    # 1. warm-up (compiles)
    try:
        grads, targets = _fwd_bwd(forward, first)
    except Exception as exc:
        if variant.kind == "compiled":
            raise Skip(
                f"torch.compile failed: {type(exc).__name__}: {str(exc).splitlines()[0][:300] if str(exc) else ''}"
            ) from exc
        raise
    grad_bytes = _grad_bytes(grads, targets)
    del grads, targets
    synchronize(device)

    # 2. memory
    mem = {
        "input_bytes": first.nbytes(),
        "logits_bytes": first.logits_bytes() if hasattr(first, "logits_bytes") else None,
        "grad_bytes": grad_bytes,
    }
    if settings.memory:
        record_rises(mem, lambda: forward(first), lambda: _fwd_bwd(forward, first), device)
    result["memory"] = mem

    # 3. timing
    cycle = itertools.cycle(inputs)
    times = {}
    replay_error = None
    for mode in settings.modes:
        if mode == "fwd_bwd":
            times[mode] = settings.time(lambda: _fwd_bwd(forward, next(cycle)))
        elif mode == "fwd":
            times[mode] = settings.time(lambda: forward(next(cycle)))
        elif mode == "bwd" and variant.replay_backward:
            graphs = [forward(inp) for inp in inputs]
            ring = itertools.cycle(graphs)

            def backward():
                loss, targets = next(ring)
                return torch.autograd.grad(loss, targets, retain_graph=True)

            try:
                times[mode] = settings.time(backward)
            except RuntimeError as exc:  # e.g. a backward that frees or donates its saved buffers
                replay_error = f"{type(exc).__name__}: {str(exc).splitlines()[0][:160]}"
            del graphs, ring
        synchronize(device)
    if "bwd" in settings.modes and "bwd" not in times and "fwd_bwd" in times and "fwd" in times:
        times["bwd"] = derived_timing(times["fwd_bwd"], times["fwd"])
        if replay_error:
            result["note"] = "; ".join(
                filter(None, [result.get("note"), f"bwd derived: replay failed ({replay_error})"])
            )
    result["time_ms"] = {m: times[m].to_dict() for m in ("fwd", "bwd", "fwd_bwd") if m in times}
