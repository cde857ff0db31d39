"""``catdpo-bench --head``: the fused LM head (``linear_loss``) against the naive head and the other fused heads.

Called by ``cli.main`` with the parsed arguments. One run: for every case, every
row is prepared (warm-up, memory), then all ready rows are timed in interleaved
rounds (``head_runner``); ratios and targets come from ``head_targets``, the
table, markdown and plot from ``head_report``. The JSON has the same layout as
the logits mode (``meta``, ``settings``, ``notes``, ``results``) plus ``gemm``
(the reference matmul of every case), with ``settings.mode == "head"``.
"""

from __future__ import annotations

from dataclasses import dataclass

from .sweep import RunPlan

# Options of the logits mode that mean nothing here.
LOGITS_ONLY = (
    "shapes",
    "backends",
    "inplace",
    "triton_configs",
    "copy_bandwidth",
    "copy_gbps",
    "anchor_hidden",
    "warmup_ms",
    "rep_ms",
)


def run(args, parser, argv_list: list[str]) -> int:
    from . import head_targets as HT
    from .output import Output
    from .sweep import Sweep, cpu_notes, pick_device, start_run

    for name in LOGITS_ONLY:
        value = getattr(args, name, None)
        if value not in (None, False):
            parser.error(f"--{name.replace('_', '-')} belongs to the logits mode; --head takes --head-shapes, --rows")
    if args.scaling and args.long:
        parser.error("--long adds the T=8192 case to the default --head run; --scaling has its own T sweep")

    device = pick_device(args.device, parser)
    plan = _plan(args, parser, device)
    meta, cpu_record, cpu_run = start_run(args, parser, device)
    report = _skeleton(args, plan, meta, argv_list)
    report["notes"] += _opening_notes(plan) + cpu_notes(meta, cpu_record)

    def annotate_rows() -> None:
        HT.annotate(report["results"], device_type=device.type, gemm=report["gemm"])

    def closing() -> None:  # the checks that need every row: loss values against naive, noisy timings
        annotate_rows()
        report["notes"].extend(HT.loss_check(report["results"]))
        report["notes"].extend(HT.noise_notes(report["results"]))

    output = Output(report, args, annotate=annotate_rows, tag=plan.group)
    total = len(plan.shapes) * len(plan.dtypes) * len(plan.variants)
    with Sweep(report, output, total=total, no_progress=args.no_progress, closing=closing, cpu_run=cpu_run) as sweep:
        for shape in plan.shapes:
            for dtype in plan.dtypes:
                _run_case(args, plan, shape, dtype, report, sweep, output)
    return output.finish(sweep.status)


@dataclass
class _Plan(RunPlan):
    """The ``--head`` mode's plan: its result group (``head`` or ``head-scaling``)."""

    group: str


def _plan(args, parser, device) -> _Plan:
    import torch

    from . import head_cases as H
    from .cases import parse_dtypes, parse_modes, split_list
    from .head_runner import HeadSettings

    on_gpu = device.type == "cuda"
    try:
        shapes = (
            H.parse_head_shapes(args.head_shapes)
            if args.head_shapes
            else H.default_head_shapes(device.type, scaling=args.scaling, long=args.long)
        )
        dtypes = parse_dtypes(args.dtypes) if args.dtypes else [torch.bfloat16 if on_gpu else torch.float32]
        text = args.modes
        if args.scaling and text == parser.get_default("modes"):
            text = "fwd_bwd"  # the T sweep reports fwd+bwd time and memory; --modes asks for more
        modes = parse_modes(text)
        variants = H.head_variants(device, scaling=args.scaling)
        if args.rows:
            wanted = split_list([args.rows])
            known = {v.label for v in variants}
            unknown = [x for x in wanted if x not in known]
            if unknown:
                raise ValueError(f"--rows: unknown {', '.join(unknown)}; this run has {', '.join(sorted(known))}")
            variants = [v for v in variants if v.label in wanted]
    except ValueError as exc:
        parser.error(str(exc))
    if args.quick and not args.head_shapes:
        shapes = shapes[:1]
    repeats = args.repeats if args.repeats is not None else (1 if args.quick else (10 if on_gpu else 5))
    return _Plan(
        device=device,
        shapes=shapes,
        dtypes=dtypes,
        modes=modes,
        variants=variants,
        repeats=repeats,
        settings=HeadSettings(device=device, repeats=repeats, modes=modes, memory=not args.no_memory),
        group="head-scaling" if args.scaling else "head",
    )


