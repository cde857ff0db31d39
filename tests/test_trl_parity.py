"""``CatDPOTrainer`` against TRL's own ``DPOTrainer`` on a tiny random Llama (fp32, CPU).

With ``catdpo_loss_type="dpo"`` the Cat-DPO trainer computes TRL's ``sigmoid``
loss, so at step 0 the loss and every parameter gradient must agree, whether
the loss comes from the fused head (hidden states, no logits) or from logits.
"""

from __future__ import annotations

import copy

import pytest
import torch
from _utils import tiny_llama

from catdpo_kernels import data as D

pytest.importorskip("trl")


def _args(tmp_path, **kw):
    from trl import DPOConfig

    base = dict(
        output_dir=str(tmp_path),
        per_device_train_batch_size=4,
        max_steps=1,
        report_to=[],
        use_cpu=True,
        disable_tqdm=True,
        seed=0,
        bf16=False,
    )
    return DPOConfig(**{**base, **kw})


def _step0(trainer, batch):
    """Loss and parameter gradients of one ``compute_loss`` call on ``batch``."""
    trainer.model.train()
    trainer.model.zero_grad(set_to_none=True)
    loss = trainer.compute_loss(trainer.model, batch)
    loss.backward()
    grads = {n: p.grad.detach().clone() for n, p in trainer.model.named_parameters() if p.grad is not None}
    return loss.detach(), grads


@pytest.fixture(scope="module")
def pairs_and_tok():
    pairs, _ = D.load_pairs(split="train", limit=12)
    return pairs, D.build_word_tokenizer(D.pair_texts(pairs))


@pytest.mark.parametrize("head", ["fused", "logits"])
@pytest.mark.parametrize("tie", [False, True], ids=["untied", "tied"])
def test_step0_loss_and_gradients_match_trl_sigmoid(tmp_path, pairs_and_tok, head, tie):
    from trl import DPOTrainer

    from catdpo_kernels.integrations.trl import CatDPOTrainer

    pairs, tok = pairs_and_tok
    model = tiny_llama(tok, tie_word_embeddings=tie)
    ds = D.pairs_to_dataset(pairs)
    theirs = DPOTrainer(
        model=copy.deepcopy(model),
        ref_model=copy.deepcopy(model),
        args=_args(tmp_path / "trl", loss_type="sigmoid", beta=0.1),
        train_dataset=ds,
        processing_class=tok,
    )
    ours = CatDPOTrainer(
        model=copy.deepcopy(model),
        ref_model=copy.deepcopy(model),
        args=_args(tmp_path / "ours", beta=0.1),
        train_dataset=ds,
        processing_class=tok,
        catdpo_loss_type="dpo",
        head=head,
    )
    assert ours.catdpo_head == head
    # Move the policy away from the reference, the same way in both, so that h != 0.
    with torch.no_grad():
        for t in (theirs, ours):
            gen = torch.Generator().manual_seed(1)
            for p in t.model.parameters():
                p.add_(torch.randn(p.shape, generator=gen) * 0.05)
    batch = ours.data_collator([ours.train_dataset[i] for i in range(4)])
    trl_batch = theirs.data_collator([theirs.train_dataset[i] for i in range(4)])
    assert torch.equal(batch["input_ids"], trl_batch["input_ids"])
    loss_ours, g_ours = _step0(ours, batch)
    loss_trl, g_trl = _step0(theirs, trl_batch)
    assert abs(loss_ours.item() - loss_trl.item()) <= 1e-5, (loss_ours.item(), loss_trl.item())
    assert g_ours.keys() == g_trl.keys()
    for name in g_trl:
        scale = max(g_trl[name].abs().max().item(), 1e-6)
        err = (g_ours[name] - g_trl[name]).abs().max().item()
        assert err <= 1e-5 * max(scale, 1.0), (name, err, scale)
