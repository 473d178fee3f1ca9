"""LoRA dropout inside the adapter's matmuls (Triton, ``finetune_trainer/dropout_kernels.py``)
against PyTorch's dropout redrawn in the backward pass and against no dropout, on one GPU.

It first checks the kernels against the mask they draw (``dropout_kernels.self_check``) and
a real 4-bit LoRA layer patched with them against the same layer written out, with and
without gradient checkpointing (``layer_check``). Then, for each projection input of the
Llama-3-8B shape (12,288 packed tokens; 4,096 and 14,336 features, rank 64, bf16), it times
what the adapter's ``lora_A`` side costs per projection, forward and backward:

- ``torch``: ``native_dropout`` + ``linear`` forward; the dropout drawn again, the input
  gradient through ``native_dropout_backward`` and added into the base gradient, the weight
  gradient from the dropped input (what ``lora_4bit.py`` runs without the kernels);
- ``kernels``: the three Triton kernels, the input gradient added in place;
- ``none``: dropout 0 (``linear``; ``addmm_`` into the base gradient; weight gradient).

    PYTHONPATH=operator:trainer-image python bench/bench_dropout_kernels.py --out FILE.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from typing import Any


def _time(fn: Any, repeats: int) -> float:
    """Median milliseconds of ``fn`` over ``repeats`` CUDA-event timed calls (wall clock
    without a GPU, where only the tests run it)."""
    import torch

    fn()
    if not torch.cuda.is_available():
        walls = []
        for _ in range(repeats):
            started = time.perf_counter()
            fn()
            walls.append((time.perf_counter() - started) * 1000)
        return statistics.median(walls)
    torch.cuda.synchronize()
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def layer_check(
    rows: int = 4096, width: int = 4096, rank: int = 64, p: float = 0.05, device: str = "cuda"
) -> dict[str, Any]:
    """A real 4-bit LoRA layer (bitsandbytes nf4, PEFT, bf16) patched by ``lora_4bit`` with the
    kernels, against the same projection written out with the mask the kernels report for the
    seed the layer draws; and the layer under gradient checkpointing (which restores the
    generator before recomputing) against itself without: the same masks, the same gradients.
    On the CPU (tests, under Triton's interpreter) in float32, which the interpreter computes.
    """
    import bitsandbytes as bnb
    import torch
    from bitsandbytes.functional import dequantize_4bit
    from finetune_trainer import dropout_kernels as k
    from finetune_trainer import lora_4bit
    from peft import LoraConfig, get_peft_model
    from torch.utils.checkpoint import checkpoint

    dtype = torch.bfloat16 if device == "cuda" else torch.float32

    def reseed() -> None:
        if device == "cuda":
            torch.cuda.manual_seed(11)
        else:
            torch.manual_seed(11)

    class Net(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.proj = bnb.nn.Linear4bit(
                width, width, bias=False, compute_dtype=dtype, quant_type="nf4"
            )
            self.is_loaded_in_4bit = True  # what PEFT reads to pick its 4-bit LoRA layer

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            out: torch.Tensor = self.proj(x)
            return out

    torch.manual_seed(0)
    net = Net()
    net.proj.weight = bnb.nn.Params4bit(
        torch.randn(width, width) * 0.02, requires_grad=False, quant_type="nf4"
    )
    net = net.to(device)  # quantises the weight
    config = LoraConfig(r=rank, lora_alpha=16, lora_dropout=p, target_modules=["proj"])
    model = get_peft_model(net, config).train()
    layer = model.base_model.model.proj
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_" in name:
                param.data = param.data.to(dtype)
                if "lora_B" in name:
                    param.normal_(0.0, 0.02)
    report = lora_4bit.patch_model(model, dropout_kernels=True)
    a, b = layer.lora_A["default"].weight, layer.lora_B["default"].weight
    scaling = float(layer.scaling["default"])
    x0 = torch.randn(1, rows, width, device=device, dtype=dtype)
    upstream = torch.randn(1, rows, width, device=device, dtype=dtype)

    def run(checkpointed: bool) -> tuple[torch.Tensor, ...]:
        reseed()
        x = x0.clone().requires_grad_(True)
        out = checkpoint(model, x, use_reentrant=False) if checkpointed else model(x)
        (out.float() * upstream.float()).sum().backward()
        grads = (out.detach(), x.grad.detach(), a.grad.detach().clone(), b.grad.detach().clone())
        a.grad = b.grad = None
        return grads

    plain, checkpointed = run(False), run(True)
    reseed()
    seed = lora_4bit.draw_seed(x0.device)
    weight = dequantize_4bit(layer.base_layer.weight.data, layer.base_layer.weight.quant_state)
    xr = x0.float().clone().requires_grad_(True)
    ar = a.detach().float().clone().requires_grad_(True)
    br = b.detach().float().clone().requires_grad_(True)
    dropped = k.reference_dropout(xr, p, seed)
    ref = xr @ weight.float().t() + scaling * (dropped @ ar.t()) @ br.t()
    (ref * upstream.float()).sum().backward()
    reference = (ref.detach(), xr.grad, ar.grad, br.grad)

    def rel(got: torch.Tensor, want: torch.Tensor) -> float:
        return float((got.float() - want.float()).abs().max() / want.float().abs().max())

    names = ("output", "gradInput", "gradLoraA", "gradLoraB")
    return {
        "patched": len(report.patched),
        "dropoutKernels": report.dropout_kernels,
        "againstWrittenOut": {
            n: rel(g, r) for n, g, r in zip(names, plain, reference, strict=True)
        },
        "checkpointedAgainstPlain": {
            n: rel(g, r) for n, g, r in zip(names, checkpointed, plain, strict=True)
        },
    }


def _operands(rows: int, width: int, rank: int, device: str) -> tuple[Any, ...]:
    """x, lora_A, the rank-wide gradient and a base input gradient (bf16 on a GPU)."""
    import torch

    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    return (
        torch.randn(rows, width, device=device, dtype=dtype),
        torch.randn(rank, width, device=device, dtype=dtype) / width**0.5,
        torch.randn(rows, rank, device=device, dtype=dtype),
        torch.randn(rows, width, device=device, dtype=dtype),
    )


def timings(
    rows: int, width: int, rank: int, p: float, repeats: int, device: str = "cuda"
) -> dict[str, float]:
    import torch
    import torch.nn.functional as F
    from finetune_trainer import dropout_kernels as k

    x, a, g, base = _operands(rows, width, rank, device)
    seed = 99

    def torch_forward() -> None:
        dropped, _mask = torch.native_dropout(x, p, True)
        F.linear(dropped, a)

    def torch_backward() -> None:
        dropped, mask = torch.native_dropout(x, p, True)
        grad_in = g @ a
        base.add_(torch.ops.aten.native_dropout_backward(grad_in, mask, 1.0 / (1.0 - p)))
        _ = g.t() @ dropped

    def kernels_backward() -> None:
        k.grad_input(g, a, p, seed, out=base)
        k.grad_weight(g, x, p, seed)

    def none_forward() -> None:
        F.linear(x, a)

    def none_backward() -> None:
        base.addmm_(g, a)
        _ = g.t() @ x

    out = {}
    for name, fn in (
        ("torchForwardMs", torch_forward),
        ("torchBackwardMs", torch_backward),
        ("kernelsProjectMs", lambda: k.project(x, a, p, seed)),
        ("kernelsBackwardMs", kernels_backward),
        ("noneForwardMs", none_forward),
        ("noneBackwardMs", none_backward),
        ("kernelsGradWeightMs", lambda: k.grad_weight(g, x, p, seed)),
        ("kernelsGradInputMs", lambda: k.grad_input(g, a, p, seed, out=base)),
    ):
        out[name] = round(_time(fn, repeats), 4)
    out["kernelsForwardMs"] = out["kernelsProjectMs"]  # the forward is the one kernel
    for impl in ("torch", "kernels", "none"):
        out[f"{impl}TotalMs"] = round(out[f"{impl}ForwardMs"] + out[f"{impl}BackwardMs"], 4)
    return out


# Tile sizes tried by --sweep: (BLOCK_T, BLOCK_K, num_warps, num_stages).
SWEEP = {
    "project": [(64, 64, 4, 3), (32, 64, 4, 3), (32, 128, 4, 3), (128, 64, 4, 3)],
    "gradWeight": [(64, 64, 4, 3), (32, 64, 4, 3), (128, 64, 4, 3)],
    "gradInput": [(64, 128, 4, 2), (128, 128, 8, 2), (64, 64, 4, 2)],
}


def sweep(
    rows: int, width: int, rank: int, p: float, repeats: int, device: str = "cuda"
) -> dict[str, dict[str, float]]:
    """Milliseconds of each kernel with each tile of SWEEP."""
    from finetune_trainer import dropout_kernels as k

    x, a, g, base = _operands(rows, width, rank, device)
    calls = {
        "project": lambda tile: k.project(x, a, p, 5, tile=tile),
        "gradWeight": lambda tile: k.grad_weight(g, x, p, 5, tile=tile),
        "gradInput": lambda tile: k.grad_input(g, a, p, 5, out=base, tile=tile),
    }
    out: dict[str, dict[str, float]] = {}
    for kernel, tiles in SWEEP.items():
        out[kernel] = {}
        for bt, bk, warps, stages in tiles:
            tile = {"BLOCK_T": bt, "BLOCK_K": bk, "num_warps": warps, "num_stages": stages}
            name = f"{bt}x{bk}w{warps}s{stages}"
            try:
                out[kernel][name] = round(_time(lambda t=tile, c=calls[kernel]: c(t), repeats), 4)
            except Exception as error:  # a tile that does not compile or fit is reported
                out[kernel][name] = float("nan")
                print(f"{kernel} {name}: {type(error).__name__}: {error}"[:300], flush=True)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=12288, help="packed tokens per micro-batch")
    parser.add_argument("--widths", default="4096,14336", help="projection input widths")
    parser.add_argument("--rank", type=int, default=64)
    parser.add_argument("--dropout", type=float, default=0.05)
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--sweep", action="store_true", help="also time other tile sizes")
    parser.add_argument("--out", help="write the results here as JSON")
    args = parser.parse_args(argv)

    import torch

    if not torch.cuda.is_available():
        raise SystemExit("this benchmark needs a CUDA GPU")
    import triton
    from finetune_trainer import dropout_kernels as k

    result: dict[str, Any] = {
        "date": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()),
        "gpu": torch.cuda.get_device_name(),
        "torch": torch.__version__,
        "triton": triton.__version__,
        "rows": args.rows,
        "rank": args.rank,
        "dropout": args.dropout,
        "widths": {},
    }
    ok, note = k.self_check("cuda")
    result["selfCheck"] = {"ok": ok, "note": note}
    print(json.dumps(result["selfCheck"]), flush=True)
    try:
        result["layerCheck"] = layer_check(p=args.dropout)
    except Exception as error:  # reported; the kernels' own checks and timings still run
        result["layerCheck"] = {"error": f"{type(error).__name__}: {error}"}
    print(json.dumps({"layerCheck": result["layerCheck"]}), flush=True)
    for width in (int(w) for w in args.widths.split(",")):
        started = time.perf_counter()
        entry: dict[str, Any] = timings(args.rows, width, args.rank, args.dropout, args.repeats)
        if args.sweep:
            entry["sweep"] = sweep(args.rows, width, args.rank, args.dropout, args.repeats)
        entry["seconds"] = round(time.perf_counter() - started, 1)
        result["widths"][str(width)] = entry
        print(json.dumps({"width": width, **entry}), flush=True)
    # Per decoder layer of the 8B shape: six projections read 4,096 features, one 14,336.
    if {"4096", "14336"} <= set(result["widths"]):
        w = result["widths"]
        result["perLayerMs"] = {
            impl: round(6 * w["4096"][f"{impl}TotalMs"] + w["14336"][f"{impl}TotalMs"], 3)
            for impl in ("torch", "kernels", "none")
        }
        print(json.dumps({"perLayerMs": result["perLayerMs"]}), flush=True)
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
