"""``catdpo-bench``: time and measure the Cat-DPO loss backends against the naive loss.

Examples::

    catdpo-bench                                  # device defaults, prints the table
    catdpo-bench --quick                          # the main shape only, fewer repeats
    catdpo-bench --shapes 8x512x32000 --dtypes fp32 --json out.json --markdown out.md --plot out.png
    catdpo-bench --copy-bandwidth --inplace       # GPU: bandwidth as % of a measured copy
    catdpo-bench --contention 1                   # CPU: the same comparison with one core kept busy
    catdpo-bench --shapes 8x2048x128256 --backends reference,triton \\
        --triton-config default --triton-config BLOCK_V=4096,num_warps=8

  Fused LM head (linear_loss from hidden states) vs the naive head, TRL, Liger and CCE:

    catdpo-bench --head                           # CPU 8x512x256x32000 fp32, GPU 8x2048x4096x128256 bf16
    catdpo-bench --head --scaling                 # naive and ours at T = 512, 1024, 2048 (GPU: 2048-8192)
    catdpo-bench --head --long                    # GPU: also T=8192
    catdpo-bench --head --head-shapes 2x64x32x512 --rows naive,ours-torch,trl-chunked --repeats 3 \\
        --json head.json --markdown head.md --plot head.png
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass

from .sweep import RunPlan

DESCRIPTION = (
    "Benchmark catdpo_kernels.loss backends (reference = naive eager baseline, compiled = naive under "
    "torch.compile, torch = chunked, triton = fused; CUDA only) over a sweep of (2B, T, V, dtype): "
    "fwd / bwd / fwd+bwd time and peak memory above the inputs, with ratios against the naive loss of the same run."
)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="catdpo-bench",
        description=DESCRIPTION,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=__doc__.split("Examples::", 1)[1],
    )
    p.add_argument(
        "--device", default="auto", choices=("auto", "cpu", "cuda"), help="auto: cuda when available (default)"
    )
    p.add_argument(
        "--shapes",
        action="append",
        metavar="2BxTxV[,...]",
        help="cases, e.g. 8x512x32000 (repeatable or comma-separated). "
        "Defaults: CPU 8x512x32000,8x512x4000,8x64x32000; "
        "GPU 8x2048x128256,8x2048x32000,8x512x128256",
    )
    p.add_argument(
        "--dtypes", action="append", metavar="fp32|bf16|fp16[,...]", help="logits dtypes (default: CPU fp32, GPU bf16)"
    )
    p.add_argument(
        "--backends",
        metavar="LIST",
        help="comma-separated from reference, compiled, torch, triton (default: CPU reference,torch,compiled; "
        "GPU reference,triton,compiled,torch). reference is the baseline of every ratio.",
    )
    p.add_argument(
        "--inplace", action="store_true", help="also run the torch/triton backends with inplace_backward=True"
    )
    p.add_argument(
        "--triton-config",
        action="append",
        metavar="CFG",
        dest="triton_configs",
        help="'default' or e.g. 'BLOCK_V=4096,num_warps=8' (repeatable): one triton row per config, run with "
        "CATDPO_TRITON_CONFIG set to it (benchmark-only override of the kernel launch config)",
    )
    p.add_argument("--modes", default="fwd_bwd,fwd,bwd", help="which of fwd_bwd, fwd, bwd to time (default: all)")
    p.add_argument(
        "--repeats",
        type=int,
        default=None,
        help="CPU: timed runs per mode after warm-up (default 3; --quick 1); "
        "--head: timing rounds on any device (default CPU 5, GPU 10; --quick 1)",
    )
    p.add_argument("--warmup-ms", type=float, default=None, help="GPU: do_bench warm-up time (default 25)")
    p.add_argument(
        "--rep-ms", type=float, default=None, help="GPU: do_bench measuring time per mode (default 200; --quick 50)"
    )
    p.add_argument("--quick", action="store_true", help="only the first (main) shape unless --shapes, 1 repeat / 50 ms")
    p.add_argument("--no-memory", action="store_true", help="skip the memory measurement (timing only)")
    p.add_argument(
        "--copy-bandwidth", action="store_true", help="measure the device copy bandwidth once (for %% of copy)"
    )
    p.add_argument(
        "--copy-gbps", type=float, default=None, help="use this copy bandwidth (GB/s) instead of measuring it"
    )
    p.add_argument(
        "--anchors",
        default="auto",
        choices=("auto", "on", "off"),
        help="Liger-Kernel / Cut Cross-Entropy comparisons from hidden states (auto: on CUDA when one is installed)",
    )
    p.add_argument(
        "--anchor-hidden", type=int, default=None, help="hidden size D of the anchor group (default: GPU 4096, CPU 256)"
    )
    p.add_argument("--json", metavar="PATH", help="write the results as JSON (rewritten after every row)")
    p.add_argument("--markdown", metavar="PATH", help="write a markdown table (rewritten after every row)")
    p.add_argument("--plot", metavar="PATH", help="write a PNG of time and memory against V and T (matplotlib)")
    p.add_argument(
        "--save-results",
        nargs="?",
        const="benchmarks/results",
        metavar="DIR",
        help="also write DIR/<device>_<UTC time>.json and .md, named after the device "
        "(default DIR: benchmarks/results)",
    )
    head = p.add_argument_group("fused LM head mode (--head)")
    head.add_argument(
        "--head",
        action="store_true",
        help="benchmark linear_loss (the fused LM head, from hidden states) against the naive head "
        "(backend=reference), its torch.compile, the frozen-head variants, TRL's chunked head, Liger's fused "
        "DPO and Cut Cross-Entropy; ratios against naive and against each peer, TFLOP/s against a measured GEMM",
    )
    head.add_argument(
        "--scaling",
        action="store_true",
        help="with --head: naive and ours only, over T (CPU 512, 1024, 2048; GPU 2048, 4096, 8192), fwd+bwd "
        "only unless --modes; ours' peak memory must stay within the default tile budget + 64 MiB",
    )
    head.add_argument(
        "--head-shapes",
        action="append",
        metavar="2BxTxHxV[,...]",
        help="with --head: cases (default CPU 8x512x256x32000, GPU 8x2048x4096x128256)",
    )
    head.add_argument("--long", action="store_true", help="with --head on GPU: also the T=8192 case")
    head.add_argument(
        "--rows",
        metavar="LIST",
        help="with --head: only these rows (e.g. naive,ours-torch,trl-chunked); default all: naive, naive-compiled, "
        "ours-torch, ours-triton, naive-frozen, ours-<fused>-frozen, trl-chunked, liger-dpo, cce",
    )
    cpu = p.add_argument_group("CPU runs")
    cpu.add_argument(
        "--threads",
        default="auto",
        metavar="N|auto",
        help="torch intra-op threads (default auto: one per idle core, unless OMP_NUM_THREADS or MKL_NUM_THREADS "
        "is set); the report records the count and what chose it",
    )
    cpu.add_argument(
        "--contention",
        type=int,
        default=0,
        metavar="N",
        help="contention mode: N busy processes (one core each) run during the whole sweep, as another job on "
        "a shared machine would; auto threads count them as busy cores",
    )
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--seed", type=int, default=0)
    return p


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    argv_list = list(sys.argv[1:] if argv is None else argv)
    from .cpu_setup import parse_threads

    try:
        args.threads = parse_threads(args.threads)
    except ValueError as exc:
        parser.error(str(exc))
    if args.contention < 0:
        parser.error(f"--contention must be >= 0 busy processes, got {args.contention}")
    if args.head:
        from .head_cli import run as run_head

        return run_head(args, parser, argv_list)
    for flag in ("scaling", "head_shapes", "long", "rows"):
        if getattr(args, flag):
            parser.error(f"--{flag.replace('_', '-')} needs --head")

    from .output import Output
    from .sweep import Sweep, cpu_notes, pick_device, start_run
    from .targets import annotate

    device = pick_device(args.device, parser)
    plan = _plan(args, parser, device)
    meta, cpu_record, cpu_run = start_run(args, parser, device)
    report = _skeleton(args, plan, meta, argv_list)
    report["notes"] += _opening_notes(args, plan) + cpu_notes(meta, cpu_record)

    def annotate_rows() -> None:
        annotate(report["results"], device_type=device.type, copy_gbps=(report["copy_bandwidth"] or {}).get("GBps"))

    output = Output(report, args, annotate=annotate_rows)
    with Sweep(report, output, total=plan.total, no_progress=args.no_progress, cpu_run=cpu_run) as sweep:
        _measure_copy_bandwidth(args, plan, report, sweep)
        _sweep_cases(args, plan, report, sweep, output)
    return output.finish(sweep.status)


@dataclass
class _Plan(RunPlan):
    """The logits mode's plan: backends and GPU timing windows, and the LM-head anchors."""

    backends: list[str]
    warmup_ms: float
    rep_ms: float
    anchor_notes: list[str]
    run_anchors: bool
    anchor_dim: int
    anchor_variants: list

    @property
    def total(self) -> int:
        return len(self.shapes) * len(self.dtypes) * (len(self.variants) + len(self.anchor_variants))


