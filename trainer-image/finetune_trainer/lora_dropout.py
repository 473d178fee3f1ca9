"""LoRA dropout that keeps no copy of the adapted inputs for the backward pass.

PEFT computes every adapter as ``lora_B(lora_A(dropout(x))) * scaling``. The dropout output
is a new tensor the size of ``x``: ``lora_A`` keeps it for its weight gradient and the
dropout keeps its mask, for each of the seven adapted projections of a decoder layer, even
though q/k/v (and gate/up) read the very same ``x``. On an 8B model that is 16 GiB at 8,192
packed tokens.

Here ``lora_A`` and the dropout run as one autograd function that keeps ``x`` itself (which
the other projections keep too: saved tensors share storage) and the state of the device's
random generator before the mask was drawn. The backward pass sets the generator back to
that state, runs the same dropout kernel again, which draws the same mask, and puts the
generator back. The kernel and the generator are the ones PEFT's ``nn.Dropout`` uses, so from
the same state the masks are PEFT's, and each projection keeps its own independent mask.
Gradient checkpointing restores the generator before recomputing a layer, so a recomputed
forward draws the same masks too. The cost: one more dropout kernel per adapted projection in
the backward pass. In a decoder layer compiled with ``torch.compile`` the same computation
runs as two PyTorch operators (forward and backward), which the compiler calls as they are.

:func:`patch_model` swaps the LoRA layers of a PEFT model in place (PEFT's dense ``Linear``
and bitsandbytes' ``Linear4bit``; anything else, DoRA and other variants included, keeps
PEFT's dropout) and :func:`unpatch_model` undoes it. Parameters, their names and the saved
adapter are unchanged.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

log = logging.getLogger(__name__)


# --------------------------------------------------------------------------------------------
# The autograd function
# --------------------------------------------------------------------------------------------


def default_generator(device: torch.device) -> torch.Generator | None:
    """The generator dropout draws from on ``device`` (CPU and CUDA; None elsewhere)."""
    if device.type == "cpu":
        return torch.default_generator
    if device.type == "cuda":
        index: int | None = getattr(device, "index", None)
        if index is None:
            index = torch.cuda.current_device()
        return torch.cuda.default_generators[index]
    return None


@contextlib.contextmanager
def _generator_at(generator: torch.Generator, state: Tensor) -> Iterator[None]:
    """Run the block with ``generator`` at ``state``, then put it back where it was."""
    current = generator.get_state()
    generator.set_state(state)
    try:
        yield
    finally:
        generator.set_state(current)


def dropout_input(x: Tensor, dtype: torch.dtype) -> Tensor:
    """``x`` in ``dtype``, contiguous and 16-byte aligned.

    CUDA's dropout kernel picks its vector width from the input's layout and alignment, and
    the width decides which random number lands on which element: both passes must hand it
    the same layout, whatever a saved-tensor hook did to ``x`` in between.
    """
    x = x.to(dtype)
    if x.is_contiguous() and x.data_ptr() % 16 == 0:
        return x
    return x.clone(memory_format=torch.contiguous_format)


def _dtypes(x: Tensor, weight: Tensor) -> tuple[torch.dtype, torch.dtype]:
    """(dropout dtype, matmul dtype) as in PEFT: under autocast the dropout runs on ``x`` as
    it is and the matmul in autocast's dtype; otherwise both in the adapter's dtype."""
    device_type = x.device.type
    if torch.is_autocast_enabled(device_type):
        return x.dtype, torch.get_autocast_dtype(device_type)
    return weight.dtype, weight.dtype


def _project(
    x: Tensor, weight: Tensor, p: float, drop_dtype: torch.dtype, dtype: torch.dtype
) -> tuple[Tensor, Tensor]:
    """``dropout(x) @ A.T`` and the generator state the mask was drawn from."""
    generator = default_generator(x.device)
    assert generator is not None, "only CPU and CUDA tensors reach the fused dropout"
    state = generator.get_state()
    with torch.autocast(x.device.type, enabled=False):
        dropped, _mask = torch.native_dropout(dropout_input(x, drop_dtype), p, True)
        del _mask  # the point: neither the mask nor the dropped input outlives the call
        out = F.linear(dropped.to(dtype), weight.to(dtype))
    return out, state


def _project_backward(
    grad_out: Tensor,
    x: Tensor,
    weight: Tensor,
    state: Tensor,
    p: float,
    dtypes: tuple[torch.dtype, torch.dtype],
    needs: tuple[bool, bool],
) -> tuple[Tensor | None, Tensor | None]:
    """Input and weight gradients of :func:`_project`, with the mask drawn again from
    ``state``."""
    drop_dtype, dtype = dtypes
    generator = default_generator(x.device)
    assert generator is not None
    rank, width = weight.shape
    grad_x = grad_w = None
    with torch.autocast(x.device.type, enabled=False):
        with _generator_at(generator, state):
            dropped, mask = torch.native_dropout(dropout_input(x, drop_dtype), p, True)
        grad = grad_out.to(dtype)
        if needs[0]:
            grad_in = (grad @ weight.to(dtype)).to(drop_dtype)
            grad_x = torch.ops.aten.native_dropout_backward(grad_in, mask, 1.0 / (1.0 - p))
            grad_x = grad_x.to(x.dtype)
        if needs[1]:
            flat = grad.reshape(-1, rank).t() @ dropped.to(dtype).reshape(-1, width)
            grad_w = flat.to(weight.dtype)
    return grad_x, grad_w


class _DroppedProjection(torch.autograd.Function):
    """``h = dropout(x) @ A.T`` keeping ``x`` and the generator state instead of ``dropout(x)``.

    The dropout is PyTorch's own kernel (``native_dropout``, what ``F.dropout`` runs), drawn
    from the device's default generator as PEFT's would be; the backward pass sets that
    generator back to the state the forward pass found and runs the same kernel again, which
    draws the same mask, then restores the generator.
    """

    @staticmethod
    def forward(
        ctx: Any, x: Tensor, weight: Tensor, p: float, dtypes: tuple[torch.dtype, torch.dtype]
    ) -> Tensor:
        out, ctx.rng_state = _project(x, weight, p, *dtypes)
        ctx.save_for_backward(x, weight)
        ctx.p, ctx.dtypes = p, dtypes
        return out

    @staticmethod
    def backward(ctx: Any, grad_out: Tensor) -> tuple[Tensor | None, Tensor | None, None, None]:
        x, weight = ctx.saved_tensors
        needs = (bool(ctx.needs_input_grad[0]), bool(ctx.needs_input_grad[1]))
        grads = _project_backward(grad_out, x, weight, ctx.rng_state, ctx.p, ctx.dtypes, needs)
        return grads[0], grads[1], None, None


# The same computation as PyTorch operators, for decoder layers compiled with torch.compile
# (compile_layers.py): the compiler cannot trace reading the generator's state, but it calls
# an operator as it is, so the layer stays one graph. Tagged as random, the forward operator
# is never recomputed by the compiler (a recompute would draw another mask); the backward
# operator draws the mask again from the state the forward one returned, as above.


@torch.library.custom_op(
    "finetune::dropped_projection", mutates_args=(), tags=(torch.Tag.nondeterministic_seeded,)
)
def _project_op(
    x: Tensor, weight: Tensor, p: float, drop_dtype: torch.dtype, dtype: torch.dtype
) -> tuple[Tensor, Tensor]:
    return _project(x, weight, p, drop_dtype, dtype)


def _state_size(device: torch.device) -> int:
    from torch._subclasses.fake_tensor import unset_fake_temporarily

    generator = default_generator(device)
    assert generator is not None
    with unset_fake_temporarily():
        return int(generator.get_state().numel())


@_project_op.register_fake
def _(
    x: Tensor, weight: Tensor, p: float, drop_dtype: torch.dtype, dtype: torch.dtype
) -> tuple[Tensor, Tensor]:
    out = x.new_empty((*x.shape[:-1], weight.shape[0]), dtype=dtype)
    state = torch.empty(_state_size(x.device), dtype=torch.uint8, device="cpu")
    return out, state


@torch.library.custom_op("finetune::dropped_projection_backward", mutates_args=())
def _project_backward_op(
    grad_out: Tensor,
    x: Tensor,
    weight: Tensor,
    state: Tensor,
    p: float,
    drop_dtype: torch.dtype,
    dtype: torch.dtype,
) -> tuple[Tensor, Tensor]:
    grad_x, grad_w = _project_backward(
        grad_out, x, weight, state, p, (drop_dtype, dtype), (True, True)
    )
    assert grad_x is not None and grad_w is not None
    return grad_x, grad_w


@_project_backward_op.register_fake
def _(
    grad_out: Tensor,
    x: Tensor,
    weight: Tensor,
    state: Tensor,
    p: float,
    drop_dtype: torch.dtype,
    dtype: torch.dtype,
) -> tuple[Tensor, Tensor]:
    return torch.empty_like(x), torch.empty_like(weight)


def _setup_context(ctx: Any, inputs: tuple[Any, ...], output: tuple[Tensor, Tensor]) -> None:
    x, weight, p, drop_dtype, dtype = inputs
    ctx.save_for_backward(x, weight, output[1])
    ctx.p, ctx.dtypes = p, (drop_dtype, dtype)


def _backward(ctx: Any, grad_out: Tensor, _grad_state: Tensor | None) -> tuple[Any, ...]:
    x, weight, state = ctx.saved_tensors
    grad_x, grad_w = torch.ops.finetune.dropped_projection_backward(
        grad_out, x, weight, state, ctx.p, *ctx.dtypes
    )
    return grad_x, grad_w, None, None, None


_project_op.register_autograd(_backward, setup_context=_setup_context)


def dropped_projection(x: Tensor, weight: Tensor, p: float) -> Tensor:
    """``F.linear(F.dropout(x, p), weight)`` in training, without keeping the dropout output."""
    drop_dtype, dtype = _dtypes(x, weight)
    if p <= 0.0:
        return F.linear(x.to(dtype), weight.to(dtype))
    if default_generator(x.device) is None:  # a device without a known default generator
        dropped = F.dropout(x.to(drop_dtype), p, training=True)
        return F.linear(dropped.to(dtype), weight.to(dtype))
    if torch.compiler.is_compiling():
        out_op: Tensor = torch.ops.finetune.dropped_projection(x, weight, p, drop_dtype, dtype)[0]
        return out_op
    dtypes = (drop_dtype, dtype)
    out: Tensor = _DroppedProjection.apply(x, weight, p, dtypes)  # type: ignore[no-untyped-call]
    return out


# --------------------------------------------------------------------------------------------
# The modules swapped into PEFT's LoRA layers
# --------------------------------------------------------------------------------------------


class DroppedLoraA(nn.Linear):
    """PEFT's ``lora_A`` (a bias-free ``nn.Linear``) that applies the adapter's dropout itself.

    Installed by changing the class of the existing module, so the weight, its name and any
    hooks stay as they are.
    """

    dropout_p: float

    def forward(self, x: Tensor) -> Tensor:
        if self.training and self.dropout_p > 0.0:
            return dropped_projection(x, self.weight, self.dropout_p)
        # PEFT casts the input to the adapter's dtype; the patched layer leaves that to here.
        if not torch.is_autocast_enabled(x.device.type):
            x = x.to(self.weight.dtype)
        return F.linear(x, self.weight)


class DropoutInLoraA(nn.Module):
    """Stands in for the adapter's ``nn.Dropout``: passes the input through unchanged,
    because its ``lora_A`` (a :class:`DroppedLoraA`) applies the dropout. Remembers the
    layer's input-cast setting, which the patch turns off, for :func:`unpatch_model`."""

    def __init__(self, p: float, layer_casts_input: bool) -> None:
        super().__init__()
        self.p = p
        self.layer_casts_input = layer_casts_input

    def forward(self, x: Tensor) -> Tensor:
        return x

    def extra_repr(self) -> str:
        return f"p={self.p}, applied in lora_A"


