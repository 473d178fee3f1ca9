"""Predict peak GPU memory of a LoRA/QLoRA training step, and pick settings that fit.

Pure and dependency-free: the operator uses it for the preflight fit check, the trainer
(which has the real ``config.json``) to resolve ``batchSize: auto`` and
``gradientCheckpointing`` unset. Every tunable number lives in :class:`Coefficients` so the
model can be recalibrated against measurements without touching the formulas.

The model (per GPU, data-parallel so each GPU holds a full copy):

- weights: QLoRA stores the decoder's linear layers in 4 bit plus block-wise quantisation
  constants; embeddings, output head and norms stay in the compute dtype. LoRA keeps all
  weights in the compute dtype.
- adapter: LoRA A/B matrices in float32, their gradients, and optimiser states.
- activations: bytes per token per decoder layer, linear in hidden and intermediate size.
  With gradient checkpointing only each layer's input is kept, plus one layer recomputed.
- logits: the output head's logits and the cross-entropy's float32 copies, per token x vocab.
- overhead: CUDA context and cuBLAS workspace, plus allocator fragmentation.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass, replace
from typing import TYPE_CHECKING, Any, Protocol

from .uris import split_scheme

if TYPE_CHECKING:
    from ..api.finetunejob import FineTuneJobSpec

GIB = 1024**3


# ---------------------------------------------------------------- coefficients


@dataclass(frozen=True)
class Coefficients:
    """Every tunable number of the memory model (bytes unless stated)."""

    # Activations kept for backward, per token and decoder layer, without checkpointing:
    # act_per_hidden * hidden + act_per_intermediate * intermediate (bf16/fp16 compute;
    # SDPA/flash attention, so no seq^2 term). Fitted by bench/fit_estimator.py on the
    # padded H100 sweep of 2026-11-23 (bench/results/h100-2026-11-23/vram.json).
    act_per_hidden: float = 24.65
    act_per_intermediate: float = 11.09
    # Extra activation bytes per token, layer and adapted module (dropout copy, fp32 cast),
    # scaled by the module's input width.
    act_lora_per_input: float = 1.24
    # With checkpointing: bytes per token and layer of the saved layer input (a bf16 copy
    # plus the float32 residual the measurements show), plus the share of one layer's full
    # activations alive while it is recomputed.
    checkpoint_bytes_per_hidden: float = 4.03
    checkpoint_live_layers: float = 0.72
    # Logits + loss, bytes per token x vocab entry beyond what the activation terms cover.
    # The fit settles on its lower bound: the logits are freed before the backward peak.
    logits_bytes: float = 1.0
    # 4-bit quantisation constants, bytes per quantised parameter.
    quant_const_bytes: float = 4.0 / 64  # fp32 absmax per 64-block
    quant_const_bytes_double: float = 1.0 / 64 + 4.0 / (64 * 256)  # 8-bit absmax + fp32 per 256
    # Adapter parameters: weight (fp32) and gradient (fp32).
    adapter_weight_bytes: float = 4.0
    adapter_grad_bytes: float = 4.0
    # CUDA context, cuBLAS/cuDNN workspace and the bitsandbytes dequantisation buffer (GiB).
    cuda_overhead_gib: float = 0.5
    # Allocator fragmentation and temporaries, as a share of everything else.
    fragmentation: float = 0.01
    # Data-parallel gradient buckets, bytes per adapter parameter when gpus > 1.
    ddp_bucket_bytes: float = 4.0
    # QLoRA: the k-bit preparation casts the unquantised weights (embeddings, output head,
    # norms) to float32, so they take 4 bytes each and the residual stream runs in float32;
    # activations grow by this factor against LoRA in the compute dtype.
    qlora_other_param_bytes: float = 4.0
    qlora_activation_scale: float = 1.19


COEFFICIENTS = Coefficients()

# Optimiser state bytes per trainable (adapter) parameter.
OPTIMIZER_STATE_BYTES: dict[str, float] = {
    "paged_adamw_8bit": 2.0,
    "adamw_8bit": 2.0,
    "paged_adamw_32bit": 8.0,
    "adamw_torch": 8.0,
    "adamw_torch_fused": 8.0,
    "adafactor": 1.0,
    "sgd": 0.0,
}

DTYPE_BYTES = {"bfloat16": 2, "float16": 2, "float32": 4}


# ---------------------------------------------------------------- GPUs


# nvidia.com/gpu.product label patterns (GPU feature discovery) -> usable GiB. Most specific
# first; matched case-insensitively against the product string.
GPU_MEMORY_GIB: tuple[tuple[str, float], ...] = (
    (r"h200", 139.8),
    (r"h100.*(94|nvl)", 93.0),
    (r"h100", 79.6),
    (r"gh200", 94.5),
    (r"b200", 178.0),
    (r"a100.*40", 39.4),
    (r"a100", 79.2),
    (r"l40s", 44.4),
    (r"l40", 44.4),
    (r"l4\b|l4$|-l4", 22.0),
    (r"a10g", 22.0),
    (r"a10\b|a10$|-a10", 22.0),
    (r"rtx-?4090|4090", 23.6),
    (r"rtx-?3090|3090", 23.6),
    (r"a6000", 47.5),
    (r"v100.*32", 31.7),
    (r"v100", 15.8),
    (r"t4\b|t4$|-t4", 14.6),
)


def gpu_memory_gib(
    product: str | None, overrides: Mapping[str, float] | None = None
) -> float | None:
    """Usable memory of one GPU of ``product`` in GiB, or None when unknown."""
    if not product:
        return None
    for name, gib in (overrides or {}).items():
        if name.lower() == product.lower():
            return float(gib)
    lowered = product.lower()
    for pattern, gib in GPU_MEMORY_GIB:
        if re.search(pattern, lowered):
            return gib
    return None


# ---------------------------------------------------------------- model shape


class HFConfig(Protocol):
    """A loaded transformers model config (the operator does not depend on transformers)."""

    def to_dict(self) -> dict[str, Any]: ...


@dataclass(frozen=True)
class ModelShape:
    """The dimensions of a decoder-only transformer that drive memory."""

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    tie_embeddings: bool = False

    @classmethod
    def from_hf_config(cls, config: Mapping[str, Any]) -> ModelShape:
        """Read a Hugging Face ``config.json`` dict (Llama/Qwen2/Mistral/Gemma-style keys)."""
        cfg = dict(config.get("text_config") or config)
        try:
            hidden = int(cfg["hidden_size"])
            heads = int(cfg["num_attention_heads"])
            shape = cls(
                vocab_size=int(cfg["vocab_size"]),
                hidden_size=hidden,
                intermediate_size=int(cfg.get("intermediate_size") or 4 * hidden),
                num_layers=int(cfg["num_hidden_layers"]),
                num_heads=heads,
                num_kv_heads=int(cfg.get("num_key_value_heads") or heads),
                head_dim=int(cfg.get("head_dim") or hidden // heads),
                tie_embeddings=bool(cfg.get("tie_word_embeddings", False)),
            )
        except (KeyError, TypeError, ValueError, ZeroDivisionError) as exc:
            raise ValueError(f"model config lacks a usable shape field: {exc}") from exc
        if min(asdict(shape)[k] for k in ("vocab_size", "hidden_size", "num_layers")) <= 0:
            raise ValueError("model config has non-positive dimensions")
        return shape

    def linear_shapes(self) -> dict[str, tuple[int, int]]:
        """(in, out) of each linear layer in one decoder layer, by module name."""
        q_out = self.num_heads * self.head_dim
        kv_out = self.num_kv_heads * self.head_dim
        h, i = self.hidden_size, self.intermediate_size
        return {
            "q_proj": (h, q_out),
            "k_proj": (h, kv_out),
            "v_proj": (h, kv_out),
            "o_proj": (q_out, h),
            "gate_proj": (h, i),
            "up_proj": (h, i),
            "down_proj": (i, h),
        }

    def linear_params(self) -> int:
        """Parameters in the decoder layers' linear projections (the part QLoRA quantises)."""
        per_layer = sum(a * b for a, b in self.linear_shapes().values())
        return per_layer * self.num_layers

    def other_params(self) -> int:
        """Embeddings, output head and norms (kept in the compute dtype)."""
        embed = self.vocab_size * self.hidden_size
        head = 0 if self.tie_embeddings else embed
        norms = (2 * self.num_layers + 1) * self.hidden_size
        return embed + head + norms

    def parameters(self) -> int:
        return self.linear_params() + self.other_params()

    @classmethod
    def from_config(cls, config: HFConfig) -> ModelShape:
        """From a loaded transformers config object (the trainer has one in hand)."""
        return cls.from_hf_config(config.to_dict())

    @property
    def body_matmul_params(self) -> int:
        """Weights of the decoder layers' projections (what LoRA adapts and QLoRA quantises)."""
        return self.linear_params()

    @property
    def head_params(self) -> int:
        """Weights of the output head (counted even when tied: it is still computed)."""
        return self.hidden_size * self.vocab_size

    def lora_params(self, rank: int) -> int:
        """LoRA parameters with ``rank`` on all seven projections of every layer."""
        per_layer = sum(rank * (d_in + d_out) for d_in, d_out in self.linear_shapes().values())
        return self.num_layers * per_layer


