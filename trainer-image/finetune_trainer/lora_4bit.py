"""A 4-bit base projection and its LoRA adapter as one autograd function.

PEFT computes a QLoRA projection as ``base(x).clone() + lora_B(lora_A(dropout(x))) *
scaling``: besides the matmuls, four passes over the projection's whole output (the clone,
the scaling, the add, and the scaling's backward), each as large as the output itself
(tokens x out features, 33 GB per step of 12,288 tokens on an 8B model).

Here the base weight is dequantised and multiplied as bitsandbytes does, and the adapter's
output is accumulated into that result by the same matrix multiply (``addmm`` with the
scaling as its ``alpha``); the scaling of the gradient is applied on the rank-wide side
(tokens x r). The dropout is the fused one of ``lora_dropout.py``: the same kernel and
generator as PEFT's, no copy of the dropped input kept, the mask drawn again in the backward
pass. The function keeps the input (which the layer's other projections keep too: saved
tensors share storage), the rank-wide ``lora_A`` output and the generator state; the base
weight is dequantised again in the backward pass, as bitsandbytes does.

:func:`patch_model` changes the class of PEFT's bitsandbytes ``Linear4bit`` LoRA layers to a
subclass whose forward runs this function when the layer has one plain LoRA adapter (no
DoRA or other variant, no adapter bias) and falls back to PEFT's forward otherwise (adapters
disabled or merged, mixed-adapter batches). :func:`unpatch_model` restores the classes.
Parameters, their names and the saved adapter do not change.

The fast path uses it from ``fastpath.LORA_4BIT_MIN_TOKENS`` tokens per micro-batch, where an
H100 measured 5-12% more tokens/s (decision 2140; ``bench/run_h100.sh lora4bit``). Decoder
layers compiled with ``torch.compile`` keep PEFT's layers: the compiler cannot trace the
generator state this function reads.
"""

from __future__ import annotations

import functools
import os
from dataclasses import dataclass, field
from types import ModuleType
from typing import Any, cast

import torch
import torch.nn.functional as F
from bitsandbytes.functional import dequantize_4bit
from bitsandbytes.nn.modules import fix_4bit_weight_quant_state_from_module
from torch import Tensor, nn

from .lora_dropout import _dtypes, _project, _project_backward, default_generator, uses_lora_variant


def _dequantize(packed: Tensor, quant_state: Any, dtype: torch.dtype) -> Tensor:
    return dequantize_4bit(packed, quant_state).to(dtype)


@functools.cache
def _kernel_module() -> ModuleType | None:
    """``dropout_kernels`` (Triton), or None where Triton is not installed."""
    try:
        from . import dropout_kernels
    except ImportError:
        return None
    return dropout_kernels


def _triton_runs_on(device: torch.device) -> bool:
    """CUDA, or the CPU under Triton's interpreter (``TRITON_INTERPRET=1``, for tests)."""
    if device.type == "cpu":
        return os.environ.get("TRITON_INTERPRET") == "1"
    return device.type == "cuda"


def dropout_kernels_for(
    x: Tensor, drop_dtype: torch.dtype, lora_dtype: torch.dtype
) -> ModuleType | None:
    """The Triton dropout kernels when they can run this projection's dropout, else None.

    They multiply ``x`` as it is, so ``x``, the dropout and the adapter's matmul must share one
    dtype; on CUDA a 16-bit one (their float32 multiply would round like TF32), on CPU only
    under Triton's interpreter (``TRITON_INTERPRET=1``, for tests) and not in bfloat16, which
    the interpreter computes wrongly.
    """
    if not x.dtype == drop_dtype == lora_dtype or x.shape[-1] % 8 or not _triton_runs_on(x.device):
        return None
    # the interpreter has no bfloat16
    dtypes = (torch.bfloat16, torch.float16) if x.is_cuda else (torch.float32, torch.float16)
    return _kernel_module() if x.dtype in dtypes else None


_CHECKED: dict[str, tuple[bool, str]] = {}


