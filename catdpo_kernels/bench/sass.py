"""Instructions per element of the kernels' hot loops, read off the sm_90 SASS, without a GPU.

The vocabulary loops stream logits; on an H200 a bf16 logit arrives in well under
a cycle per SM lane, so the loop can become issue-bound before it is
memory-bound. Counting the SASS instructions of each hot loop, divided by the
logits one thread handles per iteration, shows such a regression on any machine:
``triton.compile`` with an explicit target runs the real backend, Triton's
bundled ``ptxas`` makes the cubin and its ``nvdisasm`` the SASS.

Every kernel is compiled as the wrappers launch it at the performance-target
shapes (the pointers 16-byte aligned, as fresh tensors are; strides of unknown
divisibility, as with V = 50257). A hot loop is the innermost range closed by a
backward branch that loads from global memory; its vectorised loads are counted too.

    python -m catdpo_kernels.bench.sass [--json out.json] [--markdown out.md]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
from dataclasses import asdict, dataclass

ARCH = 90

_INSTR = re.compile(r"/\*([0-9a-f]{4,})\*/\s+(.*?);")
_LABEL = re.compile(r"\s*(\.L_x_\d+):")
_BRANCH = re.compile(r"BRA\s+(?:.*?)(\.L_x_\d+)")


@dataclass
class LoopCount:
    kernel: str
    config: str
    instructions: int
    elements_per_thread: float
    per_element: float
    vector_loads: int
    scalar_loads: int


def _disassemble(cubin: bytes) -> str:
    import triton

    tool = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "nvdisasm")
    with tempfile.NamedTemporaryFile(suffix=".cubin", delete=False) as fh:
        fh.write(cubin)
        path = fh.name
    try:
        return subprocess.run([tool, "-c", path], capture_output=True, text=True, check=True).stdout
    finally:
        os.unlink(path)


def innermost_loop(sass: str) -> list[str]:
    """The instructions of the innermost (shortest) loop that loads from global memory: a label and
    the backward branch to it (the kernel's closing self-branch, and store-only loops, do not count)."""
    instructions, labels = [], {}
    for line in sass.splitlines():
        label = _LABEL.match(line)
        if label:
            labels[label.group(1)] = len(instructions)
            continue
        ins = _INSTR.search(line)
        if ins:
            instructions.append(ins.group(2).strip())
    loops = []
    for i, op in enumerate(instructions):
        target = _BRANCH.search(op)
        if target and labels.get(target.group(1), len(instructions)) <= i:
            body = instructions[labels[target.group(1)] : i + 1]
            if any("LDG" in op for op in body):
                loops.append(body)
    if not loops:
        raise ValueError("no loop with a global load found in the SASS")
    return min(loops, key=len)


def count(kernel, name: str, signature: dict, constexprs: dict, num_warps: int, elements: int) -> LoopCount:
    """Compile ``kernel`` for sm_90 and count its hot loop; ``elements``: logits per loop iteration."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    # Pointers are 16-byte aligned (as the wrappers' tensors are); a padded tile stride too.
    # Attributes are keyed by the kernel's argument position, not by the signature's order.
    aligned = [k for k, v in signature.items() if v.startswith("*") or k == "stride_tile"]
    attrs = {(kernel.arg_names.index(k),): [["tt.divisibility", 16]] for k in aligned}
    src = ASTSource(fn=kernel, signature=signature, constexprs=constexprs, attrs=attrs)
    compiled = triton.compile(src, target=GPUTarget("cuda", ARCH, 32), options=dict(num_warps=num_warps))
    loop = innermost_loop(_disassemble(compiled.asm["cubin"]))
    per_thread = elements / (num_warps * 32)
    loads = [op for op in loop if "LDG" in op]
    vector = sum(1 for op in loads if ".64" in op.split()[0] or ".128" in op.split()[0])
    cfg = ", ".join(f"{k}={v}" for k, v in constexprs.items()) + f", num_warps={num_warps}"
    return LoopCount(name, cfg, len(loop), per_thread, round(len(loop) / per_thread, 2), vector, len(loads) - vector)


def logits_signatures(dt: str, labels: str = "i64"):
    """Triton signatures of the logits forward and backward kernels, ``dt`` logits and ``labels`` ids."""
    common = dict(labels_ptr=f"*{labels}", ignore_index="i32", stride_lr="i64", stride_lt="i64")
    fwd = dict(
        policy_ptr=f"*{dt}",
        ref_ptr=f"*{dt}",
        token_logp_ptr="*fp32",
        max_logsum_ptr="*fp32",
        T_eff="i32",
        V="i32",
        stride_pr="i64",
        stride_pt="i64",
        stride_rr="i64",
        stride_rt="i64",
        **common,
    )
    fwd.update(SHIFT="constexpr", HAS_REF="constexpr", VEC="constexpr", ALIGNED_P="constexpr")
    fwd.update(ALIGNED_R="constexpr", BLOCK_V="constexpr")
    bwd = dict(
        logits_ptr=f"*{dt}",
        grad_ptr=f"*{dt}",
        max_logsum_ptr="*fp32",
        g_seq_ptr="*fp32",
        counts_ptr="*i32",
        T="i32",
        T_eff="i32",
        V="i32",
        stride_xr="i64",
        stride_xt="i64",
        stride_gr="i64",
        stride_gt="i64",
        **common,
    )
    bwd.update(SHIFT="constexpr", AVERAGE="constexpr", ALIGNED="constexpr", SAME_PHASE="constexpr")
    bwd.update(INTERPRET="constexpr", VEC="constexpr", BLOCK_V="constexpr")
    return fwd, bwd


def head_signatures(dt: str):
    """Triton signatures of the fused head's fold and gradient kernels over ``dt`` tiles."""
    tile = dict(tile_ptr=f"*{dt}", stride_tile="i32", bias_ptr=f"*{dt}", targets_ptr="*i64")
    cols = dict(v0="i32", n_cols="i32", logit_scale="fp32", inv_softcap="fp32", softcap="fp32", inv_temp="fp32")
    flags = dict(HAS_BIAS="constexpr", HAS_SCALE="constexpr", HAS_SOFTCAP="constexpr")
    outputs = ("max_ptr", "sum_ptr", "target_logit_ptr", "ez_ptr", "zsum_ptr", "before_ptr")
    fold = dict(tile, **dict.fromkeys(outputs, "*fp32"), **cols, **flags, METRICS="constexpr")
    fold.update(GROUP="constexpr", BLOCK_V="constexpr")
    grad = dict(tile, lse_ptr="*fp32", g_ptr="*fp32", **cols, **flags, INTERPRET="constexpr", BLOCK_V="constexpr")
    return fold, grad


def report() -> list[LoopCount]:
    """The hot loops of every vocabulary kernel, in the launch configurations the wrappers use."""
    import torch

    from ..kernels import linear_head, sequence_logps
    from ..ops import linear_head_triton as head_ops
    from ..ops.triton_config import vocab_loop_config

    out = []
    for dt, torch_dtype, vocab in (("bf16", torch.bfloat16, 128256), ("fp32", torch.float32, 32000)):
        vec = 16 // torch_dtype.itemsize
        cfg = vocab_loop_config(vocab, torch_dtype)
        fwd, bwd = logits_signatures(dt)
        consts = dict(SHIFT=1, HAS_REF=True, VEC=vec, ALIGNED_P=True, ALIGNED_R=True, BLOCK_V=cfg.BLOCK_V)
        out.append(
            count(sequence_logps.token_logps_kernel, f"logits forward {dt}", fwd, consts, cfg.num_warps, cfg.BLOCK_V)
        )
        consts = dict(SHIFT=1, AVERAGE=False, ALIGNED=True, SAME_PHASE=True, INTERPRET=False, VEC=vec)
        consts["BLOCK_V"] = cfg.BLOCK_V
        out.append(
            count(sequence_logps.logits_grad_kernel, f"logits backward {dt}", bwd, consts, cfg.num_warps, cfg.BLOCK_V)
        )
        fold, grad = head_signatures(dt)
        flags = dict(HAS_BIAS=False, HAS_SCALE=False, HAS_SOFTCAP=False)
        for metrics in (False, True):
            consts = dict(flags, METRICS=metrics, GROUP=vec, BLOCK_V=head_ops._FOLD_BLOCK)
            name = f"head fold {dt}" + (" +metrics" if metrics else "")
            out.append(count(linear_head.fold_tile_kernel, name, fold, consts, 4, head_ops._FOLD_BLOCK))
        consts = dict(flags, INTERPRET=False, BLOCK_V=head_ops._GRAD_BLOCK)
        out.append(count(linear_head.grad_tile_kernel, f"head gradient {dt}", grad, consts, 4, head_ops._GRAD_BLOCK))
    return out


def to_markdown(rows: list[LoopCount], meta: dict) -> str:
    lines = [
        f"# Hot-loop SASS instructions per element (sm_{ARCH}, compile only)",
        "",
        f"- triton {meta['triton']}, torch {meta['torch']}, {meta['date_utc']}; no GPU involved",
        "",
        "| kernel | launch | instructions / loop | elements / thread | instructions / element | vector loads |",
        "|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r.kernel} | {r.config} | {r.instructions} | {r.elements_per_thread:g} | {r.per_element} | "
            f"{r.vector_loads} vector, {r.scalar_loads} scalar |"
        )
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    import datetime

    import torch
    import triton

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", help="write the counts as JSON")
    parser.add_argument("--markdown", help="write the counts as a markdown table")
    args = parser.parse_args(argv)
    os.environ.pop("TRITON_INTERPRET", None)
    rows = report()
    meta = dict(
        arch=f"sm_{ARCH}",
        triton=triton.__version__,
        torch=torch.__version__,
        date_utc=datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
    )
    text = to_markdown(rows, meta)
    print(text)
    if args.json:
        with open(args.json, "w", encoding="utf-8") as fh:
            json.dump(dict(meta=meta, loops=[asdict(r) for r in rows]), fh, indent=1)
    if args.markdown:
        with open(args.markdown, "w", encoding="utf-8") as fh:
            fh.write(text)
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
