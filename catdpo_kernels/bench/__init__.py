"""``catdpo-bench``: fused vs naive Cat-DPO loss, time and memory, on this machine.

Run ``catdpo-bench --help`` or ``python -m catdpo_kernels.bench --help``. Modules:

- ``cases``: what is run (shapes, dtypes, variants, inputs);
- ``runner``: one variant on one case (warm-up, memory, timings);
- ``timing``: GPU ``do_bench`` / CPU wall clock, copy bandwidth;
- ``memory``: peak memory above the start of a call;
- ``targets``: ratios against the naive baseline, bandwidth, the targets of docs/design.md ("Performance model");
- ``report``: terminal table, JSON, markdown, plot;
- ``anchors``: optional Liger-Kernel / Cut Cross-Entropy comparisons;
- ``env``: device, versions, git commit, date.

Shared by both modes:

- ``sweep``: the device, the machine's load, the sweep (SIGTERM / Ctrl-C keep partial results);
- ``output``: the JSON / markdown files rewritten after every row, the plot, the table and exit status;
- ``progress``: the progress bar and the per-row lines on stderr.

The fused-head mode (``catdpo-bench --head``: ``linear_loss`` from hidden states
against the naive head, TRL, Liger and Cut Cross-Entropy):

- ``head_cases``: shapes ``2BxTxHxV``, inputs, the rows and their FLOP model;
- ``head_runner``: set-up, warm-up and memory per row, then interleaved timing rounds;
- ``head_targets``: ratios against naive and each peer, TFLOP/s, the targets;
- ``head_report``: table, markdown, plot and the summary digest;
- ``head_cli``: the mode's driver.

Importing this package is cheap: the heavy imports happen in ``main()``.
"""


def main(argv=None) -> int:
    from .cli import main as _main

    return _main(argv)


__all__ = ["main"]
