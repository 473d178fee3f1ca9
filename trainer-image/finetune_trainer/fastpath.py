"""The fast training path: padding-free packing, variable-length attention, fused kernels and a
token budget picked for the GPU's memory.

The trainer calls :func:`apply` when ``spec.training.packing`` is on and a CUDA device is present.
Everything here keeps the training maths unchanged; only how tokens are laid out and which
kernels run differs:

- packing: rows are packed best-fit-decreasing into micro-batches of ``tokens_per_micro_batch``
  tokens, flattened into one row with ``position_ids`` that restart at every row (TRL's ``bfd``
  packing with ``padding_free``). No padding token is computed on.
- attention: :func:`register_varlen_attention` adds an attention implementation that gives each
  packed row its own causal attention through PyTorch's variable-length flash kernel
  (``torch.nn.attention.varlen``). Rows never attend to each other. Without CUDA, or for padded
  or cached batches (evaluation, generation), it falls back to the regular SDPA path.
- fused kernels: Liger's RMSNorm, SwiGLU and RoPE kernels when ``liger-kernel`` is installed and
  works here (checked, not assumed). The LM head and loss already run chunked in TRL's fused head.
- compiled layers (optional, off by default): ``compile_layers.py`` runs each decoder layer's
  body through ``torch.compile`` (one compiled code for all layers) instead of Liger's kernels.
- memory: :func:`plan_micro_batch` picks the token budget and whether to recompute activations
  (gradient checkpointing) from a small, measured memory model (see ``docs/benchmarks.md``).

The memory model and planner live in ``finetune_operator.domain.packed_memory`` (pure, shared with
the operator's fit check); the rest imports torch lazily.
"""

from __future__ import annotations

import inspect
import itertools
import logging
import math
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch
    from torch import Tensor
    from trl import SFTTrainer

from finetune_operator.domain.estimator import ModelShape
from finetune_operator.domain.packed_memory import (
    FAST_PATH_FUSED_LORA_DROPOUT,
    GIB,
    MicroBatchPlan,
    WithinPredictionMargin,
    plan_or_replace,
)

from .compile_layers import BACKEND as COMPILE_BACKEND
from .compile_layers import COMPILE_DECODER_LAYERS, CompileChoice

# Each 4-bit projection and its LoRA adapter as one autograd function (lora_4bit.py): None
# chooses by the planned micro-batch (``use_fused_lora_4bit``), True/False force it.
FUSED_LORA_4BIT: bool | None = None
# From this many tokens per micro-batch the fused projections are faster. Measured on an H100
# (8B shape, 2026-12-07): +5% to +12% tokens/s at 8,192-32,768 tokens, with and without
# checkpointing or offload, but 5-27% slower at 4,096, where the host's kernel launches bound
# a step (why it loses that much there is not profiled yet; docs/benchmarks.md, decision 2140).
LORA_4BIT_MIN_TOKENS = 8192

# LoRA dropout drawn inside the fused 4-bit projections' adapter matmuls by Triton kernels
# (dropout_kernels.py): no dropout pass over the inputs, other masks than PyTorch's, the same
# distribution. Measured on an H100 (8B shape, 12,288 tokens, 2026-12-08): 52.9% -> 57.2% MFU,
# 30 packed steps within 1.2% of PEFT's dropout (decision 2160).
DROPOUT_KERNELS = True

# LoRA adapter weights as one flat parameter for bitsandbytes' optimisers
# (flat_optimizer.py: one update and one device sync per step instead of one per weight).
# Measured on an H100 (8B shape, 2026-12-08): +3.7% tokens/s at 12,288 tokens, +1% at the
# 24 GiB pick, +13% at the 8 GiB pick in two of three runs (decision 2150).
FLAT_ADAPTER_OPTIMIZER = True

log = logging.getLogger(__name__)

ATTENTION_NAME = "fastpath_varlen"