def _skeleton(args, plan: _Plan, meta: dict, argv_list: list[str]) -> dict:
    """The report before any row: what is measured, and how."""
    from . import head_cases as H
    from . import head_targets as HT
    from .cases import dtype_name

    memory_text = "off"
    if not args.no_memory:
        memory_text = "peak above the allocation at entry, " + (
            "CUDA allocator counters; excluding the returned gradients: the peak minus their bytes"
            if plan.on_gpu
            else "replay of torch.profiler allocation events; excluding the returned gradients: the same "
            "replay without those buffers"
        )
    return {
        "meta": meta,
        "settings": {
            "mode": "head",
            "scaling": bool(args.scaling),
            "argv": ["catdpo-bench"] + argv_list,
            "device": plan.device.type,
            "shapes": [str(s) for s in plan.shapes],
            "shape_format": "2BxTxHxV",
            "dtypes": [dtype_name(d) for d in plan.dtypes],
            "variants": [v.label for v in plan.variants],
            "modes": plan.modes,
            "repeats": plan.repeats,
            "check_inputs": False,
            "budget_bytes": HT.budget_bytes(plan.device.type),
            "trl_chunk_size": H.trl_chunk_size() if H.installed("trl") else None,
            "loss": (
                f"linear_loss: loss_type=catdpo, beta={H.BETA}, C={H.NUM_CATEGORIES}, reduction=mean, "
                "shift_labels=True, reference hidden states and head given, "
                f"first {int(H.PROMPT_FRACTION * 100)}% of every row a masked prompt"
            ),
            "timing": (
                f"{plan.settings.method}: every round samples each ready row (and the reference GEMM) once per "
                "mode, in an order that rotates by one row per round and reverses every other round; "
                "1 warm-up fwd+bwd per row before"
            ),
            "memory": memory_text,
            "flop_model": H.FLOP_MODEL,
        },
        "copy_bandwidth": None,
        "gemm": {},
        "notes": [],
        "results": [],
    }


def _opening_notes(plan: _Plan) -> list[str]:
    notes = []
    if not any(v.baseline for v in plan.variants):
        notes.append("no naive row in this run: ratios against naive are n/a")
    notes.append(
        "trl-chunked projects only the positions with a label (as TRL's add_fused_lm_head does on Triton devices; "
        "on other devices TRL projects every position, which is slower): the stronger form is timed"
    )
    return notes


def _run_case(args, plan: _Plan, shape, dtype, report: dict, sweep, output) -> None:
    """One case: every row's warm-up and memory, then the interleaved timing rounds."""
    from . import head_cases as H
    from .cases import dtype_name
    from .head_runner import blank_result, prepare, time_rounds
    from .memory import OOM_ERRORS, release

    progress = sweep.progress
    base = {
        "case": f"{shape} {dtype_name(dtype)}",
        "shape": shape.to_dict(),
        "shape_str": str(shape),
        "dtype": dtype_name(dtype),
        "group": plan.group,
        "counted_tokens": shape.counted_tokens,
        "_shape": shape,
    }
    try:
        inp = H.make_head_inputs(shape, dtype, plan.device, seed=args.seed)
    except OOM_ERRORS as exc:
        report["notes"].append(f"{base['case']}: inputs do not fit ({type(exc).__name__})")
        for v in plan.variants:
            report["results"].append(blank_result(v, base, status="oom", note="inputs do not fit"))
            progress.update(1)
        output.flush()
        return
    prepared = []
    for v in plan.variants:
        progress.set_postfix_str(f"{base['case']} {v.label}: warm-up, memory")
        p = prepare(v, inp, base, plan.settings)
        prepared.append(p)
        report["results"].append(p.result)
        sweep.say(f"[{base['case']}] {_line(p.result)}")
        progress.update(1)
        output.flush()
    progress.set_postfix_str(f"{base['case']}: {plan.repeats} timing rounds")
    report["gemm"][base["case"]] = time_rounds(prepared, inp, plan.settings, say=sweep.say)
    for p in prepared:
        if p.result["status"] == "ok":
            sweep.say(f"[{base['case']}] {_line(p.result)}")
    output.flush()
    del inp, prepared
    release(plan.device)


def _line(r: dict) -> str:
    head = f"{r['label']}"
    if r["status"] != "ok":
        return f"{head}: {r['status']} ({r.get('note')})"
    parts = []
    t = (r.get("time_ms") or {}).get("fwd_bwd")
    if t:
        parts.append(f"fwd+bwd {t['median_ms']:.2f} ms")
    rise = (r.get("memory") or {}).get("fwd_bwd_rise_excl_grad_bytes")
    if rise is not None:
        parts.append(f"rise-grad {rise / 2**20:.1f} MiB")
    if r.get("schedule"):
        parts.append(r["schedule"])
    return f"{head}: " + (", ".join(parts) or "ready")