# Known model families, for when the operator cannot read config.json (hf:// is fetched by
# the trainer pod, not by the operator). Keys are matched against the model URI's name.
MODEL_FAMILIES: dict[str, ModelShape] = {
    "llama-3-70b": ModelShape(128256, 8192, 28672, 80, 64, 8, 128),
    "llama-3-8b": ModelShape(128256, 4096, 14336, 32, 32, 8, 128),
    "llama-3.2-3b": ModelShape(128256, 3072, 8192, 28, 24, 8, 128, tie_embeddings=True),
    "llama-3.2-1b": ModelShape(128256, 2048, 8192, 16, 32, 8, 64, tie_embeddings=True),
    "llama-2-7b": ModelShape(32000, 4096, 11008, 32, 32, 32, 128),
    "llama-2-13b": ModelShape(32000, 5120, 13824, 40, 40, 40, 128),
    "mistral-7b": ModelShape(32768, 4096, 14336, 32, 32, 8, 128),
    "gemma-7b": ModelShape(256000, 3072, 24576, 28, 16, 16, 256, tie_embeddings=True),
    "qwen2.5-0.5b": ModelShape(151936, 896, 4864, 24, 14, 2, 64, tie_embeddings=True),
    "qwen2.5-1.5b": ModelShape(151936, 1536, 8960, 28, 12, 2, 128, tie_embeddings=True),
    "qwen2.5-3b": ModelShape(151936, 2048, 11008, 36, 16, 2, 128, tie_embeddings=True),
    "qwen2.5-7b": ModelShape(152064, 3584, 18944, 28, 28, 4, 128),
    "qwen2.5-14b": ModelShape(152064, 5120, 13824, 48, 40, 8, 128),
}