def _plan(args, parser, device) -> _Plan:
    from . import anchors as A
    from . import cases as C
    from .runner import Settings

    on_gpu = device.type == "cuda"
    try:
        shapes = C.parse_shapes(args.shapes) if args.shapes else None
        dtypes = C.parse_dtypes(args.dtypes) if args.dtypes else None
        backends = C.split_list([args.backends]) if args.backends else None
        configs = [C.validate_triton_config(c) for c in args.triton_configs] if args.triton_configs else None
        modes = C.parse_modes(args.modes)
        for b in backends or []:
            if b not in C.KNOWN_BACKENDS:
                raise ValueError(f"unknown backend {b!r}; use {', '.join(C.KNOWN_BACKENDS)}")
    except ValueError as exc:
        parser.error(str(exc))
    if shapes is None:
        shapes = C.parse_shapes(C.GPU_DEFAULT_SHAPES if on_gpu else C.CPU_DEFAULT_SHAPES)
        if args.quick:
            shapes = shapes[:1]
    dtypes = dtypes or C.parse_dtypes(C.GPU_DEFAULT_DTYPES if on_gpu else C.CPU_DEFAULT_DTYPES)
    backends = backends or list(C.GPU_DEFAULT_BACKENDS if on_gpu else C.CPU_DEFAULT_BACKENDS)
    if configs and "triton" not in backends:
        backends.append("triton")
    repeats = args.repeats if args.repeats is not None else (1 if args.quick else 3)
    rep_ms = args.rep_ms if args.rep_ms is not None else (50 if args.quick else 200)
    warmup_ms = args.warmup_ms if args.warmup_ms is not None else (10 if args.quick else 25)
    settings = Settings(
        device=device, repeats=repeats, warmup_ms=warmup_ms, rep_ms=rep_ms, memory=not args.no_memory, modes=modes
    )
    anchor_notes = [f"{label}: {why}" for label, why in A.availability().items() if why]
    if args.anchors == "auto":
        run_anchors = on_gpu and len(anchor_notes) < len(A.ANCHOR_MODULES)
    else:
        run_anchors = args.anchors == "on"
    return _Plan(
        device=device,
        shapes=shapes,
        dtypes=dtypes,
        backends=backends,
        modes=modes,
        repeats=repeats,
        warmup_ms=warmup_ms,
        rep_ms=rep_ms,
        settings=settings,
        variants=C.logits_variants(backends, device=device, inplace=args.inplace, triton_configs=configs),
        anchor_notes=anchor_notes,
        run_anchors=run_anchors,
        anchor_dim=args.anchor_hidden or (4096 if on_gpu else 256),
        anchor_variants=A.lm_head_variants(device) if run_anchors else [],
    )