def _kernels_can_run(model: nn.Module) -> tuple[bool, str]:
    """Whether the dropout kernels can run where ``model``'s weights are, and why (not); on
    each device once per process they are checked against their own masks first."""
    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    if not _triton_runs_on(device):
        if device.type == "cpu":
            return False, "no GPU (on the CPU the kernels run only under Triton's interpreter)"
        return False, f"no kernels for {device.type} devices"
    kernels = _kernel_module()
    if kernels is None:
        return False, "Triton is not installed"
    if str(device) not in _CHECKED:
        _CHECKED[str(device)] = kernels.self_check(device)
    return _CHECKED[str(device)]


_SEED_MIX = 0x9E3779B97F4A7C15


def draw_seed(device: torch.device) -> int:
    """A seed for the dropout kernels, taken from the device's default generator.

    On CUDA the generator's offset moves on by one draw, as any dropout kernel moves it, so
    gradient checkpointing (which restores the generator before recomputing a layer) draws the
    same seed again, and so the same mask.
    """
    generator = default_generator(device)
    assert generator is not None, "only CPU and CUDA tensors reach the dropout kernels"
    if device.type == "cuda":
        offset = generator.get_offset()
        generator.set_offset(offset + 4)
        return (generator.initial_seed() * _SEED_MIX + offset) % (1 << 63)
    return int(torch.randint(0, 1 << 62, (1,), generator=generator).item())