# --------------------------------------------------------------------------------------------
# Patching a model
# --------------------------------------------------------------------------------------------


def known_layer_types() -> tuple[type[nn.Module], ...]:
    """PEFT's LoRA layer classes whose forward is ``lora_B(lora_A(dropout(x))) * scaling``."""
    types: list[type[nn.Module]] = []
    try:
        from peft.tuners.lora.layer import Linear

        types.append(Linear)
    except ImportError:
        return ()
    try:
        from peft.tuners.lora.bnb import Linear4bit

        types.append(Linear4bit)
    except (ImportError, AttributeError):  # bitsandbytes missing, or without 4-bit support
        pass
    return tuple(types)


@dataclass
class PatchReport:
    """What :func:`patch_model` did: patched layer names, and why others kept PEFT's dropout."""

    patched: list[str] = field(default_factory=list)
    kept: dict[str, str] = field(default_factory=dict)

    @property
    def dropout_saves_inputs(self) -> bool:
        """Whether any adapter still keeps a copy of its input for its dropout."""
        return bool(self.kept)

    def as_dict(self) -> dict[str, Any]:
        return {"patched": list(self.patched), "kept": dict(self.kept)}


def _unpatchable(layer: Any, adapter: str) -> str | None:
    """Why this adapter of a known LoRA layer keeps PEFT's dropout, or None."""
    dropout: object = layer.lora_dropout[adapter]
    lora_a: Any = layer.lora_A[adapter]
    if type(dropout) is not nn.Dropout:
        return f"dropout is {type(dropout).__name__}, not nn.Dropout"
    if type(lora_a) is not nn.Linear or getattr(lora_a, "bias", None) is not None:
        return f"lora_A is {type(lora_a).__name__}, not a bias-free nn.Linear"
    if uses_lora_variant(layer, adapter):
        return "a LoRA variant (such as DoRA) computes this adapter"
    return None