# Name variants that mean a family above (matched after lower-casing).
_FAMILY_ALIASES: tuple[tuple[str, str], ...] = (
    (r"llama-3(\.[0-9])?-70b", "llama-3-70b"),
    (r"llama-3(\.1)?-8b", "llama-3-8b"),
    (r"llama-3\.2-3b", "llama-3.2-3b"),
    (r"llama-3\.2-1b", "llama-3.2-1b"),
    (r"llama-2-7b", "llama-2-7b"),
    (r"llama-2-13b", "llama-2-13b"),
    (r"mistral-7b", "mistral-7b"),
    (r"gemma(-1\.1)?-7b", "gemma-7b"),
    (r"qwen2(\.5)?-0\.5b", "qwen2.5-0.5b"),
    (r"qwen2(\.5)?-1\.5b", "qwen2.5-1.5b"),
    (r"qwen2(\.5)?-3b", "qwen2.5-3b"),
    (r"qwen2(\.5)?-7b", "qwen2.5-7b"),
    (r"qwen2(\.5)?-14b", "qwen2.5-14b"),
)


def family_from_uri(uri: str) -> str | None:
    """The known family a model URI names (hf://meta-llama/Meta-Llama-3-8B-Instruct -> llama-3-8b)."""
    name = split_scheme(uri)[1].split("@", 1)[0].lower()
    for pattern, family in _FAMILY_ALIASES:
        if re.search(pattern, name):
            return family
    return None