# --------------------------------------------------------------------------------------------
# Model FLOPs (pure): what MFU is measured against
# --------------------------------------------------------------------------------------------


def training_flops(
    shape: ModelShape,
    *,
    lora_rank: int,
    sequence_lengths: list[int],
    loss_tokens: int,
) -> float:
    """Model FLOPs of one LoRA training pass over the given sequences (no recomputation counted).

    Frozen projections: forward 2·N·T plus the input gradient 2·N·T (no weight gradient), so
    4·N_body·T. LM head (frozen) likewise, on the positions that carry a loss only. LoRA
    weights: 6·N_lora·T (forward, input and weight gradients). Causal attention per sequence of
    length s: forward 2·s²·hidden per layer (QKᵀ and AV, half the square), backward twice that.
    """
    tokens = sum(sequence_lengths)
    body = 4.0 * shape.body_matmul_params * tokens
    head = 4.0 * shape.head_params * loss_tokens
    lora = 6.0 * shape.lora_params(lora_rank) * tokens
    squares = sum(s * s for s in sequence_lengths)
    attention = 3.0 * 2.0 * shape.hidden_size * shape.num_layers * squares
    return body + head + lora + attention


# --------------------------------------------------------------------------------------------
# Variable-length attention (torch)
# --------------------------------------------------------------------------------------------


# torch's varlen kernel is looked up, and its keyword arguments read from its signature,
# because benchmark machines run other torch versions than the image's pin.
def _torch_varlen() -> Callable[..., Tensor | tuple[Tensor, Tensor]] | None:
    try:
        from torch.nn.attention.varlen import varlen_attn
    except ImportError:
        return None
    return varlen_attn


# A plain dict rather than functools.cache: a compiled decoder layer (compile_layers.py) then
# reads the answer instead of tracing the signature lookup.
_VARLEN_PARAMS: dict[str, frozenset[str]] = {}


def _varlen_params() -> frozenset[str]:
    if "params" not in _VARLEN_PARAMS:
        fn = _torch_varlen()
        params = frozenset(inspect.signature(fn).parameters) if fn is not None else frozenset()
        _VARLEN_PARAMS["params"] = params
    return _VARLEN_PARAMS["params"]


def _varlen_call(
    q: Tensor, k: Tensor, v: Tensor, cu: Tensor, max_len: int, scale: float | None
) -> Tensor:
    """Causal attention over packed rows with torch's varlen flash kernel (shapes: T, H, D)."""
    fn = _torch_varlen()
    assert fn is not None
    params = _varlen_params()
    kwargs: dict[str, Any] = {}
    if "window_size" in params:  # torch >= 2.11 spells causal as a (-1, 0) window
        kwargs["window_size"] = (-1, 0)
    else:
        kwargs["is_causal"] = True
    if "scale" in params and scale is not None:
        kwargs["scale"] = scale
    if q.shape[1] != k.shape[1]:
        if "enable_gqa" in params:
            kwargs["enable_gqa"] = True
        else:
            rep = q.shape[1] // k.shape[1]
            k = k.repeat_interleave(rep, dim=1)
            v = v.repeat_interleave(rep, dim=1)
    out = fn(q, k, v, cu, cu, max_len, max_len, **kwargs)
    return out[0] if isinstance(out, tuple) else out


def _per_row_sdpa(q: Tensor, k: Tensor, v: Tensor, cu: Tensor, scale: float | None) -> Tensor:
    """Reference implementation: one causal SDPA call per packed row (CPU and tests)."""
    import torch
    import torch.nn.functional as F

    bounds = cu.tolist()
    rep = q.shape[1] // k.shape[1]
    outs = []
    for start, end in itertools.pairwise(bounds):
        qs = q[start:end].transpose(0, 1)
        ks = k[start:end].transpose(0, 1).repeat_interleave(rep, dim=0)
        vs = v[start:end].transpose(0, 1).repeat_interleave(rep, dim=0)
        outs.append(F.scaled_dot_product_attention(qs, ks, vs, is_causal=True, scale=scale))
    return torch.cat([o.transpose(0, 1) for o in outs], dim=0)