class _Lora4bitProjection(torch.autograd.Function):
    """``y = x @ W.T + bias + scaling * dropout(x) @ A.T @ B.T`` with ``W`` in 4 bits."""

    @staticmethod
    def forward(
        ctx: Any,
        x: Tensor,
        lora_a: Tensor,
        lora_b: Tensor,
        packed: Tensor,
        quant_state: Any,
        bias: Tensor | None,
        scaling: float,
        p: float,
        base_dtype: torch.dtype,
        kernel_dropout: bool,
    ) -> Tensor:
        drop_dtype, lora_dtype = _dtypes(x, lora_a)
        kernels = (
            dropout_kernels_for(x, drop_dtype, lora_dtype) if kernel_dropout and p > 0.0 else None
        )
        state: Tensor | int | None
        with torch.autocast(x.device.type, enabled=False):
            weight = _dequantize(packed, quant_state, base_dtype)
            out = F.linear(x.to(base_dtype), weight, None if bias is None else bias.to(base_dtype))
            del weight
            if kernels is not None:
                state = draw_seed(x.device)
                rows = x.reshape(-1, x.shape[-1]).contiguous()
                hidden = kernels.project(rows, lora_a.to(lora_dtype).contiguous(), p, state)
                hidden = hidden.view(*x.shape[:-1], hidden.shape[-1])
            elif p > 0.0:
                hidden, state = _project(x, lora_a, p, drop_dtype, lora_dtype)
            else:
                hidden, state = F.linear(x.to(lora_dtype), lora_a.to(lora_dtype)), None
            flat = out.view(-1, out.shape[-1])
            flat.addmm_(
                hidden.reshape(-1, hidden.shape[-1]).to(base_dtype),
                lora_b.to(base_dtype).t(),
                alpha=scaling,
            )
        ctx.save_for_backward(x, lora_a, lora_b, hidden)
        ctx.packed, ctx.quant_state, ctx.rng_state = packed, quant_state, state
        ctx.scaling, ctx.p, ctx.dtypes, ctx.base_dtype = (
            scaling,
            p,
            (drop_dtype, lora_dtype),
            base_dtype,
        )
        ctx.has_bias = bias is not None
        ctx.kernels = kernels
        return out.to(x.dtype)

    @staticmethod
    def backward(ctx: Any, grad_out: Tensor) -> tuple[Any, ...]:
        x, lora_a, lora_b, hidden = ctx.saved_tensors
        needs_x, needs_a, needs_b = (bool(n) for n in ctx.needs_input_grad[:3])
        needs_bias = bool(ctx.needs_input_grad[5]) and ctx.has_bias
        lora_dtype = ctx.dtypes[1]
        rank = lora_a.shape[0]
        grad_x = grad_a = grad_b = grad_bias = None
        with torch.autocast(x.device.type, enabled=False):
            grad = grad_out.reshape(-1, grad_out.shape[-1])
            grad_lora = grad.to(lora_dtype)
            if needs_b:
                grad_b = (grad_lora.t() @ hidden.reshape(-1, rank).to(lora_dtype)).mul_(ctx.scaling)
                grad_b = grad_b.to(lora_b.dtype)
            grad_hidden = (grad_lora @ lora_b.to(lora_dtype)).mul_(ctx.scaling)
            if needs_x:
                # the base projection's input gradient; the adapter's is added into it
                weight = _dequantize(ctx.packed, ctx.quant_state, ctx.base_dtype)
                grad_x = (grad_out.to(ctx.base_dtype) @ weight).to(x.dtype)
                del weight
            if ctx.kernels is not None:
                if needs_a:
                    rows = x.reshape(-1, x.shape[-1]).contiguous()
                    grad_a = ctx.kernels.grad_weight(grad_hidden, rows, ctx.p, ctx.rng_state)
                    grad_a = grad_a.to(lora_a.dtype)
                if grad_x is not None:
                    flat_x = grad_x.view(-1, grad_x.shape[-1])
                    lora_a_rows = lora_a.to(lora_dtype).contiguous()
                    ctx.kernels.grad_input(
                        grad_hidden, lora_a_rows, ctx.p, ctx.rng_state, out=flat_x
                    )
            elif ctx.p > 0.0:
                grad_x_lora, grad_a = _project_backward(
                    grad_hidden.view(*x.shape[:-1], rank),
                    x,
                    lora_a,
                    ctx.rng_state,
                    ctx.p,
                    ctx.dtypes,
                    (needs_x, needs_a),
                )
                if grad_x is not None:
                    assert grad_x_lora is not None
                    grad_x.add_(grad_x_lora.to(x.dtype))
            else:
                if needs_a:
                    rows = x.reshape(-1, x.shape[-1]).to(lora_dtype)
                    grad_a = (grad_hidden.t() @ rows).to(lora_a.dtype)
                if grad_x is not None:
                    flat_x = grad_x.view(-1, grad_x.shape[-1])
                    if flat_x.dtype == lora_dtype:
                        flat_x.addmm_(grad_hidden, lora_a.to(lora_dtype))
                    else:
                        flat_x.add_((grad_hidden @ lora_a.to(lora_dtype)).to(flat_x.dtype))
            if needs_bias:
                grad_bias = grad.sum(0)
        return grad_x, grad_a, grad_b, None, None, grad_bias, None, None, None, None


# --------------------------------------------------------------------------------------------
# Patching a model
# --------------------------------------------------------------------------------------------


class _FusedForward:
    """Mixed into PEFT's 4-bit LoRA layer class by :func:`patch_model`."""

    _fused_original: type[nn.Module]
    # The adapters patch_model found plain (checked once, not on every call).
    _fused_adapters: frozenset[str]
    # Draw the dropout inside the adapter's matmuls (dropout_kernels.py) where they can run.
    _kernel_dropout: bool = False

    def forward(self, x: Tensor, *args: Any, **kwargs: Any) -> Tensor:
        layer: Any = self
        active = layer.active_adapters
        if (
            args
            or kwargs
            or layer.disable_adapters
            or layer.merged
            or len(active) != 1
            or active[0] not in layer._fused_adapters
        ):
            out: Tensor = layer._fused_original.forward(layer, x, *args, **kwargs)
            return out
        adapter = active[0]
        base = layer.base_layer
        weight = base.weight
        dropout = layer.lora_dropout[adapter]
        p = float(getattr(dropout, "p", 0.0)) if dropout.training else 0.0
        compute = base.compute_dtype if base.compute_dtype is not None else x.dtype
        if torch.is_autocast_enabled(x.device.type):
            compute = torch.get_autocast_dtype(x.device.type)
        # what bitsandbytes' Linear4bit.forward does first: the quant state a checkpoint
        # loader may have left on the module
        fix_4bit_weight_quant_state_from_module(base)
        out = _Lora4bitProjection.apply(  # type: ignore[no-untyped-call]
            x,
            layer.lora_A[adapter].weight,
            layer.lora_B[adapter].weight,
            weight,
            weight.quant_state,
            base.bias,
            float(layer.scaling[adapter]),
            p,
            compute,
            layer._kernel_dropout,
        )
        return out


