"""Host time per 4-bit LoRA projection (forward + backward): PEFT's layer against the fused
function of ``finetune_trainer/lora_4bit.py``.

Tiny matrices (4 tokens, 64 features) on one CPU thread, so the arithmetic is negligible and
what is timed is the Python and dispatch work around it, which bounds a GPU step when the
micro-batch is small. bitsandbytes' CPU dequantisation (about 50 µs a call here) is in both
figures; on a GPU it is a kernel launch instead.

    PYTHONPATH=operator:trainer-image python bench/bench_lora4bit_host.py
"""

from __future__ import annotations

import argparse
import statistics
import time
from typing import Any


def build(layers: int, width: int, fused: bool, dropout: float) -> Any:
    import bitsandbytes as bnb
    import torch
    from finetune_trainer import lora_4bit, lora_dropout
    from peft import LoraConfig, get_peft_model

    class Chain(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            chain = []
            for _ in range(layers):
                layer = bnb.nn.Linear4bit(width, width, bias=False, compute_dtype=torch.float32)
                layer.weight = bnb.nn.Params4bit(torch.randn(width, width), requires_grad=False)
                chain.append(layer.to("cpu"))  # quantises the weight
            self.chain = torch.nn.ModuleList(chain)
            self.is_loaded_in_4bit = True  # what PEFT reads to pick its 4-bit LoRA layer

        def forward(self, x: Any) -> Any:
            for layer in self.chain:
                x = layer(x)
            return x

    torch.manual_seed(0)
    targets = [f"chain.{i}" for i in range(layers)]
    model = get_peft_model(
        Chain(), LoraConfig(r=8, lora_alpha=16, lora_dropout=dropout, target_modules=targets)
    )
    lora_dropout.patch_model(model)  # the fast path's dropout in both
    if fused:
        lora_4bit.patch_model(model)
    return model.train()


def microseconds_per_projection(model: Any, layers: int, width: int, repeats: int) -> float:
    import torch

    x = torch.randn(4, width, requires_grad=True)
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        model(x).sum().backward()
        times.append(time.perf_counter() - started)
    return statistics.median(times[5:]) / layers * 1e6


def main() -> None:
    import torch

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--layers", type=int, default=32)
    parser.add_argument("--width", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=40)
    args = parser.parse_args()
    torch.set_num_threads(1)
    print("dropout | PEFT µs | fused µs (per projection, forward + backward, median)")
    for dropout in (0.0, 0.05):
        figures = []
        for fused in (False, True, False, True):  # interleaved: drift hits both alike
            model = build(args.layers, args.width, fused, dropout)
            figures.append(
                microseconds_per_projection(model, args.layers, args.width, args.repeats)
            )
        peft = f"{figures[0]:.0f} / {figures[2]:.0f}"
        fused_text = f"{figures[1]:.0f} / {figures[3]:.0f}"
        print(f"{dropout} | {peft} | {fused_text}")


if __name__ == "__main__":
    main()