def cu_seqlens_from_position_ids(position_ids: Tensor) -> tuple[Tensor, int]:
    """Row boundaries of a packed batch: every position 0 starts a new row."""
    import torch

    flat = position_ids.reshape(-1)
    starts = torch.nonzero(flat == 0).flatten()
    total = torch.tensor([flat.numel()], device=flat.device)
    cu = torch.cat([starts, total]).to(torch.int32)
    return cu, int(cu.diff().max().item())


def varlen_attention_forward(
    module: torch.nn.Module,
    query: Tensor,
    key: Tensor,
    value: Tensor,
    attention_mask: Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    **kwargs: Any,
) -> tuple[Tensor, None]:
    """transformers attention function: packed rows → varlen kernel, anything else → SDPA.

    ``query`` is (batch, heads, tokens, head_dim). Packed batches come from a padding-free
    collator without an attention mask, with ``cu_seq_lens_q``/``max_length_q`` or
    ``position_ids``. Output is (batch, tokens, heads, head_dim) like every transformers
    attention function. Attention dropout is not applied on the packed path (the decoder
    models this path serves train with attention dropout 0).
    """
    import torch
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    batch, heads, q_len, dim = query.shape
    k_len = key.shape[2]
    if attention_mask is not None or q_len != k_len or q_len == 1:
        return sdpa_attention_forward(
            module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs
        )
    cu = kwargs.get("cu_seq_lens_q")
    max_len: int | Tensor | None = kwargs.get("max_length_q")
    if cu is None:
        position_ids = kwargs.get("position_ids")
        if position_ids is not None:
            cu, max_len = cu_seqlens_from_position_ids(position_ids.expand(batch, -1))
        else:  # plain unpadded rows: each batch row is one sequence
            cu = torch.arange(0, (batch + 1) * q_len, q_len, device=query.device, dtype=torch.int32)
            max_len = q_len
    cu = cu.to(device=query.device, dtype=torch.int32)
    assert max_len is not None, "cu_seq_lens_q comes with max_length_q"
    if isinstance(max_len, torch.Tensor):
        # Only a tensor is read back: in a compiled layer a symbolic int stays symbolic (int()
        # would specialise it and recompile the layer for every micro-batch's longest row).
        max_len = int(max_len)
    q = query.transpose(1, 2).reshape(batch * q_len, heads, dim)
    k = key.transpose(1, 2).reshape(batch * k_len, key.shape[1], dim)
    v = value.transpose(1, 2).reshape(batch * k_len, value.shape[1], dim)
    if q.is_cuda and _torch_varlen() is not None:
        out = _varlen_call(q, k, v, cu, max_len, scaling)
    else:
        out = _per_row_sdpa(q, k, v, cu, scaling)
    return out.reshape(batch, q_len, heads, dim), None


def _varlen_mask(*args: Any, **kwargs: Any) -> Any:
    """Mask builder paired with the varlen attention: none for unpadded training batches."""
    from transformers.masking_utils import sdpa_mask

    attention_mask = kwargs.get("attention_mask")
    if attention_mask is None:
        return None
    return sdpa_mask(*args, **kwargs)