def _why_not(layer: Any, adapter: str) -> str | None:
    """Why this adapter of a 4-bit LoRA layer keeps PEFT's forward, or None."""
    if uses_lora_variant(layer, adapter):
        return "a LoRA variant (such as DoRA) computes this adapter"
    lora_a, lora_b = layer.lora_A[adapter], layer.lora_B[adapter]
    if getattr(lora_a, "bias", None) is not None or getattr(lora_b, "bias", None) is not None:
        return "the adapter has a bias"
    if not isinstance(getattr(lora_a, "weight", None), Tensor):
        return f"lora_A is {type(lora_a).__name__}, without a weight matrix"
    if getattr(layer.base_layer.weight, "quant_state", None) is None:
        return "the base weight is not quantised yet"
    return None


_SUBCLASSES: dict[type[nn.Module], type[nn.Module]] = {}


def _fused_class(original: type[nn.Module]) -> type[nn.Module]:
    if original not in _SUBCLASSES:
        _SUBCLASSES[original] = type(
            f"Fused{original.__name__}",
            (_FusedForward, original),
            {"_fused_original": original},
        )
    return _SUBCLASSES[original]


@dataclass
class Lora4bitReport:
    """What :func:`patch_model` did: patched layer names, and why others kept PEFT's forward."""

    patched: list[str] = field(default_factory=list)
    kept: dict[str, str] = field(default_factory=dict)
    # whether the patched layers draw their dropout with the Triton kernels, and why (not)
    dropout_kernels: bool = False
    dropout_kernels_note: str = ""

    def as_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "patched": len(self.patched),
            "kept": dict(self.kept),
            "dropout_kernels": self.dropout_kernels,
        }
        if self.dropout_kernels_note:
            out["dropout_kernels_note"] = self.dropout_kernels_note
        return out


def patch_model(model: nn.Module, dropout_kernels: bool = False) -> Lora4bitReport:
    """Run every plain 4-bit LoRA projection of ``model`` (a PEFT model) as one function.

    ``dropout_kernels`` draws the LoRA dropout inside the adapter's matmuls with Triton
    (``dropout_kernels.py``: other masks than PyTorch's, the same distribution) wherever
    those kernels can run; elsewhere the dropout is PyTorch's, redrawn in the backward pass.
    """
    report = Lora4bitReport()
    if dropout_kernels:
        report.dropout_kernels, report.dropout_kernels_note = _kernels_can_run(model)
    try:
        from peft.tuners.lora.bnb import Linear4bit
    except (ImportError, AttributeError):
        report.kept["*"] = "PEFT's bitsandbytes 4-bit LoRA layer is not available"
        return report
    for name, module in model.named_modules():
        if not isinstance(module, Linear4bit) or isinstance(module, _FusedForward):
            continue
        reasons = [r for a in module.lora_A if (r := _why_not(module, a)) is not None]
        if reasons:
            report.kept[name] = reasons[0]
            continue
        module.__class__ = _fused_class(type(module))  # type: ignore[assignment]
        cast(Any, module)._fused_adapters = frozenset(module.lora_A.keys())
        cast(Any, module)._kernel_dropout = report.dropout_kernels
        report.patched.append(name)
    return report


def unpatch_model(model: nn.Module) -> int:
    """Give every patched layer its class back; returns how many."""
    count = 0
    for module in model.modules():
        if isinstance(module, _FusedForward):
            module.__class__ = module._fused_original  # type: ignore[assignment]
            count += 1
    return count
