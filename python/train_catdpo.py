#!/usr/bin/env python
"""Train a causal LM with Cat-DPO (or DPO / IPO / SafeDPO) on PKU-SafeRLHF-schema data.

The same program as the ``catdpo-train`` console script (and ``python -m
catdpo_kernels.training``): the loop lives in ``catdpo_kernels.training`` so that
the installed package can run it too.

    python python/train_catdpo.py                      # tiny random Llama, bundled sample, CPU
    python python/train_catdpo.py --compare            # dpo vs safedpo vs catdpo, one table
    python python/train_catdpo.py --model ./my-llama --data PKU-Alignment/PKU-SafeRLHF --data-config alpaca3-8b
    torchrun --nproc_per_node=2 python/train_catdpo.py # DDP (gloo on CPU, nccl on GPU)
    python python/train_catdpo.py data                 # the data set's SafeDPO transform and category counts

Running the same command again resumes the run from its last complete checkpoint, or, once it
has finished, reports that and exits 0; ``--overwrite`` starts again. Run with ``--help`` for
every option.
"""

import sys

from catdpo_kernels.training.cli import main

if __name__ == "__main__":
    sys.exit(main())