def register_varlen_attention() -> str:
    """Register the varlen attention (and its mask builder) with transformers; idempotent."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    AttentionInterface.register(ATTENTION_NAME, varlen_attention_forward)
    AttentionMaskInterface.register(ATTENTION_NAME, _varlen_mask)
    return ATTENTION_NAME


def varlen_kernel_works(device: str = "cuda") -> tuple[bool, str]:
    """Run the varlen kernel once (forward and backward) against the per-row reference."""
    import torch

    if _torch_varlen() is None:
        return False, "torch.nn.attention.varlen is missing in this torch"
    if not torch.cuda.is_available():
        return False, "no CUDA device"
    try:
        gen = torch.Generator(device=device).manual_seed(0)
        cu = torch.tensor([0, 37, 100, 256], dtype=torch.int32, device=device)
        q = torch.randn(256, 8, 128, device=device, dtype=torch.bfloat16, generator=gen)
        k = torch.randn(256, 2, 128, device=device, dtype=torch.bfloat16, generator=gen)
        v = torch.randn(256, 2, 128, device=device, dtype=torch.bfloat16, generator=gen)
        q.requires_grad_(True)
        out = _varlen_call(q, k, v, cu, 156, None)
        out.float().sum().backward()
        ref = _per_row_sdpa(q.detach().float(), k.float(), v.float(), cu, None)
        err = float((out.float() - ref).norm() / ref.norm())
        if not math.isfinite(err) or err > 2e-2:
            return False, f"varlen kernel disagrees with the reference (relative error {err:.3g})"
        return True, f"relative error {err:.2g} against the per-row reference"
    except Exception as exc:  # a kernel that does not run here is a fallback, not a failure
        return False, f"{type(exc).__name__}: {exc}"


def set_attention(model: Any, name: str) -> None:
    """Switch a loaded model's attention implementation."""
    try:
        model.set_attn_implementation(name)
    except Exception:
        for config in (model.config, getattr(model.config, "get_text_config", lambda: None)()):
            if config is not None:
                config._attn_implementation = name


# --------------------------------------------------------------------------------------------
# Fused kernels
# --------------------------------------------------------------------------------------------


def apply_liger(model: Any) -> list[str]:
    """Patch RMSNorm, SwiGLU and RoPE with Liger's Triton kernels; returns what was patched.

    The LM head and loss stay TRL's chunked fused head (Liger's fused linear cross-entropy
    would replace the model's forward). Returns an empty list when Liger is unavailable.
    """
    try:
        from liger_kernel.transformers import _apply_liger_kernel_to_instance
    except Exception as exc:
        log.info("liger-kernel unavailable: %s", exc)
        return []
    kwargs = {
        "rope": True,
        "rms_norm": True,
        "swiglu": True,
        "cross_entropy": False,
        "fused_linear_cross_entropy": False,
    }
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    try:
        _apply_liger_kernel_to_instance(model=base, **kwargs)
    except Exception as exc:
        log.warning("liger-kernel could not patch %s: %s", type(base).__name__, exc)
        return []
    return ["rms_norm", "swiglu", "rope"]


# --------------------------------------------------------------------------------------------
# What the trainer calls
# --------------------------------------------------------------------------------------------


@dataclass
class FastPathReport:
    attention: str
    attention_note: str
    kernels: list[str]
    plan: dict[str, Any] | None
    sft_overrides: dict[str, Any]
    # Checkpointed layer inputs in host memory (offload.py): layers wrapped, host GiB planned.
    activation_offload: dict[str, Any] | None = None
    lora_dropout: dict[str, Any] = field(default_factory=dict)
    # Decoder layers through torch.compile (compile_layers.py): whether, why not, and what
    # dynamo compiled so far (read again after training for the counts).
    compiled_layers: CompileChoice | None = None
    # 4-bit projections with their adapters as one autograd function (lora_4bit.py): how
    # many layers, and why others kept PEFT's forward; None when not asked for.
    lora_4bit: dict[str, Any] | None = None

    def as_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["compiled_layers"] = self.compiled_layers.as_dict() if self.compiled_layers else None
        return out


def sft_overrides(plan: MicroBatchPlan | None, max_seq_length: int) -> dict[str, Any]:
    """SFTConfig keyword arguments of the fast path."""
    tokens = plan.tokens_per_micro_batch if plan else max(max_seq_length, 8192)
    overrides: dict[str, Any] = {
        "packing": True,
        "packing_strategy": "bfd",
        "padding_free": True,
        "max_length": tokens,
        "per_device_train_batch_size": 1,
        # Checking every micro-batch's loss for NaN reads it back to the host each time,
        # which stalls the GPU (see trainer_class); non-finite losses still show in the logs.
        "logging_nan_inf_filter": False,
    }
    if plan is not None:
        overrides["gradient_checkpointing"] = plan.gradient_checkpointing
    return overrides


