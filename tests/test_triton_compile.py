"""The Triton kernels compile for real GPUs (sm_80, sm_90), on a machine without one.

The interpreter (TRITON_INTERPRET=1) runs kernel code as Python: it accepts
programs the GPU compiler rejects (mismatched types across branches, bad
loop-carried values, ...). ``triton.compile`` with an explicit target runs the
real frontend and the LLVM/PTX backend without a device, so every kernel is
compiled here for each dtype and specialisation the wrappers launch. It must
run in a fresh process, because under the interpreter ``@triton.jit`` yields
interpreted functions.
"""

import itertools
import json
import os
import subprocess
import sys

import pytest

TARGETS = ((80, 32), (90, 32))


def kernel_variants():
    """``(kernel name, signature, constexprs)`` for every launch the wrappers make."""
    from catdpo_kernels.bench.sass import logits_signatures
    from catdpo_kernels.constants import STAT_COLUMNS

    out = []
    for dt, labels in itertools.product(("bf16", "fp16", "fp32"), ("i64", "i32")):
        fwd, bwd = logits_signatures(dt, labels)
        vec = 4 if dt == "fp32" else 8
        for shift, has_ref, block in ((0, True, 8192), (1, False, 4096), (1, True, 16)):
            # The unaligned variant once per dtype: it only drops the body's alignment hint.
            aligned = not (shift and has_ref and labels == "i64")
            consts = dict(SHIFT=shift, HAS_REF=has_ref, VEC=vec, ALIGNED_P=aligned, ALIGNED_R=True, BLOCK_V=block)
            out.append(("token_logps_kernel", fwd, consts))
        for shift, average in ((0, False), (1, True)):
            for aligned, phase in ((True, True), (True, False), (False, False)):
                consts = dict(SHIFT=shift, AVERAGE=average, ALIGNED=aligned, SAME_PHASE=phase, INTERPRET=False)
                out.append(("logits_grad_kernel", bwd, dict(consts, VEC=vec, BLOCK_V=8192)))
        sig = dict(
            token_logp_ptr="*fp32",
            labels_ptr=f"*{labels}",
            logps_ptr="*fp32",
            counts_ptr="*i32",
            T_eff="i32",
            stride_lr="i64",
            stride_lt="i64",
            ignore_index="i32",
            n_rows="i32",
            SHIFT="constexpr",
            AVERAGE="constexpr",
            BLOCK_T="constexpr",
        )
        out.append(("row_reduce_kernel", sig, dict(SHIFT=1, AVERAGE=True, BLOCK_T=1024)))
    # The wrapper passes the policy log-probs in place of the pointer a variant does not read.
    row_types = {False: ("*i64", "*fp32"), True: ("*fp32", "*u8")}  # MULTI_HOT -> (rows_ptr, member_ptr)
    for multi_hot, family in itertools.product((False, True), (0, 1)):
        rows_t, member_t = row_types[multi_hot]
        sig = dict(
            policy_ptr="*fp32",
            ref_ptr="*fp32",
            rows_ptr=rows_t,
            member_ptr=member_t,
            table_ptr="*fp32",
            signs_ptr="*fp32",
            loss_ptr="*fp32",
            dldh_ptr="*fp32",
            stats_ptr="*fp32",
            B="i32",
            NUM_ROWS="i32",
            beta="fp32",
            FAMILY="constexpr",
            MULTI_HOT="constexpr",
            NUM_STATS="constexpr",
            BLOCK_B="constexpr",
            BLOCK_C="constexpr",
        )
        consts = dict(FAMILY=family, MULTI_HOT=multi_hot, NUM_STATS=len(STAT_COLUMNS), BLOCK_B=128, BLOCK_C=32)
        out.append(("pair_terms_kernel", sig, consts))
    out += head_variants()
    return out


def head_variants():
    """The fused head's fold and gradient kernels: every dtype, each transform flag on and off."""
    from catdpo_kernels.bench.sass import head_signatures

    out = []
    for i, dt in enumerate(("bf16", "fp16", "fp32")):
        fold, grad = head_signatures(dt)
        group = 4 if dt == "fp32" else 8
        for on in (False, True):
            # The flags rotate with the dtype, so that each meets both values without the full cube.
            flags = dict(HAS_BIAS=on, HAS_SCALE=on != (i == 1), HAS_SOFTCAP=on != (i == 2))
            out.append(("fold_tile_kernel", fold, dict(flags, METRICS=on, GROUP=group, BLOCK_V=2048)))
            out.append(("grad_tile_kernel", grad, dict(flags, INTERPRET=False, BLOCK_V=1024)))
    return out


def compile_all() -> int:
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from catdpo_kernels.kernels import linear_head, pair_terms, sequence_logps

    kernels = {
        "token_logps_kernel": sequence_logps.token_logps_kernel,
        "logits_grad_kernel": sequence_logps.logits_grad_kernel,
        "row_reduce_kernel": sequence_logps.row_reduce_kernel,
        "pair_terms_kernel": pair_terms.pair_terms_kernel,
        "fold_tile_kernel": linear_head.fold_tile_kernel,
        "grad_tile_kernel": linear_head.grad_tile_kernel,
    }
    count = 0
    for (arch, warp), (name, sig, consts) in itertools.product(TARGETS, kernel_variants()):
        try:
            compiled = triton.compile(
                ASTSource(fn=kernels[name], signature=sig, constexprs=consts), target=GPUTarget("cuda", arch, warp)
            )
        except Exception as exc:
            raise SystemExit(f"sm_{arch} {name} {consts}: {type(exc).__name__}: {exc}") from exc
        assert compiled.asm["ptx"], (arch, name, consts)
        count += 1
    print(f"compiled {count} kernel variants with triton {triton.__version__}")
    return count


def _compile_in_subprocess(*args: str) -> subprocess.CompletedProcess:
    """``python *args`` from the repository root, without the interpreter (which tests set for this process)."""
    pytest.importorskip("triton.backends.nvidia")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run(
        [sys.executable, *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
        cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


def test_kernels_compile_for_sm80_and_sm90():
    proc = _compile_in_subprocess(__file__)
    assert f"compiled {len(TARGETS) * len(kernel_variants())} kernel variants" in proc.stdout


if __name__ == "__main__":
    compile_all()


# Hot-loop SASS instructions per element at sm_90 (catdpo_kernels.bench.sass), with some headroom
# over what the kernels compile to today: a regression of the loops shows here without a GPU.
MAX_PER_ELEMENT = {
    "logits forward": 8.5,
    "logits backward": 8.0,
    "head fold": 8.5,
    "head fold +metrics": 18.0,
    "head gradient": 8.5,
}


def test_hot_loops_stay_lean_and_vectorised(tmp_path):
    out = tmp_path / "sass.json"
    _compile_in_subprocess("-m", "catdpo_kernels.bench.sass", "--json", str(out))
    loops = json.loads(out.read_text())["loops"]
    assert len(loops) == 10
    for loop in loops:
        kind = loop["kernel"].rsplit(" ", 1)[0] if "+metrics" not in loop["kernel"] else "head fold +metrics"
        assert loop["per_element"] <= MAX_PER_ELEMENT[kind], loop
        assert loop["vector_loads"] > 0 and loop["scalar_loads"] == 0, loop
