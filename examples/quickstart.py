"""An MoE layer end to end: forward, aux losses, backward, on the best backend here."""

import time

import torch

from moe_dispatch import MoE, select_backend

torch.manual_seed(0)
layer = MoE(hidden_size=512, intermediate_size=256, num_experts=16, top_k=4)
x = torch.randn(4, 64, 512, requires_grad=True)

start = time.perf_counter()
out, aux = layer(x, return_aux=True)
(out.square().mean() + 1e-2 * aux.load_balancing_loss).backward()
elapsed = time.perf_counter() - start

print(f"backend:        {select_backend(x.device, layer.backend)}")
print(f"input / output: {tuple(x.shape)} -> {tuple(out.shape)}")
print(f"tokens/expert:  {aux.counts.tolist()}")
print(f"balance loss:   {aux.load_balancing_loss.item():.3f} (1.0 = perfectly balanced)")
print(f"router z-loss:  {aux.z_loss.item():.3f}")
print(f"forward+backward, first call (includes any JIT): {elapsed * 1e3:.1f} ms")