def frozen_params_to(model: torch.nn.Module, dtype_name: str) -> int:
    """Cast frozen float32 weights (norms, embeddings, head) back to the compute dtype.

    ``peft.prepare_model_for_kbit_training`` upcasts them to float32. Their values came from a
    16-bit checkpoint, so the upcast adds no precision, but it costs memory (2 GiB on an 8B
    model) and makes the fused kernels mix dtypes. RMSNorm still computes in float32 inside.
    Returns the number of tensors cast.
    """
    import torch

    dtype = getattr(torch, dtype_name)
    cast = 0
    for param in model.parameters():
        if not param.requires_grad and param.dtype == torch.float32:
            param.data = param.data.to(dtype)
            cast += 1
    return cast


def apply(
    model: Any,
    *,
    method: str,
    lora_rank: int,
    max_seq_length: int,
    optimizer: str = "paged_adamw_8bit",
    memory_budget_gib: float | None = None,
    gradient_checkpointing: bool | None = None,
    tokens_per_micro_batch: int | None = None,
    compute_dtype: str = "bfloat16",
    use_liger: bool | None = None,
    lora_dropout: float = 0.05,
    activation_offload: bool | None = None,
    fused_lora_dropout: bool = FAST_PATH_FUSED_LORA_DROPOUT,
    compile_layers: bool = COMPILE_DECODER_LAYERS,
    compile_backend: str = COMPILE_BACKEND,
    fused_lora_4bit: bool | None = FUSED_LORA_4BIT,
    dropout_kernels: bool = DROPOUT_KERNELS,
) -> FastPathReport:
    """Prepare a loaded model (PEFT-wrapped or not) for the fast path.

    Switches attention to the varlen kernel when it runs here (checked against a reference,
    else the model keeps its attention and packed rows are kept apart by the block-diagonal
    mask transformers builds from ``position_ids``), patches fused kernels on CUDA, casts
    upcast frozen weights back to ``compute_dtype``, and plans the packed token budget for
    ``memory_budget_gib`` (default: 90% of what the current GPU has free plus what this
    process already holds). Explicit ``gradient_checkpointing`` and ``tokens_per_micro_batch``
    win over the planner, and so does ``activation_offload`` (else the planner offloads the
    checkpointed layer inputs to host memory when that buys a much larger budget and fits
    the container's memory; see ``offload.py``). Returns the plan and the SFTConfig
    overrides to use. Rows must already be cut to ``max_seq_length``: packing only fills
    micro-batches, it never cuts. ``fused_lora_dropout`` moves LoRA dropout into ``lora_A``
    so that it keeps no copy of the inputs (``lora_dropout.choose``; the report names the
    patched modules). ``compile_layers`` compiles every decoder layer's body with
    ``compile_backend`` (``compile_layers.py``); the layers stay eager, with the reason in the
    report, when the backend fails a start-up probe. ``use_liger`` unset means Liger's kernels
    unless the layers are compiled (the compiler fuses the same operations).
    ``fused_lora_4bit`` runs each 4-bit projection of a PEFT model and its adapter as one
    autograd function (``lora_4bit.py``; not with compiled layers); None decides by the
    planned micro-batch (:func:`use_fused_lora_4bit`); ``dropout_kernels`` draws their LoRA
    dropout inside the adapter's matmuls (``dropout_kernels.py``) where Triton runs.
    """
    import torch

    from . import lora_dropout as dropout_impl

    cuda = torch.cuda.is_available()
    ok, note = varlen_kernel_works()
    if ok:
        set_attention(model, register_varlen_attention())
        attention = ATTENTION_NAME
    else:
        attention = str(getattr(model.config, "_attn_implementation", "sdpa"))
    if cuda:
        frozen_params_to(model, compute_dtype)
    compiled = None
    if compile_layers:
        from .compile_layers import compile_decoder_layers

        compiled = compile_decoder_layers(model, compile_backend)
    liger = use_liger if use_liger is not None else not (compiled and compiled.compiled)
    kernels = apply_liger(model) if liger and cuda else []
    dropout = dropout_impl.choose(model, lora_dropout, fused_lora_dropout)
    if memory_budget_gib is None and cuda:
        free, _total = torch.cuda.mem_get_info()
        memory_budget_gib = (free + torch.cuda.memory_reserved()) * 0.9 / GIB
    plan = None
    if memory_budget_gib is not None:
        shape = ModelShape.from_config(model.config)
        common = {
            "method": method,
            "lora_rank": lora_rank,
            "max_seq_length": max_seq_length,
            "memory_budget_gib": memory_budget_gib,
            "optimizer": optimizer,
            "lora_dropout": lora_dropout,
            "host_memory_gib": _host_memory_gib(),
            "dropout_saves_inputs": dropout.saves_inputs,
        }
        plan, warnings = plan_for_gpu(
            shape,
            gradient_checkpointing=gradient_checkpointing,
            tokens_per_micro_batch=tokens_per_micro_batch,
            activation_offload=activation_offload,
            **common,
        )
        for warning in warnings:
            log.warning("fast path: %s", warning)
    fused_4bit = None
    if use_fused_lora_4bit(fused_lora_4bit, plan.tokens_per_micro_batch if plan else None):
        from . import lora_4bit

        if compiled is not None and compiled.compiled:
            fused_4bit = {"patched": 0, "kept": {"*": "decoder layers are compiled"}}
        else:
            fused_4bit = lora_4bit.patch_model(model, dropout_kernels).as_dict()
    return FastPathReport(
        attention=attention,
        attention_note=note,
        kernels=kernels,
        plan=plan.as_dict() if plan else None,
        sft_overrides=sft_overrides(plan, max_seq_length),
        activation_offload=_install_offload(model, plan) if plan else None,
        lora_dropout=dropout.as_dict(),
        compiled_layers=compiled,
        lora_4bit=fused_4bit,
    )