def _skeleton(args, plan: _Plan, meta: dict, argv_list: list[str]) -> dict:
    """The report before any row: what is measured, and how."""
    from . import cases as C

    on_gpu = plan.on_gpu
    timing_text = (
        f"triton.testing.do_bench (L2 flushed per run), warm-up {plan.warmup_ms} ms, measuring {plan.rep_ms} ms "
        "per mode; median with 20th/80th percentiles; inputs rotated when one set fits in 4x L2"
        if on_gpu
        else f"wall clock, 1 warm-up fwd+bwd per variant, then {plan.repeats} timed runs per mode; median"
    )
    memory_text = "off"
    if not args.no_memory:
        memory_text = "peak above the allocation at entry, " + (
            "CUDA allocator counters"
            if on_gpu
            else "replay of torch.profiler [memory] events (the profiler sees one thread: while it "
            "records, the torch backend runs its blocks in the calling thread, one block holding as "
            "many logits as the worker threads' blocks together)"
        )
    return {
        "meta": meta,
        "settings": {
            "argv": ["catdpo-bench"] + argv_list,
            "device": plan.device.type,
            "shapes": [str(s) for s in plan.shapes],
            "dtypes": [C.dtype_name(d) for d in plan.dtypes],
            "backends": plan.backends,
            "variants": [v.label for v in plan.variants] + [v.label for v in plan.anchor_variants],
            "modes": plan.modes,
            "repeats": plan.repeats if not on_gpu else None,
            "warmup_ms": plan.warmup_ms if on_gpu else None,
            "rep_ms": plan.rep_ms if on_gpu else None,
            "check_inputs": False,
            "loss": (
                f"loss_type=catdpo, beta={C.BETA}, C={C.NUM_CATEGORIES}, reduction=mean, ref logits given, "
                f"first {int(C.PROMPT_FRACTION * 100)}% of every row a masked prompt"
            ),
            "timing": timing_text,
            "memory": memory_text,
            "anchors": {"enabled": plan.run_anchors, "hidden_dim": plan.anchor_dim if plan.run_anchors else None},
        },
        "copy_bandwidth": None,
        "notes": [],
        "results": [],
    }


