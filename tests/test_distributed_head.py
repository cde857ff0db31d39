"""The fused head under data parallelism: two gloo ranks on CPU against one process.

A tiny Llama runs its backbone through the ``catdpo_head`` forward of
``catdpo_kernels.integrations.hf`` and ``linear_loss`` projects the counted
tokens inside that forward. Each rank holds half of the pairs of one global
batch; with the mean reduction, the ranks' averaged loss and the synchronised
gradients must equal one process on the whole batch (fp32, 1e-6 relative).
Both DDP and FSDP2 (``fully_shard``, which gathers the output embedding before
the head reads it) are checked.
"""

from __future__ import annotations

import datetime
import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

WORLD = 2
PAIRS = 4  # global
VOCAB = 37


def make_model():
    from transformers import LlamaConfig, LlamaForCausalLM

    from catdpo_kernels.integrations.hf import add_hidden_head

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=2,
        tie_word_embeddings=False,
    )
    model = LlamaForCausalLM(config)
    add_hidden_head(model)
    return model


def global_batch():
    gen = torch.Generator().manual_seed(5)
    ids = torch.randint(0, VOCAB, (2 * PAIRS, 7), generator=gen)
    labels = ids.clone()
    labels[:, :2] = -100  # a prompt
    labels[1, 2:] = -100  # a sequence with no counted token
    categories = torch.tensor([0, 1, -1, 2])
    unsafe = torch.tensor([0, 0, 0, 0, 1, 1, 0, 0])
    ref_logps = -torch.linspace(5.0, 9.0, 2 * PAIRS)
    return ids, labels, categories, unsafe, ref_logps


def rank_batch(rank: int):
    ids, labels, categories, unsafe, ref_logps = global_batch()
    b = PAIRS // WORLD
    pairs = list(range(rank * b, (rank + 1) * b))
    rows = pairs + [PAIRS + i for i in pairs]
    return ids[rows], labels[rows], categories[pairs], unsafe[rows], ref_logps[rows]


def step(model, ids, labels, categories, unsafe, ref_logps):
    """Forward (the loss inside the model's forward) and backward; returns the loss."""
    from catdpo_kernels import linear_loss

    margins = torch.tensor([0.5, 1.0, 1.5])

    def head(hidden, weight, bias, _outputs):
        return linear_loss(
            hidden,
            weight,
            labels,
            categories,
            margins,
            bias=bias,
            ref_logps=ref_logps,
            unsafe=unsafe,
            shift_labels=True,
            backend="torch",
        )

    out = model(input_ids=ids, catdpo_head=head)
    out.loss.backward()
    return out.loss.detach()


def _worker(rank: int, port: int, mode: str, out_dir: str) -> None:
    os.environ["GLOO_SOCKET_IFNAME"] = "lo"
    dist.init_process_group(
        "gloo",
        init_method=f"tcp://127.0.0.1:{port}",
        rank=rank,
        world_size=WORLD,
        timeout=datetime.timedelta(seconds=60),
    )
    try:
        model = make_model()
        if mode == "fsdp2":
            from torch.distributed.fsdp import fully_shard

            for layer in model.model.layers:
                fully_shard(layer)
            fully_shard(model)
        else:
            model = torch.nn.parallel.DistributedDataParallel(model)
        loss = step(model, *rank_batch(rank))
        grads = {}
        for name, p in model.named_parameters():
            g = p.grad.full_tensor() if hasattr(p.grad, "full_tensor") else p.grad
            grads[name.removeprefix("module.")] = g.detach().clone()
        dist.all_reduce(loss)
        torch.save(dict(loss=loss / WORLD, grads=grads), os.path.join(out_dir, f"{mode}{rank}.pt"))
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["ddp", "fsdp2"])
def test_two_ranks_match_one_process(tmp_path, mode):
    mp.start_processes(_worker, args=(_free_port(), mode, str(tmp_path)), nprocs=WORLD, start_method="spawn")
    ranks = [torch.load(tmp_path / f"{mode}{r}.pt") for r in range(WORLD)]

    model = make_model()
    loss = step(model, *global_batch())
    for r in ranks:
        torch.testing.assert_close(r["loss"], loss, rtol=1e-6, atol=0)
    for name, p in model.named_parameters():
        for r in ranks:
            got = r["grads"][name]
            err = (got - p.grad).abs().max().item() / p.grad.abs().max().item()
            assert err <= 1e-6, (mode, name, err)