def use_fused_lora_4bit(choice: bool | None, tokens_per_micro_batch: int | None) -> bool:
    """Whether to fuse 4-bit projections with their adapters: ``choice`` when given, else
    when a micro-batch holds at least ``LORA_4BIT_MIN_TOKENS`` tokens (unplanned: no)."""
    if choice is not None:
        return choice
    return tokens_per_micro_batch is not None and tokens_per_micro_batch >= LORA_4BIT_MIN_TOKENS


def after_training(model: Any) -> int:
    """Undo what only training needs before the model evaluates and generates: the fused
    4-bit projections give their layers back to PEFT, so decoding keeps bitsandbytes'
    inference kernels (the fused function dequantises the whole weight for every token).
    Returns how many layers were given back."""
    import sys

    # Only lora_4bit patches layers: if it was never imported, nothing is patched.
    lora_4bit = sys.modules.get(f"{__package__}.lora_4bit")
    return int(lora_4bit.unpatch_model(model)) if lora_4bit is not None else 0


def plan_for_gpu(
    shape: ModelShape,
    *,
    gradient_checkpointing: bool | None = None,
    tokens_per_micro_batch: int | None = None,
    activation_offload: bool | None = None,
    **settings: Any,
) -> tuple[MicroBatchPlan, list[str]]:
    """The plan to train with, and the warnings to log about it.

    The operator's rule (``plan_or_replace``): the requested budget and checkpointing when
    they fit, else the planner's choice. When nothing fits by the prediction but the smallest
    checkpointed budget is over by less than the model's uncertainty, that budget is tried
    (its plan has ``within_prediction_margin``); a real shortage then ends in OutOfMemory.
    Clearly too little memory raises ValueError as before. Pure: no torch.
    """
    try:
        plan, replaced = plan_or_replace(
            shape,
            gradient_checkpointing=gradient_checkpointing,
            tokens_per_micro_batch=tokens_per_micro_batch,
            activation_offload=activation_offload,
            **settings,
        )
    except WithinPredictionMargin as exc:
        margin = exc.plan
        return margin, [
            f"predicted peak {margin.predicted_peak_gib:.1f} GiB is over the "
            f"{margin.memory_budget_gib:.1f} GiB budget, but within the prediction margin: "
            f"trying {margin.tokens_per_micro_batch} tokens per micro-batch with gradient "
            "checkpointing"
        ]
    if replaced:
        return plan, [f"the requested batch/checkpointing do not fit ({replaced})"]
    return plan, []