def uses_lora_variant(layer: Any, adapter: str) -> bool:
    """Whether a LoRA variant (DoRA and others) computes this adapter instead of plain LoRA."""
    return adapter in getattr(layer, "lora_variant", {}) or bool(
        getattr(layer, "use_dora", {}).get(adapter)
    )


def _layer_casts_input(layer: Any) -> bool:
    """The layer's input-cast setting before any of its adapters was patched."""
    for dropout in layer.lora_dropout.values():
        if isinstance(dropout, DropoutInLoraA):
            return dropout.layer_casts_input
    return bool(getattr(layer, "cast_input_dtype_enabled", True))


def _adapters_with_dropout(model: nn.Module) -> Iterator[tuple[str, Any, str]]:
    """(layer name, layer, adapter) of every LoRA adapter whose dropout is active or patched."""
    lora_layer: type[Any] | None
    try:
        from peft.tuners.lora.layer import LoraLayer

        lora_layer = LoraLayer
    except ImportError:
        lora_layer = None
    for name, module in model.named_modules():
        if lora_layer is None or not isinstance(module, lora_layer):
            continue
        dropouts = getattr(module, "lora_dropout", None)
        if not isinstance(dropouts, nn.ModuleDict):
            continue
        for adapter, dropout in dropouts.items():
            if isinstance(dropout, (nn.Dropout, DropoutInLoraA)) and dropout.p > 0:
                yield name, module, adapter


