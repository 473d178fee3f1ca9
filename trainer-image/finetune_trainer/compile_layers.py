"""Regional compilation: the decoder layer's body through ``torch.compile``, one compiled code
shared by every layer.

A decoder layer is the same code for all its instances, so compiling that code once gives
one graph (and, after the first change of micro-batch length, one dynamic-shape graph) that
every layer runs; the whole model is never traced, which keeps the compile time of a 32-layer
model that of one layer and leaves the embedding, the fused LM head and the loss eager.
Inductor then fuses the elementwise work between the matmuls (norms, rotary embedding,
SwiGLU, LoRA's scaling and add, the residual adds) into a few kernels.

How it is installed: each layer's class is swapped for a subclass whose ``forward`` calls the
compiled ``forward`` of the original class. transformers wraps ``forward`` of every
checkpointing layer class (subclasses included) so that only the outermost wrapper
checkpoints; here that is the subclass's, so gradient checkpointing (and the activation
offload's hooks around it) stays eager around the compiled body, and the recompute in the
backward pass runs the compiled body again. Compiling the layer module itself (``layer.compile()``)
would put transformers' checkpoint call inside the traced region, where the offload's
``saved_tensors_hooks`` and the fused LoRA dropout's generator state are graph breaks that
leave the layer uncompiled.

Shapes: packed micro-batches change length every step. ``dynamic=None`` compiles the first
length as static and, at the first length change, once more with the token dimension (and
any other size that changed) symbolic; later lengths reuse that graph. Hidden sizes stay
static. The layer that reads the frozen embeddings gets its own graph without input gradient.

Failures never stop training: a start-up probe compiles a small layer-like block with the
same backend on the model's device (a missing C++ compiler or a broken Triton shows here,
and the model stays eager, with the reason reported), and ``suppress_errors`` lets a layer
whose compilation fails later run eagerly instead of raising (torch._dynamo logs a warning
with the error, and the counts below include the failed compilations).

The fused LoRA dropout enters the compiled layer as an operator (``lora_dropout.py``), and
bitsandbytes' 4-bit matmul is one too, so a layer stays one graph. Code that cannot be traced
would split a layer into several graphs (graph breaks); the model still trains the same.
:meth:`CompileStats.as_dict` counts compilations, recompilations, graphs, graph breaks and
failed compilations for the run's report.
"""

from __future__ import annotations

import logging
import threading
import weakref
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from torch import Tensor, nn

log = logging.getLogger(__name__)

# Off until bench/run_h100.sh compile shows compiled layers train faster on the GPU at the
# same memory (decision 2070).
COMPILE_DECODER_LAYERS = False
BACKEND = "inductor"
_ORIGINAL = "_finetune_uncompiled_class"


# --------------------------------------------------------------------------------------------
# Counting what dynamo compiled
# --------------------------------------------------------------------------------------------


class _CompileLog:
    """Dynamo's compile ids since the callback was registered ("frame/attempt": an attempt
    above 0 is a recompilation of a frame already compiled)."""

    def __init__(self) -> None:
        self.ids: list[str] = []
        self.lock = threading.Lock()

    def on_start(self, args: Any = None) -> None:
        from torch._dynamo.callback import CallbackTrigger

        if getattr(args, "callback_trigger", CallbackTrigger.DYNAMO) == CallbackTrigger.DYNAMO:
            with self.lock:
                self.ids.append(str(getattr(args, "compile_id", "")))

    def register(self) -> bool:
        """Listen to dynamo's compile starts (again: ``torch._dynamo.reset()`` forgets us)."""
        try:
            from torch._dynamo.callback import callback_handler
        except ImportError:
            return False
        if self.on_start not in callback_handler.start_callbacks:
            callback_handler.register_start_callback(self.on_start)
        return True


_LOG = _CompileLog()


