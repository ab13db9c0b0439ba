"""Train a tiny Qwen3-MoE (transformers, built from a config) on a synthetic task on CPU,
with its experts on moe-dispatch, then compare training throughput with transformers'
own "eager" and "grouped_mm" experts implementations.

The task: each sequence counts up from a random start by a random step, modulo the
vocabulary (5, 12, 19, 26, ...). After two tokens the rest is determined, so the loss on
the later positions falls toward zero once the model has learned to read the step.

    python examples/finetune_tiny_moe.py                 # the fastest backend for the CPU
    python examples/finetune_tiny_moe.py --backend torch --steps 100
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time

import torch
from transformers import AutoModelForCausalLM, Qwen3MoeConfig

from moe_dispatch import select_backend
from moe_dispatch.integrations.transformers import register

VOCAB = 64
MAX_STEP = 4


def tiny_qwen3_moe(hidden=64, inter=64, experts=16, top_k=2) -> Qwen3MoeConfig:
    return Qwen3MoeConfig(
        vocab_size=VOCAB, hidden_size=hidden, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        head_dim=16, intermediate_size=128, moe_intermediate_size=inter, num_experts=experts, num_experts_per_tok=top_k,
        norm_topk_prob=True, max_position_embeddings=64, bos_token_id=0, eos_token_id=0, pad_token_id=0,
        output_router_logits=True, router_aux_loss_coef=0.01,
    )


def batch(gen: torch.Generator, batch_size: int, seq_len: int) -> torch.Tensor:
    """[B, S] arithmetic progressions modulo VOCAB."""
    start = torch.randint(0, VOCAB, (batch_size, 1), generator=gen)
    step = torch.randint(1, MAX_STEP + 1, (batch_size, 1), generator=gen)
    return (start + step * torch.arange(seq_len)) % VOCAB


def train_step(model, optimizer, input_ids: torch.Tensor) -> float:
    loss = model(input_ids, labels=input_ids).loss  # cross-entropy + the router's balancing loss
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    return loss.item()


def tokens_per_second(model, implementations: list[str], args) -> dict[str, float]:
    """Training throughput of a copy of `model` on each implementation: the median step after
    warm-up. The implementations take turns step by step, so a machine whose load changes
    (a shared one) slows them alike."""
    runs = {}
    for name in implementations:
        copied = copy.deepcopy(model)
        copied.set_experts_implementation(name)
        runs[name] = (copied, torch.optim.AdamW(copied.parameters(), lr=args.lr), [])
    gen = torch.Generator().manual_seed(1)
    for round_ in range(3 + args.timed_steps):
        input_ids = batch(gen, args.batch_size, args.seq_len)
        for copied, optimizer, seconds in runs.values():
            start = time.perf_counter()
            train_step(copied, optimizer, input_ids)
            if round_ >= 3:  # the first steps include JIT compilation and allocation
                seconds.append(time.perf_counter() - start)
    tokens = args.batch_size * args.seq_len
    return {name: tokens / statistics.median(seconds) for name, (_, _, seconds) in runs.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--backend", default="auto", help="auto | torch | numba | triton (default: auto)")
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--timed-steps", type=int, default=20, help="steps timed per implementation")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--seq-len", type=int, default=32)
    parser.add_argument("--lr", type=float, default=3e-3)
    args = parser.parse_args()

    torch.manual_seed(0)
    implementation = register("moe_dispatch", backend=args.backend)
    model = AutoModelForCausalLM.from_config(tiny_qwen3_moe(), experts_implementation=implementation)
    params = sum(p.numel() for p in model.parameters())
    print(
        f"Qwen3-MoE, {params / 1e6:.2f}M parameters, 16 experts, top-2; experts on moe-dispatch, backend "
        f"{select_backend('cpu', args.backend)}; {torch.get_num_threads()} CPU threads"
    )
    initial = copy.deepcopy(model)

    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr)
    gen = torch.Generator().manual_seed(0)
    start = time.perf_counter()
    for step in range(1, args.steps + 1):
        loss = train_step(model, optimizer, batch(gen, args.batch_size, args.seq_len))
        if step == 1 or step % 25 == 0:
            print(f"step {step:4d}  loss {loss:.3f}")
    print(f"trained {args.steps} steps in {time.perf_counter() - start:.1f} s")

    with torch.no_grad():
        model.eval()
        sample = batch(torch.Generator().manual_seed(123), 1, 12)
        predicted = model(sample).logits.argmax(-1)
        print(f"sequence : {sample[0].tolist()}")
        print(f"predicted: {[None, *predicted[0, :-1].tolist()]}")

    print(f"\ntraining throughput, {args.batch_size}x{args.seq_len} tokens a step, "
          f"median of {args.timed_steps} steps, taking turns:")
    rates = tokens_per_second(initial, ["eager", "grouped_mm", implementation], args)
    for name, rate in rates.items():
        print(f"  {name:12s} {rate:9.0f} tokens/s  ({rate / rates['eager']:.2f}x eager)")


if __name__ == "__main__":
    main()