def _host_memory_gib() -> float | None:
    """This process's share of the container's memory (torchrun starts one per GPU)."""
    import os

    from .offload import host_memory_bytes

    memory = host_memory_bytes()
    local = os.environ.get("LOCAL_WORLD_SIZE", "1")
    processes = int(local) if local.isdigit() and int(local) > 0 else 1
    return memory / processes / GIB if memory is not None else None


def _install_offload(model: Any, plan: MicroBatchPlan) -> dict[str, Any] | None:
    """Offload the checkpointed layer inputs to host memory when the plan says so."""
    if not plan.activation_offload:
        return None
    from .offload import ActivationOffloader, install, installed

    offloader = installed(model) or ActivationOffloader()
    shape = ModelShape.from_config(model.config)
    per_layer = plan.offload_host_bytes // max(1, shape.num_layers)
    offloader.reserve(shape.num_layers, per_layer)  # pinned once, before the first step
    install(model, offloader)
    return {"hostGiB": round(plan.offload_host_bytes / GIB, 2), "pinned": offloader.pinned}


# --------------------------------------------------------------------------------------------
# The trainer class: no host-device synchronisation inside a step
# --------------------------------------------------------------------------------------------


def trainer_class(flat_adapter_optimizer: bool = FLAT_ADAPTER_OPTIMIZER) -> type[SFTTrainer]:
    """TRL's SFTTrainer, changed so that a training micro-batch never waits for the GPU.

    TRL's loss step reads entropy, token accuracy and the token count back to the host after
    every forward pass (``.item()`` and ``if tensor > 0``), and transformers does the same to
    count tokens seen. Each read stalls the host until the GPU has drained its queue; the GPU
    then idles while the host issues the next few thousand small kernels of the backward pass.
    On an 8B model at 8k tokens per micro-batch the GPU was busy only ~60% of a step.

    Here the loss is the same (sum of per-token negative log-likelihoods over the label
    tokens, divided by the token count), the metrics are summed on the GPU and turned into
    numbers only when a log line is written, and the packed batches (no padding) are counted
    from their shape. Anything unusual (a custom loss, label smoothing, DFT loss, MoE
    auxiliary loss, sequence parallelism, evaluation) takes TRL's own path unchanged.

    ``flat_adapter_optimizer`` hands a bitsandbytes optimiser the LoRA adapter weights
    as one flat parameter per group (``flat_optimizer.py``); ``flat_optimizer_report`` says
    what was flattened.
    """
    import torch
    from trl import SFTTrainer

    class FastPathSFTTrainer(SFTTrainer):
        _device_metrics: Tensor | None = None
        flatten_adapter_optimizer = flat_adapter_optimizer
        flat_optimizer_report: dict[str, Any] | None = None

        def create_optimizer(self, *args: Any, **kwargs: Any) -> Any:
            fresh = self.optimizer is None
            optimizer = super().create_optimizer(*args, **kwargs)
            if fresh and self.flatten_adapter_optimizer:
                from .flat_optimizer import flatten_adapters

                given = args[0] if args else kwargs.get("model")
                model: Any = given if given is not None else self.model
                report = flatten_adapters(optimizer, model)
                self.flat_optimizer_report = report.as_dict()
                log.info(
                    "fast path: %d adapter weights as %d flat optimiser parameters",
                    report.flattened,
                    report.flat_parameters,
                )
            return optimizer

        def _model_training(self) -> bool:
            return self.model is not None and self.model.training

        def _plain_loss(self) -> bool:
            config = getattr(self.accelerator, "parallelism_config", None)
            return (
                self._model_training()
                and self.compute_loss_func is None
                and self.label_smoother is None
                and getattr(self.args, "loss_type", "nll") == "nll"
                and not getattr(self, "aux_loss_enabled", False)
                and not (config is not None and getattr(config, "sp_enabled", False))
            )

        def compute_loss(
            self,
            model: Any,
            inputs: dict[str, Any],
            return_outputs: bool = False,
            num_items_in_batch: Any = None,
        ) -> Any:
            if return_outputs or not self._plain_loss():
                # TRL leaves this method unannotated.
                return super().compute_loss(  # type: ignore[no-untyped-call]
                    model, inputs, return_outputs, num_items_in_batch
                )
            inputs["use_cache"] = False
            outputs = model(**inputs, fused_lm_head=True)
            label_mask = outputs.label_mask
            count = label_mask.sum() if num_items_in_batch is None else num_items_in_batch
            loss = (-outputs.log_probs).sum() / torch.as_tensor(count).clamp(min=1)
            if self.args.average_tokens_across_devices and num_items_in_batch is not None:
                loss = loss * (self.accelerator.num_processes // self.get_tp_size())
            with torch.no_grad():
                sums = torch.stack(
                    [
                        label_mask.sum().float(),
                        outputs.entropy.detach().float().sum(),
                        outputs.is_top1.sum().float(),
                    ]
                )
            previous = self._device_metrics
            self._device_metrics = sums if previous is None else previous + sums
            self._count_batch_tokens(inputs)
            return loss

        def _count_batch_tokens(self, inputs: dict[str, Any]) -> None:
            # Packed padding-free micro-batches hold only real tokens: their shape is the count.
            if "attention_mask" in inputs or self.accelerator.num_processes > 1:
                tokens = self.accelerator.gather_for_metrics(
                    torch.as_tensor(
                        inputs["attention_mask"].sum()
                        if "attention_mask" in inputs
                        else inputs["input_ids"].numel(),
                        device=inputs["input_ids"].device,
                    )
                )
                count = int(tokens.sum().item())
            else:
                count = int(inputs["input_ids"].numel())
            self._total_train_tokens += count // self._tp_size
            self._metrics["train"]["num_tokens"] = [self._total_train_tokens]

        def _track_num_input_tokens(self, inputs: dict[str, Any]) -> None:
            padded = "attention_mask" in inputs or "position_ids" not in inputs
            if padded or self.accelerator.num_processes > 1:
                # transformers' Trainer leaves this method unannotated.
                super()._track_num_input_tokens(inputs)  # type: ignore[no-untyped-call]
                return
            if self.args.include_num_input_tokens_seen not in ("no", False):
                self.state.num_input_tokens_seen += int(inputs["input_ids"].numel())

        def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
            sums = self._device_metrics
            if sums is not None and self._model_training():
                self._device_metrics = None
                total = self.accelerator.gather_for_metrics(sums.unsqueeze(0)).sum(0).tolist()
                valid, entropy, correct = total
                metrics = self._metrics["train"]
                metrics["entropy"] = [entropy / valid if valid > 0 else 0.0]
                metrics["mean_token_accuracy"] = [correct / valid if valid > 0 else 0.0]
            super().log(logs, start_time)

    return FastPathSFTTrainer