def patch_model(model: nn.Module) -> PatchReport:
    """Move every LoRA adapter's dropout into its ``lora_A`` (see the module docstring).

    Idempotent. Layers of other types, and adapters that are not plain LoRA, keep PEFT's
    dropout; the report names them and why.
    """
    known = known_layer_types()
    report = PatchReport()
    touched: dict[str, Any] = {}
    for name, layer, adapter in _adapters_with_dropout(model):
        label = name if adapter == "default" else f"{name}[{adapter}]"
        dropout = layer.lora_dropout[adapter]
        if isinstance(dropout, DropoutInLoraA):
            report.patched.append(label)
            touched[name] = layer
            continue
        why = (
            f"{type(layer).__name__} is not a known LoRA layer type"
            if type(layer) not in known
            else _unpatchable(layer, adapter)
        )
        if why is not None:
            report.kept[label] = why
            continue
        casts = _layer_casts_input(layer)
        lora_a = layer.lora_A[adapter]
        lora_a.__class__ = DroppedLoraA
        lora_a.dropout_p = float(dropout.p)
        layer.lora_dropout[adapter] = DropoutInLoraA(float(dropout.p), casts)
        report.patched.append(label)
        touched[name] = layer
    for layer in touched.values():
        # PEFT would cast x to the adapter's dtype first (a float32 copy per projection when
        # the adapters are float32): DroppedLoraA casts internally, keeping the shared x.
        if all(isinstance(a, DroppedLoraA) for a in layer.lora_A.values()):
            layer.cast_input_dtype_enabled = False
    if report.kept:
        log.info("LoRA dropout stays PEFT's for %d adapters: %s", len(report.kept), report.kept)
    return report