def shape_from_hint(hint: object) -> ModelShape:
    """A shape from the ``finetune.dev/model-shape`` annotation value (parsed JSON).

    Accepts ``{"family": "llama-3-8b"}``, a family name string, or a ``config.json``-style
    object (vocab_size, hidden_size, intermediate_size, num_hidden_layers, ...).
    """
    if isinstance(hint, str):
        hint = {"family": hint}
    if not isinstance(hint, Mapping):
        raise ValueError("model-shape hint must be a JSON object or a family name")
    family = hint.get("family")
    if family is not None:
        key = str(family).lower()
        if key not in MODEL_FAMILIES:
            known = ", ".join(sorted(MODEL_FAMILIES))
            raise ValueError(f"unknown model family {family!r}; known: {known}")
        return MODEL_FAMILIES[key]
    return ModelShape.from_hf_config(hint)


# ---------------------------------------------------------------- the estimate


@dataclass(frozen=True)
class TrainingSetup:
    """The settings of a run that drive memory."""

    method: str = "qlora"  # qlora | lora
    lora_rank: int = 16
    target_modules: tuple[str, ...] = ("all-linear",)
    micro_batch: int = 1
    seq_length: int = 2048
    gradient_checkpointing: bool = True
    optimizer: str = "paged_adamw_8bit"
    compute_dtype: str = "bfloat16"
    double_quant: bool = True
    gpus: int = 1

    @classmethod
    def from_spec(
        cls, spec: FineTuneJobSpec, *, micro_batch: int | None = None, gc: bool | None = None
    ) -> TrainingSetup:
        """From a ``FineTuneJobSpec``; batch/checkpointing from the spec unless given."""
        quant = spec.resolved_quantization()
        batch = micro_batch if micro_batch is not None else spec.training.batch_size
        checkpointing = gc if gc is not None else spec.training.gradient_checkpointing
        return cls(
            method=spec.method,
            lora_rank=spec.lora.r,
            target_modules=tuple(spec.lora.target_modules),
            micro_batch=batch if isinstance(batch, int) else 1,
            seq_length=spec.training.max_seq_length,
            gradient_checkpointing=True if checkpointing is None else bool(checkpointing),
            optimizer=spec.training.optimizer,
            compute_dtype=quant.compute_dtype if quant else "bfloat16",
            double_quant=quant.double_quant if quant else True,
            # DDP world size: every GPU of every node holds a full copy plus gradient buckets.
            gpus=max(1, spec.resources.gpus) * spec.resources.nodes,
        )


@dataclass(frozen=True)
class Estimate:
    """Predicted peak memory per GPU, with its parts (GiB)."""

    peak_gib: float
    breakdown: dict[str, float]
    parameters: int
    adapter_parameters: int
    setup: TrainingSetup

    def fits(self, gpu_memory_gib: float, headroom: float = 0.1) -> bool:
        return self.peak_gib <= gpu_memory_gib * (1.0 - headroom)


def adapted_modules(shape: ModelShape, target_modules: Iterable[str]) -> dict[str, tuple[int, int]]:
    """The linear modules of one layer that LoRA adapts (``all-linear``: every one)."""
    linears = shape.linear_shapes()
    targets = set(target_modules)
    if "all-linear" in targets:
        return linears
    chosen: dict[str, tuple[int, int]] = {}
    for name, dims in linears.items():
        for target in targets:
            pattern = target.replace(".", r"\.").replace("*", ".*")
            if re.fullmatch(pattern, name) or name.endswith(target):
                chosen[name] = dims
    return chosen


