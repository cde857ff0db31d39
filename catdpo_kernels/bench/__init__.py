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

Importing this package is cheap: the heavy imports happen in ``main()``.
"""


def main(argv=None) -> int:
    from .cli import main as _main

    return _main(argv)


__all__ = ["main"]