def unpatch_model(model: nn.Module) -> int:
    """Give every patched adapter back PEFT's own dropout; returns how many were restored."""
    restored = 0
    for _name, layer, adapter in _adapters_with_dropout(model):
        dropout = layer.lora_dropout[adapter]
        if not isinstance(dropout, DropoutInLoraA):
            continue
        lora_a = layer.lora_A[adapter]
        lora_a.__class__ = nn.Linear
        del lora_a.dropout_p
        layer.lora_dropout[adapter] = nn.Dropout(p=dropout.p)
        layer.cast_input_dtype_enabled = dropout.layer_casts_input
        restored += 1
    return restored


# --------------------------------------------------------------------------------------------
# A run-time check of the device's generator
# --------------------------------------------------------------------------------------------


def masks_regenerate(device: str = "cuda") -> tuple[bool, str]:
    """Check on ``device`` that the backward pass sees the very mask the forward pass drew.

    With ``A`` the identity the forward output *is* the dropped input, so its zeros are the
    forward mask; the input gradient of an all-ones output gradient is the backward mask.
    """
    try:
        dev = torch.device(device)
        if default_generator(dev) is None:
            return False, f"no default generator known for {device}"
        width = 256
        x = (torch.rand(64, width, device=dev) + 0.5).requires_grad_(True)
        eye = torch.eye(width, device=dev)
        out = dropped_projection(x, eye, 0.25)
        out.backward(torch.ones_like(out))
        assert x.grad is not None
        forward_kept = out.detach() != 0
        backward_kept = x.grad != 0
        if not torch.equal(forward_kept, backward_kept):
            return False, "the backward pass drew a different dropout mask than the forward pass"
        share = float(forward_kept.float().mean())
        if abs(share - 0.75) > 0.03:
            return False, f"kept {share:.3f} of the inputs at p=0.25"
        return True, f"same mask forward and backward on {device}"
    except Exception as exc:  # a device where this fails keeps PEFT's dropout
        return False, f"{type(exc).__name__}: {exc}"


# --------------------------------------------------------------------------------------------
# What the fast path calls
# --------------------------------------------------------------------------------------------


@dataclass
class DropoutChoice:
    """Which LoRA dropout a run uses: ``fused`` (this module), ``peft`` or ``none`` (p = 0)."""

    implementation: str
    note: str
    patch: PatchReport = field(default_factory=PatchReport)

    @property
    def saves_inputs(self) -> bool:
        """Whether some adapter's dropout keeps a copy of its input (the memory model's flag)."""
        return self.implementation == "peft" or self.patch.dropout_saves_inputs

    def as_dict(self) -> dict[str, Any]:
        return {
            "implementation": self.implementation,
            "note": self.note,
            "savesInputs": self.saves_inputs,
            **self.patch.as_dict(),
        }


def _model_device(model: nn.Module) -> str:
    param = next(iter(model.parameters()), None)
    return str(param.device) if param is not None else "cpu"


def choose(model: nn.Module, p: float, fused: bool) -> DropoutChoice:
    """Patch ``model``'s LoRA layers when ``fused`` and the device's masks regenerate.

    A model without LoRA layers yet (PEFT wraps it later, as TRL does when given a
    ``peft_config``) is reported ``fused`` with nothing patched: the caller patches the
    wrapped model with :func:`patch_model`.
    """
    if p <= 0:
        return DropoutChoice("none", "LoRA dropout 0: nothing to drop")
    if not fused:
        return DropoutChoice("peft", "PEFT's dropout, as asked")
    device = torch.device(_model_device(model))
    # The check draws random numbers: it leaves the generators as it found them.
    gpus = [device.index or 0] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=gpus):
        ok, why = masks_regenerate(str(device))
    if not ok:
        log.warning("LoRA dropout stays PEFT's: %s", why)
        return DropoutChoice("peft", why)
    report = patch_model(model)
    if not report.patched and not report.kept:
        return DropoutChoice("fused", f"{why}; no LoRA layers yet: patch the wrapped model")
    if not report.patched:
        return DropoutChoice("peft", "no LoRA adapter here can take the fused dropout", report)
    return DropoutChoice("fused", why, report)