def estimate_memory(
    shape: ModelShape, setup: TrainingSetup, coeff: Coefficients = COEFFICIENTS
) -> Estimate:
    """Peak GiB per GPU of one training step with ``setup`` on a model of ``shape``."""
    dtype_bytes = DTYPE_BYTES.get(setup.compute_dtype, 2)
    tokens = setup.micro_batch * setup.seq_length
    layers = shape.num_layers

    if setup.method == "qlora":
        weights = shape.linear_params() * 0.5 + shape.other_params() * max(
            dtype_bytes, coeff.qlora_other_param_bytes
        )
        const_bytes = (
            coeff.quant_const_bytes_double if setup.double_quant else coeff.quant_const_bytes
        )
        quant_consts = shape.linear_params() * const_bytes
    else:
        weights = shape.parameters() * dtype_bytes
        quant_consts = 0.0

    modules = adapted_modules(shape, setup.target_modules)
    adapter_params = layers * sum(setup.lora_rank * (a + b) for a, b in modules.values())
    optimizer_bytes = OPTIMIZER_STATE_BYTES.get(setup.optimizer, 8.0)
    adapter = adapter_params * (
        coeff.adapter_weight_bytes + coeff.adapter_grad_bytes + optimizer_bytes
    )
    if setup.gpus > 1:
        adapter += adapter_params * coeff.ddp_bucket_bytes

    # Activations scale with dtype width relative to the bf16 calibration.
    dtype_scale = dtype_bytes / 2
    if setup.method == "qlora":
        dtype_scale *= coeff.qlora_activation_scale
    per_layer_token = (
        coeff.act_per_hidden * shape.hidden_size
        + coeff.act_per_intermediate * shape.intermediate_size
        + coeff.act_lora_per_input * sum(a for a, _ in modules.values())
    ) * dtype_scale
    if setup.gradient_checkpointing:
        saved = (
            tokens * layers * shape.hidden_size * coeff.checkpoint_bytes_per_hidden * dtype_scale
        )
        activations = saved + tokens * per_layer_token * coeff.checkpoint_live_layers
    else:
        activations = tokens * layers * per_layer_token
    logits = tokens * shape.vocab_size * coeff.logits_bytes * dtype_scale

    subtotal = weights + quant_consts + adapter + activations + logits
    overhead = subtotal * coeff.fragmentation + coeff.cuda_overhead_gib * GIB
    breakdown = {
        "weights": weights / GIB,
        "quantConstants": quant_consts / GIB,
        "adapterGradsOptimizer": adapter / GIB,
        "activations": activations / GIB,
        "logits": logits / GIB,
        "overhead": overhead / GIB,
    }
    breakdown = {k: round(v, 2) for k, v in breakdown.items()}
    peak = (subtotal + overhead) / GIB
    return Estimate(
        peak_gib=round(peak, 2),
        breakdown=breakdown,
        parameters=shape.parameters(),
        adapter_parameters=adapter_params,
        setup=setup,
    )


# ---------------------------------------------------------------- choices


# ``batchSize: auto`` never fills the GPU: the chosen micro-batch's estimate stays under
# (1 - AUTO_HEADROOM) of its memory, whatever smaller headroom the caller checks fits with.
# 15% covers the largest under-prediction seen on the calibration sweep held-out points plus
# allocator spikes the sweep's short runs may not reach (long runs, eval, checkpoint saves).
AUTO_HEADROOM = 0.15
# Tokens per micro-batch beyond which a larger micro-batch buys no throughput (an 8B model
# saturates an H100 well below this; docs/benchmarks.md) but costs optimizer steps and memory.
MAX_AUTO_TOKENS_PER_MICRO_BATCH = 16384
MAX_AUTO_BATCH = 32


