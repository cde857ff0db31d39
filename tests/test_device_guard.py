"""Triton launches run on the device of their tensors, not on the current CUDA device.

One GPU cannot show a launch going to the wrong device, so the guard is checked
with a stand-in for ``torch.cuda.device``, and every launch site is checked to
sit inside the guard.
"""

from __future__ import annotations

import ast
import contextlib
from pathlib import Path
from types import SimpleNamespace

import torch

from catdpo_kernels.ops import device_guard

OPS = Path(device_guard.__file__).resolve().parent


def test_the_guard_enters_the_tensors_device(monkeypatch):
    entered = []

    @contextlib.contextmanager
    def fake_device(dev):
        entered.append(dev)
        yield

    monkeypatch.setattr(torch.cuda, "device", fake_device)
    with device_guard.on_device_of(SimpleNamespace(device=torch.device("cuda", 1))):
        pass
    assert entered == [torch.device("cuda", 1)]
    with device_guard.on_device_of(torch.zeros(1)):  # CPU tensors: nothing to enter
        pass
    assert entered == [torch.device("cuda", 1)]


def _launches(tree: ast.AST):
    """Calls ``something_kernel[grid](...)``, each with the chain of ``with`` blocks around it."""
    out = []

    def visit(node, withs):
        if isinstance(node, ast.With):
            withs = withs + [node]
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Subscript):
            name = node.func.value
            if isinstance(name, ast.Name) and name.id.endswith("_kernel"):
                out.append((node, withs))
        for child in ast.iter_child_nodes(node):
            visit(child, withs)

    visit(tree, [])
    return out


def test_every_triton_launch_is_inside_the_guard():
    found = 0
    for path in sorted(OPS.glob("*.py")):
        for call, withs in _launches(ast.parse(path.read_text(encoding="utf-8"))):
            found += 1
            guarded = any(
                isinstance(item.context_expr, ast.Call) and getattr(item.context_expr.func, "id", "") == "on_device_of"
                for w in withs
                for item in w.items
            )
            if not guarded:
                # A helper that launches is guarded by all of its callers.
                assert path.name == "linear_head_triton.py", f"{path.name}:{call.lineno} launches outside on_device_of"
    assert found >= 6


def test_head_kernel_helpers_are_only_called_under_the_guard():
    tree = ast.parse((OPS / "linear_head_triton.py").read_text(encoding="utf-8"))
    helpers = {"_fold", "_grad_in_place"}
    calls = []

    def visit(node, withs):
        if isinstance(node, ast.With):
            withs = withs + [node]
        if isinstance(node, ast.Call) and getattr(node.func, "id", "") in helpers:
            calls.append(any(getattr(i.context_expr.func, "id", "") == "on_device_of" for w in withs for i in w.items))
        for child in ast.iter_child_nodes(node):
            visit(child, withs)

    visit(tree, [])
    assert calls and all(calls)