def _opening_notes(args, plan: _Plan) -> list[str]:
    notes = []
    if "reference" not in plan.backends:
        notes.append("no naive baseline (backend=reference) in this run: ratios are n/a")
    if not plan.on_gpu and "triton" in plan.backends:
        notes.append("triton rows are skipped on CPU: the TRITON_INTERPRET=1 interpreter is never benchmarked")
    if plan.anchor_notes and (plan.run_anchors or plan.on_gpu):
        notes.append("anchors skipped: " + "; ".join(plan.anchor_notes))
    elif not plan.run_anchors and args.anchors == "auto" and not plan.on_gpu:
        notes.append("anchors (Liger-Kernel, Cut Cross-Entropy) need CUDA: not run on CPU")
    return notes


def _measure_copy_bandwidth(args, plan: _Plan, report: dict, sweep) -> None:
    from .timing import copy_bandwidth

    if args.copy_gbps:
        report["copy_bandwidth"] = {"GBps": args.copy_gbps, "method": "given with --copy-gbps"}
    elif args.copy_bandwidth:
        sweep.progress.set_postfix_str("copy bandwidth")
        report["copy_bandwidth"] = copy_bandwidth(plan.device)
        sweep.say(f"copy bandwidth: {report['copy_bandwidth']['GBps']:.0f} GB/s")
    elif plan.on_gpu:
        report["notes"].append("no --copy-bandwidth: bandwidth is shown in GB/s only, not as % of a copy")


def _sweep_cases(args, plan: _Plan, report: dict, sweep, output) -> None:
    """Every (shape, dtype) case: the logits rows, then the LM-head anchors if they run."""
    from . import anchors as A
    from . import cases as C
    from .memory import OOM_ERRORS, release
    from .runner import blank_result, run_variant
    from .timing import rotation_sets

    device, progress = plan.device, sweep.progress
    done = 0

    def run_group(group_variants, make_inputs, base):
        nonlocal done
        try:
            inputs = make_inputs()
        except OOM_ERRORS as exc:
            inputs = None
            report["notes"].append(f"{base['case']} [{base['group']}]: inputs do not fit ({type(exc).__name__})")
        for variant in group_variants:
            progress.set_postfix_str(f"{base['case']} {variant.label}")
            if inputs is None:
                r = blank_result(variant, base, status="oom", note="inputs do not fit")
            else:
                r = run_variant(variant, inputs, base, plan.settings)
            report["results"].append(r)
            done += 1
            progress.update(1)
            sweep.say(f"[{done}/{plan.total}] {_line(r)}")
            output.flush()
        del inputs
        release(device)

    for shape in plan.shapes:
        for dtype in plan.dtypes:
            base = {
                "case": f"{shape} {C.dtype_name(dtype)}",
                "shape": {"rows": shape.rows, "tokens": shape.tokens, "vocab": shape.vocab},
                "shape_str": str(shape),
                "dtype": C.dtype_name(dtype),
                "group": "logits",
                "_shape": shape,
                "_dtype": dtype,
            }
            base["input_sets"] = nsets = rotation_sets(2 * shape.numel * dtype.itemsize, device)
            run_group(
                plan.variants, lambda: C.make_logits_inputs(shape, dtype, device, sets=nsets, seed=args.seed), base
            )
            if plan.anchor_variants:
                abase = dict(base, group="lm_head", input_sets=1, hidden_dim=plan.anchor_dim)
                run_group(
                    plan.anchor_variants,
                    lambda: [A.make_hidden_inputs(shape, dtype, device, plan.anchor_dim, seed=args.seed)],
                    abase,
                )


def _line(r: dict) -> str:
    head = f"{r['case']}{'' if r['group'] == 'logits' else ' [' + r['group'] + ']'} {r['label']}"
    if r["status"] != "ok":
        return f"{head}: {r['status']} ({r.get('note')})"
    t = r["time_ms"].get("fwd_bwd") or r["time_ms"].get("fwd") or {}
    rise = (r.get("memory") or {}).get("fwd_bwd_rise_bytes")
    parts = [f"fwd+bwd {t.get('median_ms', float('nan')):.2f} ms" if t else "no timing"]
    if rise is not None:
        parts.append(f"rise {rise / 2**20:.1f} MiB")
    return f"{head}: " + ", ".join(parts)


if __name__ == "__main__":
    raise SystemExit(main())
