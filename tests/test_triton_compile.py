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
import os
import subprocess
import sys

import pytest

TARGETS = ((80, 32), (90, 32))


def kernel_variants():
    """``(kernel name, signature, constexprs)`` for every launch the wrappers make."""
    out = []
    for dt, labels in itertools.product(("bf16", "fp16", "fp32"), ("i64", "i32")):
        for shift, has_ref, block in ((0, True, 8192), (1, False, 4096), (1, True, 16)):
            sig = dict(
                policy_ptr=f"*{dt}",
                ref_ptr=f"*{dt}",
                labels_ptr=f"*{labels}",
                token_logp_ptr="*fp32",
                max_logsum_ptr="*fp32",
                T_eff="i32",
                V="i32",
                stride_pr="i64",
                stride_pt="i64",
                stride_rr="i64",
                stride_rt="i64",
                stride_lr="i64",
                stride_lt="i64",
                ignore_index="i32",
                SHIFT="constexpr",
                HAS_REF="constexpr",
                BLOCK_V="constexpr",
            )
            out.append(("token_logps_kernel", sig, dict(SHIFT=shift, HAS_REF=has_ref, BLOCK_V=block)))
        for shift, average in ((0, False), (1, True)):
            sig = dict(
                logits_ptr=f"*{dt}",
                grad_ptr=f"*{dt}",
                labels_ptr=f"*{labels}",
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
                stride_lr="i64",
                stride_lt="i64",
                ignore_index="i32",
                SHIFT="constexpr",
                AVERAGE="constexpr",
                BLOCK_V="constexpr",
            )
            out.append(("logits_grad_kernel", sig, dict(SHIFT=shift, AVERAGE=average, BLOCK_V=8192)))
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
        consts = dict(FAMILY=family, MULTI_HOT=multi_hot, NUM_STATS=6, BLOCK_B=128, BLOCK_C=32)
        out.append(("pair_terms_kernel", sig, consts))
    return out


def compile_all() -> int:
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from catdpo_kernels.kernels import pair_terms, sequence_logps

    kernels = {
        "token_logps_kernel": sequence_logps.token_logps_kernel,
        "logits_grad_kernel": sequence_logps.logits_grad_kernel,
        "row_reduce_kernel": sequence_logps.row_reduce_kernel,
        "pair_terms_kernel": pair_terms.pair_terms_kernel,
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


def test_kernels_compile_for_sm80_and_sm90():
    pytest.importorskip("triton.backends.nvidia")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run(
        [sys.executable, __file__],
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
        cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert f"compiled {len(TARGETS) * len(kernel_variants())} kernel variants" in proc.stdout


if __name__ == "__main__":
    compile_all()
