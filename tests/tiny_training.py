"""The tiny training configuration the training tests share (a few seconds per run on one CPU thread)."""

TINY = dict(
    hidden_size=32,
    intermediate_size=64,
    num_layers=1,
    num_heads=2,
    max_train_pairs=96,
    max_eval_pairs=40,
    batch_size=8,
    eval_every=0,
    progress=False,
    plot=False,
    quiet=True,
    max_length=96,
    max_prompt_length=32,
    device="cpu",
    # One thread: torch's default (a thread per core) spins against any other busy process,
    # and a subprocess then sums floats in the same order as this process.
    threads=1,
)
