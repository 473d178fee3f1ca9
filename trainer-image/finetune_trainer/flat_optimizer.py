"""LoRA adapters as one flat tensor for bitsandbytes' optimisers.

bitsandbytes' optimisers update one parameter at a time and call ``torch.cuda.synchronize()``
after each (bitsandbytes 0.50, ``Optimizer8bit.step``): on an 8B model with r=64 adapters on
every projection that is 448 kernel launches and 448 waits for an empty GPU per step, after
which the next forward pass starts from an idle GPU. Here the adapter weights of each
parameter group live in one flat parameter (each weight's ``.data`` becomes a view of it), so
the optimiser sees one tensor: one update kernel and one wait. Before each step the gradients
are gathered into the flat parameter's gradient (one copy, freed after the step); clipping,
logging and saving keep seeing the adapter weights and their gradients as before.

The update is the same arithmetic: 32-bit states are updated element by element; 8-bit
blockwise states are quantised in blocks of 256 elements, so as long as every flattened weight
holds a whole number of blocks no block spans two weights, and a weight smaller than
``min_8bit_size`` (which bitsandbytes keeps in 32-bit states) is left alone. Only LoRA's
``lora_A``/``lora_B`` weights are flattened; the optimiser must not have taken a step yet (its
state is created at the first step).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

log = logging.getLogger(__name__)

# bitsandbytes' block size for 8-bit blockwise optimiser states (Optimizer2State.init_state).
STATE_BLOCK = 256


@dataclass
class FlatReport:
    """What :func:`flatten_adapters` did."""

    flattened: int = 0  # adapter weights now views of a flat parameter
    flat_parameters: int = 0
    skipped: str | None = None  # why the whole optimiser was left alone
    kept: dict[str, int] = field(default_factory=dict)  # adapter weights left apart, by reason

    def as_dict(self) -> dict[str, Any]:
        return {
            "flattened": self.flattened,
            "flatParameters": self.flat_parameters,
            "skipped": self.skipped,
            "kept": dict(self.kept),
        }


def _why_not_optimizer(optimizer: Any) -> str | None:
    try:
        from bitsandbytes.optim.optimizer import Optimizer8bit
    except ImportError:
        return "bitsandbytes is not installed"
    if not isinstance(optimizer, Optimizer8bit):
        return f"{type(optimizer).__name__} is not a bitsandbytes optimiser"
    args = getattr(optimizer, "args", None)
    if getattr(args, "optim_bits", None) not in (8, 32):
        return f"optim_bits {getattr(args, 'optim_bits', None)!r} is not 8 or 32"
    if getattr(args, "max_unorm", 0.0) or getattr(args, "skip_zeros", False):
        return "max_unorm or skip_zeros work per tensor"
    if optimizer.state:
        return "the optimiser has taken a step already"
    return None


def _adapter_names(model: nn.Module) -> dict[int, str]:
    """LoRA adapter weights by parameter id, with their names."""
    return {
        id(param): name
        for name, param in model.named_parameters()
        if (".lora_A." in name or ".lora_B." in name) and name.endswith(".weight")
    }


def flatten_adapters(optimizer: Any, model: nn.Module) -> FlatReport:
    """Put the adapter weights of every parameter group of ``optimizer`` into one flat
    parameter per group (and dtype/device), in place; see the module's docstring."""
    report = FlatReport()
    why = _why_not_optimizer(optimizer)
    if why is not None:
        report.skipped = why
        return report
    names = _adapter_names(model)
    # 32-bit states are updated element by element: any weight may join. 8-bit ones are
    # quantised in blocks, and bitsandbytes keeps small weights in 32 bits.
    eight_bit = optimizer.args.optim_bits == 8
    min_size = int(getattr(optimizer.args, "min_8bit_size", 4096)) if eight_bit else 0
    block = STATE_BLOCK if eight_bit else 1
    overridden = {id(getattr(m, a)) for m, a, _ in optimizer.mng.module_weight_config_triple}
    for group in optimizer.param_groups:
        chosen: dict[tuple[torch.dtype, torch.device], list[Tensor]] = {}
        rest: list[Tensor] = []
        for param in group["params"]:
            name = names.get(id(param))
            reason = None
            if name is None:
                reason = "not a LoRA adapter weight"
            elif id(param) in overridden:
                reason = "has its own optimiser settings"
            elif param.numel() < min_size:
                reason = f"under {min_size} elements (bitsandbytes keeps 32-bit states)"
            elif param.numel() % block:
                reason = f"not a whole number of {block}-element state blocks"
            elif type(param) is not nn.Parameter or not param.is_contiguous():
                reason = "not a plain contiguous parameter"
            if reason is not None:
                if name is not None:
                    report.kept[reason] = report.kept.get(reason, 0) + 1
                rest.append(param)
                continue
            chosen.setdefault((param.dtype, param.device), []).append(param)
        flats: list[Tensor] = []
        for params in chosen.values():
            if len(params) < 2:
                rest.extend(params)
                continue
            flats.append(_flat_parameter(params))
            report.flattened += len(params)
        group["params"] = flats + rest
        report.flat_parameters += len(flats)
    if report.flat_parameters:
        optimizer.register_step_pre_hook(_gather_gradients)
        optimizer.register_step_post_hook(_drop_gathered_gradients)
    return report


def _flat_parameter(params: list[Tensor]) -> nn.Parameter:
    with torch.no_grad():
        flat = nn.Parameter(torch.cat([p.detach().reshape(-1) for p in params]))
    offset = 0
    for param in params:
        n = param.numel()
        param.data = flat.data[offset : offset + n].view(param.shape)
        offset += n
    flat._flattened_adapters = params  # type: ignore[attr-defined]
    return flat


def _gather_gradients(optimizer: Any, *_: Any) -> None:
    for group in optimizer.param_groups:
        for flat in group["params"]:
            params = getattr(flat, "_flattened_adapters", None)
            if params is None:
                continue
            if all(p.grad is None for p in params):
                flat.grad = None  # nothing trained this step: no update, as per tensor
                continue
            # A weight without a gradient beside others with one gets zeros, where the
            # per-weight optimiser would skip it; a trained adapter's weights all have one.
            flat.grad = torch.cat(
                [
                    (p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1)
                    for p in params
                ]
            )


def _drop_gathered_gradients(optimizer: Any, *_: Any) -> None:
    for group in optimizer.param_groups:
        for flat in group["params"]:
            if getattr(flat, "_flattened_adapters", None) is not None:
                flat.grad = None
