#!/usr/bin/env python
"""Cat-DPO with TRL: ``CatDPOTrainer`` on the bundled PKU-SafeRLHF-schema sample.

Needs the ``[trl]`` extra (``pip install "catdpo_kernels[trl]"``). Uses a tiny
randomly initialised Llama and a word-level tokenizer, so nothing is
downloaded; pass ``--model`` for a local Hugging Face model directory instead.

    python python/train_catdpo_trl.py --max-steps 20
"""

import argparse
import copy

import torch


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None, help="local HF causal-LM directory (default: tiny random Llama)")
    parser.add_argument("--data", default=None, help="PKU-SafeRLHF-schema data (default: the bundled sample)")
    parser.add_argument("--max-steps", type=int, default=20)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--grad-accum", type=int, default=1)
    parser.add_argument("--loss-type", default="catdpo", choices=("dpo", "ipo", "safedpo", "catdpo"))
    parser.add_argument("--output-dir", default="outputs/catdpo-trl")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM
    from trl import DPOConfig

    from catdpo_kernels import data as D
    from catdpo_kernels.integrations.trl import CatDPOTrainer

    train_pairs, report = D.load_pairs(args.data, split="train")
    eval_pairs, _ = D.load_pairs(args.data, split="test")
    print(report.format("train"))
    torch.manual_seed(args.seed)
    if args.model:
        tok = AutoTokenizer.from_pretrained(args.model)
        model = AutoModelForCausalLM.from_pretrained(args.model)
    else:
        tok = D.build_word_tokenizer([*D.pair_texts(train_pairs), *D.pair_texts(eval_pairs)])
        config = LlamaConfig(
            vocab_size=len(tok),
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=4,
            pad_token_id=tok.pad_token_id,
            bos_token_id=tok.bos_token_id,
            eos_token_id=tok.eos_token_id,
        )
        model = LlamaForCausalLM(config)
    config = DPOConfig(
        output_dir=args.output_dir,
        # TRL turns bf16 on by default, which fails on a machine without a GPU.
        bf16=torch.cuda.is_available(),
        use_cpu=not torch.cuda.is_available(),
        loss_type="ipo" if args.loss_type == "ipo" else "sigmoid",
        per_device_train_batch_size=args.batch_size,
        gradient_accumulation_steps=args.grad_accum,
        max_steps=args.max_steps,
        learning_rate=1e-3,
        logging_steps=5,
        eval_strategy="steps",
        eval_steps=args.max_steps,
        report_to=[],
        seed=args.seed,
    )
    trainer = CatDPOTrainer(
        model=model,
        ref_model=copy.deepcopy(model),
        args=config,
        processing_class=tok,
        train_dataset=D.pairs_to_dataset(train_pairs),
        eval_dataset=D.pairs_to_dataset(eval_pairs),
        catdpo_loss_type=args.loss_type,
        safedpo_margin=0.5,
    )
    trainer.train()
    print("final margins:")
    for name, value in zip(trainer.margins.names, trainer.margins.value.tolist()):
        print(f"  {name:<32}{value:8.3f}")


if __name__ == "__main__":
    main()
