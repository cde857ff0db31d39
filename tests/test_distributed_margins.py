"""Two gloo processes on CPU: each computes the loss on its half of every batch and
updates its ``CategoryMargins``; the margins must equal one process over the whole batch.

Everything stays on 127.0.0.1: the rendezvous goes through a free loopback port and
gloo talks over the ``lo`` interface.
"""

from __future__ import annotations

import datetime
import os
import socket
import time

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from _utils import make_batch

import catdpo_kernels
from catdpo_kernels import CatDPOLoss, CategoryMargins

WORLD = 2
STEPS = 3
SIGNALS = ("soft", "hard")
B, T, V, C = 8, 4, 19, 4  # per rank
MARGIN_KW = dict(init=[0.4, 0.8, 1.2, 1.6], lr=0.6, target=0.15, ema=0.8, min_count=1.5)
# Per-rank judge rates: NaN where a rank has no rate for that category.
JUDGE = [[0.2, float("nan"), 0.6, float("nan")], [0.4, float("nan"), float("nan"), 0.1]]
JUDGE_MEAN = [0.3, float("nan"), 0.6, 0.1]


def rank_batch(step: int, rank: int) -> dict:
    batch = make_batch(B, T, V, C, seed=1000 * step + rank, multi_hot=(step % 2 == 1))
    batch.pop("margins")
    return batch


def concat_pairs(parts: list[dict]) -> dict:
    """Several batches as one: all chosen rows first, then all rejected rows."""
    out = {}
    for key in ("policy_logits", "ref_logits", "labels", "unsafe"):
        chosen = [p[key][: p[key].shape[0] // 2] for p in parts]
        rejected = [p[key][p[key].shape[0] // 2 :] for p in parts]
        out[key] = torch.cat(chosen + rejected)
    out["categories"] = torch.cat([p["categories"] for p in parts])
    return out


def run_steps(margins: CategoryMargins, module: CatDPOLoss, batches_per_step) -> dict:
    """The training-loop side: loss -> stats -> update, for margins and for a CatDPOLoss."""
    values, module_values = [], []
    for batch in batches_per_step:
        out = catdpo_kernels.loss(**batch, margins=margins, beta=0.3, backend="torch")
        margins.update(out.category_stats)
        values.append(margins.value.clone())
        # The module, with two micro-batches per step (halves of this batch's pairs).
        for part in split_pairs(batch):
            module(**part)
        module_values.append(module.update_margins().clone())
    judged = margins.update(unsafe_rate=JUDGE[dist.get_rank()] if dist.is_initialized() else JUDGE_MEAN).clone()
    return dict(values=values, module_values=module_values, judged=judged, state=margins.state_dict())


def split_pairs(batch: dict) -> list[dict]:
    n = batch["categories"].shape[0]
    parts = []
    for sl in (slice(0, n // 2), slice(n // 2, n)):
        rows = list(range(n))[sl] + [n + i for i in list(range(n))[sl]]
        parts.append(
            {
                "policy_logits": batch["policy_logits"][rows],
                "ref_logits": batch["ref_logits"][rows],
                "labels": batch["labels"][rows],
                "unsafe": batch["unsafe"][rows],
                "categories": batch["categories"][sl],
            }
        )
    return parts


def make_state(signal: str):
    margins = CategoryMargins(C, signal=signal, **MARGIN_KW)
    module = CatDPOLoss(C, beta=0.3, backend="torch", signal=signal, **MARGIN_KW)
    return margins, module


def _worker(rank: int, port: int, out_dir: str) -> None:
    os.environ["GLOO_SOCKET_IFNAME"] = "lo"
    dist.init_process_group(
        "gloo",
        init_method=f"tcp://127.0.0.1:{port}",
        rank=rank,
        world_size=WORLD,
        timeout=datetime.timedelta(seconds=60),
    )
    try:
        results = {}
        for signal in SIGNALS:
            margins, module = make_state(signal)
            results[signal] = run_steps(margins, module, [rank_batch(step, rank) for step in range(STEPS)])
        torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
        dist.barrier()
    finally:
        dist.destroy_process_group()


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def spawn_ranks(out_dir: str, timeout_s: float = 120.0) -> None:
    ctx = mp.start_processes(_worker, args=(free_port(), out_dir), nprocs=WORLD, join=False, start_method="spawn")
    deadline = time.monotonic() + timeout_s
    try:
        while not ctx.join(timeout=1.0):
            if time.monotonic() > deadline:
                raise TimeoutError(f"distributed workers did not finish in {timeout_s} s")
    finally:
        for p in ctx.processes:
            if p.is_alive():
                p.terminate()
                p.join(5)


@pytest.fixture(scope="module")
def rank_results(tmp_path_factory):
    """One spawn of two ranks for the whole module (starting processes is the slow part)."""
    out_dir = tmp_path_factory.mktemp("gloo")
    spawn_ranks(str(out_dir))
    return [torch.load(out_dir / f"rank{r}.pt") for r in range(WORLD)]


@pytest.mark.slow
@pytest.mark.parametrize("signal", SIGNALS)
def test_two_gloo_ranks_match_one_process(rank_results, signal):
    ranks = [r[signal] for r in rank_results]

    margins, module = make_state(signal)
    single = run_steps(margins, module, [concat_pairs([rank_batch(s, r) for r in range(WORLD)]) for s in range(STEPS)])

    # Every rank holds identical margins, bitwise.
    for key in ("values", "module_values"):
        for a, b in zip(ranks[0][key], ranks[1][key]):
            assert torch.equal(a, b), key
    assert torch.equal(ranks[0]["judged"], ranks[1]["judged"])
    assert torch.equal(ranks[0]["state"]["ema_count"], ranks[1]["state"]["ema_count"])

    # ... and equal to one process over the concatenated batch.
    for key in ("values", "module_values"):
        for step, (dist_v, single_v) in enumerate(zip(ranks[0][key], single[key])):
            if signal == "hard":  # integer columns only: exact
                assert torch.equal(dist_v, single_v), (key, step, dist_v, single_v)
            else:  # fp32 tables summed per rank vs over the whole batch
                torch.testing.assert_close(dist_v, single_v, atol=1e-6, rtol=0, msg=f"{key} step {step}")
        assert not torch.equal(ranks[0][key][-1], torch.tensor(MARGIN_KW["init"]))  # the margins did move
    torch.testing.assert_close(ranks[0]["state"]["ema_count"], single["state"]["ema_count"], atol=1e-9, rtol=0)

    # The judge path: each category averages the ranks' finite rates; all-NaN stays put.
    torch.testing.assert_close(ranks[0]["judged"], single["judged"], atol=1e-6, rtol=0)
    assert ranks[0]["judged"][1] == ranks[0]["values"][-1][1]