def _counter_totals() -> tuple[int, int, int]:
    """(graphs compiled, graph breaks met while tracing, frames left eager because their
    compilation failed) so far in this process."""
    try:
        from torch._dynamo.utils import counters
    except ImportError:
        return 0, 0, 0
    frames = counters["frames"]
    return (
        int(counters["stats"]["unique_graphs"]),
        int(sum(counters["graph_break"].values())),
        int(frames["total"] - frames["ok"]),
    )


def _is_recompile(compile_id: str) -> bool:
    attempt = compile_id.rsplit("/", 1)[-1]
    return attempt.isdigit() and int(attempt) > 0


@dataclass
class CompileStats:
    """Dynamo's compilations since :func:`compile_decoder_layers` (process-wide counters)."""

    first_id: int
    graphs_before: int
    breaks_before: int
    failures_before: int

    @classmethod
    def start(cls) -> CompileStats:
        counting = _LOG.register()
        return cls(len(_LOG.ids) if counting else -1, *_counter_totals())

    def as_dict(self) -> dict[str, Any]:
        graphs, breaks, failures = _counter_totals()
        out: dict[str, Any] = {
            "graphs": graphs - self.graphs_before,
            "graphBreaks": breaks - self.breaks_before,
            # Compilations that failed: that code ran eagerly, and torch._dynamo logged why.
            "failedCompilations": failures - self.failures_before,
        }
        if self.first_id >= 0:
            with _LOG.lock:
                ids = _LOG.ids[self.first_id :]
            out["compilations"] = len(ids)
            out["recompilations"] = sum(1 for i in ids if _is_recompile(i))
        return out


# --------------------------------------------------------------------------------------------
# Finding and compiling the layers
# --------------------------------------------------------------------------------------------


def _base(model: Any) -> Any:
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def decoder_layers(model: nn.Module) -> list[nn.Module]:
    """The model's repeated blocks: modules of the classes transformers never splits across
    devices (``_no_split_modules``: the decoder layer), else its checkpointing layers."""
    names = set(getattr(_base(model), "_no_split_modules", None) or ())
    layers: list[nn.Module] = []
    for module in model.modules():
        cls = getattr(type(module), _ORIGINAL, type(module))
        if cls.__name__ in names:
            layers.append(module)
    if layers:
        return layers
    try:
        from transformers.modeling_layers import GradientCheckpointingLayer
    except ImportError:
        return []
    return [m for m in model.modules() if isinstance(m, GradientCheckpointingLayer)]


_COMPILED: dict[tuple[type[Any], str], type[Any]] = {}


def _compiled_class(cls: type[Any], backend: str) -> type[Any]:
    """A subclass of ``cls`` whose forward runs ``cls.forward`` compiled (one per class)."""
    key = (cls, backend)
    if key not in _COMPILED:
        import torch

        body: Callable[..., Any] = torch.compile(cls.forward, backend=backend, dynamic=None)

        def forward(self: nn.Module, *args: Any, **kwargs: Any) -> Any:
            return body(self, *args, **kwargs)

        namespace = {"forward": forward, "__module__": cls.__module__, _ORIGINAL: cls}
        _COMPILED[key] = type(cls.__name__, (cls,), namespace)
    return _COMPILED[key]


def uncompile(model: nn.Module) -> int:
    """Give every compiled layer its own class back; returns how many were restored."""
    restored = 0
    for module in model.modules():
        original = getattr(type(module), _ORIGINAL, None)
        if original is not None:
            module.__class__ = original
            restored += 1
    return restored


class _ProbeBlock:
    """A small decoder-like block (RMSNorm, gated MLP, residual) to compile at start-up."""

    def __init__(self, width: int, device: Any, dtype: Any) -> None:
        import torch

        gen = torch.Generator(device="cpu").manual_seed(0)
        self.weights = [
            (torch.randn(shape, generator=gen) * 0.1).to(device=device, dtype=dtype)
            for shape in ((width,), (2 * width, width), (2 * width, width), (width, 2 * width))
        ]

    def __call__(self, x: Tensor) -> Tensor:
        import torch.nn.functional as F

        norm, gate, up, down = self.weights
        h = x.float()
        h = (h * (h.pow(2).mean(-1, keepdim=True) + 1e-6).rsqrt()).to(x.dtype) * norm
        return x + F.linear(F.silu(F.linear(h, gate)) * F.linear(h, up), down)