def max_auto_batch(seq_length: int, limit: int = MAX_AUTO_BATCH) -> int:
    """The largest micro-batch ``auto`` may pick at ``seq_length`` (a power of two, >= 1)."""
    by_tokens = max(1, MAX_AUTO_TOKENS_PER_MICRO_BATCH // max(1, seq_length))
    return 1 << int(math.log2(max(1, min(limit, by_tokens))))


def choose_batch_and_checkpointing(
    shape: ModelShape,
    setup: TrainingSetup | Any,
    gpu_memory_gib: float,
    *,
    batch: int | None = None,
    gradient_checkpointing: bool | None = None,
    headroom: float = 0.1,
    max_batch: int = MAX_AUTO_BATCH,
) -> tuple[int, bool, Estimate]:
    """Resolve ``auto`` batch and unset checkpointing against ``gpu_memory_gib``.

    ``batch``/``gradient_checkpointing`` given by the user are kept. Among the rest, the
    largest power-of-two micro-batch wins whose estimate stays within ``1 - AUTO_HEADROOM``
    of the GPU (or ``1 - headroom`` when that is stricter) and whose tokens stay within
    ``MAX_AUTO_TOKENS_PER_MICRO_BATCH``; checkpointing stays off when the chosen batch fits
    without it, since it costs about a third more compute. When nothing fits,
    the smallest configuration is returned with an estimate whose ``fits`` is False.
    ``setup`` may also be a ``FineTuneJobSpec``; its fixed batch/checkpointing are kept.
    """
    if not isinstance(setup, TrainingSetup):
        spec = setup
        setup = TrainingSetup.from_spec(spec)
        if batch is None and isinstance(spec.training.batch_size, int):
            batch = spec.training.batch_size
        if gradient_checkpointing is None:
            gradient_checkpointing = spec.training.gradient_checkpointing
    gc_options = [gradient_checkpointing] if gradient_checkpointing is not None else [False, True]
    if batch is None:
        batches = _powers_of_two(max_auto_batch(setup.seq_length, max_batch))
        margin = max(headroom, AUTO_HEADROOM)
    else:
        batches, margin = [batch], headroom

    best: tuple[int, bool, Estimate] | None = None
    for gc in gc_options:
        for b in batches:
            est = estimate_memory(shape, replace(setup, micro_batch=b, gradient_checkpointing=gc))
            if not est.fits(gpu_memory_gib, margin):
                break
            if best is None or b > best[0]:
                best = (b, gc, est)
        # Checkpointing only when it buys a larger batch than none did, or when needed at all.
        if best is not None and gc is False and batch is None and best[0] >= 4:
            return best
    if best is not None:
        return best
    smallest = batches[0]
    gc = gc_options[-1]
    return (
        smallest,
        gc,
        estimate_memory(shape, replace(setup, micro_batch=smallest, gradient_checkpointing=gc)),
    )


def choose_for_spec(
    spec: FineTuneJobSpec,
    gpu_memory_gib: float,
    model_dir: str | None = None,
    *,
    headroom: float = 0.1,
) -> tuple[int, bool, Estimate]:
    """The trainer's entry point: read ``config.json`` from ``model_dir`` and choose.

    Falls back to the known family of ``spec.baseModel.uri`` when there is no readable
    config; raises ValueError when the shape cannot be found at all.
    """
    shape: ModelShape | None = None
    if model_dir is not None:
        import json
        from pathlib import Path

        config_file = Path(model_dir) / "config.json"
        if config_file.is_file():
            shape = ModelShape.from_hf_config(json.loads(config_file.read_text()))
    if shape is None:
        family = family_from_uri(spec.base_model.uri)
        if family is None:
            raise ValueError(
                f"no config.json in {model_dir} and {spec.base_model.uri} is no known family"
            )
        shape = MODEL_FAMILIES[family]
    return choose_batch_and_checkpointing(shape, spec, gpu_memory_gib, headroom=headroom)


def _powers_of_two(limit: int) -> list[int]:
    return [2**k for k in range(int(math.log2(limit)) + 1)]


@dataclass(frozen=True)
class Fix:
    """A concrete change that makes the job fit, with the estimate that proves it."""

    change: str
    peak_gib: float

    def __str__(self) -> str:
        return f"{self.change} (predicted {self.peak_gib:.1f} GiB)"


def suggest_fixes(
    shape: ModelShape,
    setup: TrainingSetup,
    gpu_memory_gib: float,
    *,
    headroom: float = 0.1,
) -> list[Fix]:
    """Changes to ``setup`` that would make it fit, each verified with the estimator.

    Single changes come first (checkpointing, a smaller micro-batch, QLoRA, an 8-bit
    optimiser); only when none fits alone are combinations and shorter sequences tried.
    """

    def fits(candidate: TrainingSetup) -> Estimate | None:
        est = estimate_memory(shape, candidate)
        return est if est.fits(gpu_memory_gib, headroom) else None

    def with_largest_batch(candidate: TrainingSetup) -> tuple[TrainingSetup, Estimate] | None:
        for b in _powers_of_two(max(1, candidate.micro_batch))[::-1]:
            est = fits(replace(candidate, micro_batch=b))
            if est is not None:
                return replace(candidate, micro_batch=b), est
        return None

    def describe(candidate: TrainingSetup) -> str:
        parts = []
        if candidate.method != setup.method:
            parts.append(f"method: {candidate.method}")
        if candidate.gradient_checkpointing != setup.gradient_checkpointing:
            parts.append(
                f"training.gradientCheckpointing: {str(candidate.gradient_checkpointing).lower()}"
            )
        if candidate.optimizer != setup.optimizer:
            parts.append(f"training.optimizer: {candidate.optimizer}")
        if candidate.micro_batch != setup.micro_batch:
            parts.append(f"training.batchSize: {candidate.micro_batch}")
        if candidate.seq_length != setup.seq_length:
            parts.append(f"training.maxSeqLength: {candidate.seq_length}")
        if candidate.lora_rank != setup.lora_rank:
            parts.append(f"lora.r: {candidate.lora_rank}")
        text = "set " + ", ".join(parts)
        if candidate.micro_batch < setup.micro_batch:
            text += " (raise training.gradientAccumulation to keep the effective batch)"
        return text

    singles = [replace(setup, gradient_checkpointing=True)]
    if setup.method == "lora":
        singles.append(replace(setup, method="qlora"))
    if OPTIMIZER_STATE_BYTES.get(setup.optimizer, 8.0) > 2.0:
        singles.append(replace(setup, optimizer="paged_adamw_8bit"))
    fixes: list[Fix] = []
    seen: set[TrainingSetup] = set()

    def add(candidate: TrainingSetup, est: Estimate) -> None:
        if candidate != setup and candidate not in seen:
            seen.add(candidate)
            fixes.append(Fix(describe(candidate), est.peak_gib))

    for candidate in singles:
        est = fits(candidate)
        if est is not None:
            add(candidate, est)
    smaller = with_largest_batch(replace(setup, micro_batch=max(1, setup.micro_batch // 2)))
    if setup.micro_batch > 1 and smaller is not None:
        add(*smaller)
    if fixes:
        return fixes

    lean = replace(setup, gradient_checkpointing=True, optimizer="paged_adamw_8bit")
    combos = [lean, replace(lean, method="qlora")]
    for combo in combos:
        found = with_largest_batch(combo)
        if found is not None:
            add(*found)
    if fixes:
        return fixes
    leanest = replace(lean, method="qlora", micro_batch=1)
    seq = setup.seq_length
    while seq > 256:
        seq //= 2
        est = fits(replace(leanest, seq_length=seq))
        if est is not None:
            add(replace(leanest, seq_length=seq), est)
            return fixes
    if setup.lora_rank > 8:
        candidate = replace(leanest, seq_length=max(seq, 256), lora_rank=8)
        est = fits(candidate)
        if est is not None:
            add(candidate, est)
    return fixes