def compiler_works(backend: str, device: Any, dtype: Any) -> tuple[bool, str]:
    """Compile the probe block with ``backend`` on ``device`` at two lengths, forward and
    backward, and compare it with the eager block."""
    import torch

    try:
        block = _ProbeBlock(64, device, dtype)
        compiled = torch.compile(block.__call__, backend=backend, dynamic=None)
        tolerance = 1e-4 if dtype == torch.float32 else 3e-2
        for tokens in (24, 40):
            x = torch.randn(1, tokens, 64, device=device, dtype=dtype, requires_grad=True)
            got = compiled(x)
            (got_grad,) = torch.autograd.grad(got.float().square().sum(), x)
            want = block(x)
            (want_grad,) = torch.autograd.grad(want.float().square().sum(), x)
            for a, b in ((got.detach(), want.detach()), (got_grad, want_grad)):
                error = float((a.float() - b.float()).abs().max() / b.float().abs().max())
                if not error <= tolerance:
                    return False, f"the compiled probe differs from eager (relative {error:.2g})"
        return True, f"{backend} compiled a probe block on {device}"
    except Exception as exc:  # any failure here means: stay eager
        return False, f"{type(exc).__name__}: {str(exc).strip().splitlines()[0][:300]}"


@dataclass
class CompileChoice:
    """Whether the decoder layers run compiled, and why not when they don't."""

    compiled: bool
    note: str
    backend: str = BACKEND
    layers: int = 0
    layer_class: str | None = None
    stats: CompileStats | None = field(default=None, repr=False)

    def as_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "compiled": self.compiled,
            "backend": self.backend,
            "layers": self.layers,
            "layerClass": self.layer_class,
            "note": self.note,
        }
        if self.stats is not None:
            out.update(self.stats.as_dict())
        return out


def _model_device_dtype(layers: list[nn.Module]) -> tuple[Any, Any]:
    import torch

    for param in layers[0].parameters():
        if param.is_floating_point():
            return param.device, param.dtype
    return torch.device("cpu"), torch.float32


Probe = Callable[[str, Any, Any], tuple[bool, str]]


def compile_decoder_layers(
    model: nn.Module, backend: str = BACKEND, probe: Probe = compiler_works
) -> CompileChoice:
    """Compile the decoder layers of ``model`` (PEFT-wrapped or not) in place, or say why not.

    Idempotent. ``probe`` checks the backend on the model's device first; when it fails the
    model is left as it was.
    """
    layers = decoder_layers(model)
    if not layers:
        return CompileChoice(False, "no decoder layers found to compile", backend)
    device, dtype = _model_device_dtype(layers)
    ok, why = probe(backend, device, dtype)
    if not ok:
        log.warning("decoder layers stay eager: %s", why)
        return CompileChoice(False, why, backend)
    import torch

    # A layer whose compilation fails during training then runs eagerly instead of raising.
    torch._dynamo.config.suppress_errors = True
    stats = CompileStats.start()
    classes = set()
    for layer in layers:
        original = getattr(type(layer), _ORIGINAL, type(layer))
        layer.__class__ = _compiled_class(original, backend)
        classes.add(original.__name__)
    names = ", ".join(sorted(classes))
    log.info("compiling %d decoder layers (%s) with %s", len(layers), names, backend)
    choice = CompileChoice(True, why, backend, len(layers), names, stats)
    _CHOICES[model] = choice
    return choice


_CHOICES: weakref.WeakKeyDictionary[nn.Module, CompileChoice] = weakref.WeakKeyDictionary()


def compiled_choice(model: nn.Module) -> CompileChoice | None:
    """What :func:`compile_decoder_layers` did to ``model``, if it compiled its layers."""
    return _CHOICES.get(model)
