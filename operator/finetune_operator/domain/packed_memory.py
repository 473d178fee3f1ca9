"""Peak GPU memory of packed (padding-free) LoRA/QLoRA training, and the token budget to use.

The packed counterpart of :mod:`finetune_operator.domain.estimator`, which models padded batches of
rows. With packing a micro-batch is a number of tokens, not rows, and the memory depends on
tokens only. Both the operator (the fit check of a FineTuneJob with ``training.packing``)
and the trainer's fast path (``finetune_trainer.fastpath``, which plans from the memory the
GPU really has free) use this module, so what status promises is what the trainer does.

Calibrated on an H100 (docs/benchmarks.md, "VRAM estimator accuracy"). Pure: no torch.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

from .estimator import ModelShape

GIB = 1024**3

# Token budgets the planner tries, largest first. Every micro-batch costs the host a fixed
# ~0.4 s of kernel launches on an 8B model (thousands of small LoRA, norm and optimiser
# kernels), so larger micro-batches keep the GPU busier (docs/benchmarks.md).
TOKEN_BUDGETS = (32768, 24576, 16384, 12288, 8192, 6144, 4096, 3072, 2048)
# The planner drops checkpointing only when it can keep at least this many tokens in flight.
MIN_TOKENS_WITHOUT_CHECKPOINTING = 8192
# The fast path's LoRA dropout draws its mask again in the backward pass instead of keeping a
# copy of every adapted input (finetune_trainer.lora_dropout, decision 1980). The operator's
# fit check and the trainer both plan with it.
FAST_PATH_FUSED_LORA_DROPOUT = True

# Activation offload (checkpointed runs only): the saved layer inputs wait in pinned host
# memory; on the GPU only the inputs of the layers being copied or recomputed remain.
OFFLOAD_LAYERS_IN_FLIGHT = 2
# Offload is considered only while plain checkpointing reaches fewer tokens than this: past
# it a larger micro-batch gains little (8,192 -> 16,384 tokens: +5% on the 8B shape).
OFFLOAD_BELOW_TOKENS = 16384
# ... and chosen only when it fits at least this many times plain checkpointing's tokens.
# Measured on an H100 (8B shape, 16,384 tokens): the copies overlap compute, 0.5% slower than
# plain checkpointing, 2.7 GiB less GPU memory (docs/benchmarks.md, decision 2100); the gain
# asked for stays high because each run also pins host memory.
OFFLOAD_MIN_TOKEN_GAIN = 2.0
# Pinned host memory the offloaded inputs may take: this share of the trainer container's
# memory limit (its request when there is no limit); the rest loads the model and the data.
OFFLOAD_HOST_SHARE = 0.5
# Whether the planner chooses offload by itself (activation_offload=None), for the operator's
# fit check and the trainer alike (decision 2100; an explicit False in a benchmark turns it off).
AUTO_ACTIVATION_OFFLOAD = True
# How much the memory model may over-predict a checkpointed run. The measured runs, four
# families among them, are within 10% (docs/benchmarks.md, "VRAM estimator accuracy"); 15%
# also covers shapes not measured. When even the smallest checkpointed micro-batch is predicted
# over the budget, but by no more than this share, the run may still fit: the operator does
# not refuse it (Fits=Unknown) and the trainer tries that micro-batch (decision 2050).
PREDICTION_MARGIN = 0.15


# --------------------------------------------------------------------------------------------
# Memory planning (pure)
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class MemoryCoefficients:
    """Constants of the memory model (bytes).

    Fitted on an H100 80GB against the peak of PyTorch's reserved memory with expandable
    allocator segments (as the trainer runs), 30 runs: the Llama-3-8B shape, QLoRA r=64 on all
    projections, at 3,072-32,768 tokens with checkpointing, with and without activation
    offload, and 8,192-12,288 without checkpointing, with dropout 0 and 0.05 (PEFT's and the
    fused one); Qwen2.5-7B, Mistral-7B and Gemma-7B at 4,096 and 16,384 checkpointed tokens
    (bench/results/h100-2026-12-07/grid.json, h100-2026-12-07b/*.json); Qwen2.5-0.5B and 3B at
    r=16 (bench/results/h100-2026-11-23/packed-qwen2.5-*.json). Every run is predicted within
    10% (worst +8.9%), none under by more than 3.0% (``bench/compare_packed_memory.py --fit``,
    which weighs an under-prediction three times an over-prediction; docs/benchmarks.md).
    """

    # Activations kept per token per layer without checkpointing (bf16, LoRA on all
    # projections, no LoRA dropout): act_per_hidden * hidden + act_per_intermediate *
    # intermediate: about 170 KB per token and layer on the 8B shape.
    act_per_hidden: float = 22.52
    act_per_intermediate: float = 5.36
    # PEFT's LoRA dropout keeps its output (and mask) for every adapted projection's input:
    # six hidden-wide inputs and one intermediate-wide one per layer. Bytes per input element,
    # measured: 16 GiB more at 8,192 tokens on the 8B shape with dropout 0.05 than with 0.
    # Not counted when the dropout keeps no inputs (``dropout_saves_inputs=False``).
    dropout_bytes_per_input: float = 1.84
    # With checkpointing: the saved layer inputs (2 bytes x hidden x layers per token) plus
    # this many layers' worth of activations alive during one layer's recompute and backward
    # (fitted).
    recompute_layer_factor: float = 1.29
    # CUDA context and library handles, outside PyTorch's reserved figure.
    overhead_bytes: float = 0.5 * GIB
    # Allocator slack on top of the live bytes (absorbed by the fit above).
    fragmentation: float = 1.0


# The coefficients every prediction uses unless given others (a benchmark may set its own fit).
COEFFICIENTS = MemoryCoefficients()


@dataclass(frozen=True)
class MicroBatchPlan:
    tokens_per_micro_batch: int
    gradient_checkpointing: bool
    predicted_peak_gib: float
    memory_budget_gib: float
    reason: str
    candidates: list[dict[str, Any]] = field(default_factory=list)
    # Checkpointed layer inputs kept in pinned host memory (offload_host_bytes of them).
    activation_offload: bool = False
    offload_host_bytes: int = 0
    # Predicted over the budget, but by less than PREDICTION_MARGIN: the smallest
    # checkpointed micro-batch, to be tried (carried by WithinPredictionMargin).
    within_prediction_margin: bool = False

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


class WithinPredictionMargin(ValueError):
    """Nothing fits by the prediction, but the smallest checkpointed micro-batch is over the
    budget by less than the model's uncertainty (``PREDICTION_MARGIN``): it may really fit.

    ``plan`` is that configuration (``within_prediction_margin=True``), for a caller that
    tries it rather than refusing. A plain ValueError means clearly too large.
    """

    def __init__(self, message: str, plan: MicroBatchPlan) -> None:
        super().__init__(message)
        self.plan = plan


def within_prediction_margin(peak_gib: float, memory_budget_gib: float) -> bool:
    """Whether a predicted peak over the budget is within the model's over-prediction: the
    real peak may be as low as peak / (1 + PREDICTION_MARGIN)."""
    return peak_gib <= memory_budget_gib * (1 + PREDICTION_MARGIN)


def weight_bytes(shape: ModelShape, method: str) -> float:
    """Frozen weights: 4-bit nf4 (double quant) for QLoRA, bf16 for LoRA; embeddings stay bf16."""
    body = shape.body_matmul_params
    per_param = (4.0 + 0.127) / 8.0 if method == "qlora" else 2.0
    embeddings = shape.vocab_size * shape.hidden_size * 2.0
    head = 0.0 if shape.tie_embeddings else shape.head_params * 2.0
    norms = shape.num_layers * 2 * shape.hidden_size * 2.0
    return body * per_param + embeddings + head + norms


def trainable_state_bytes(
    shape: ModelShape, lora_rank: int, optimizer: str, method: str = "qlora"
) -> float:
    """LoRA weights and their gradients, and the optimiser's two moments where PyTorch's
    allocator holds them.

    On a 4-bit base TRL casts the trainable adapters to bf16 (as the QLoRA paper does; TRL 1.16
    ``SFTTrainer.__init__``, also for a PeftModel passed in), so weights and gradients take
    2 bytes each; on a 16-bit base PEFT's ``autocast_adapter_dtype`` keeps them in fp32. The
    measured memory before the first step agrees: 5.65 GiB on the Llama-3-8B shape at r=64 is
    the 4-bit weights plus bf16 adapters (fp32 ones would be 0.31 GiB more). bitsandbytes'
    paged optimisers keep their moments in managed memory that the driver pages out to the host
    under pressure, so they do not count."""
    n = shape.lora_params(lora_rank)
    param_bytes = 2.0 if method == "qlora" else 4.0
    if "paged" in optimizer:
        moments = 0.0
    elif "8bit" in optimizer:
        moments = 2.0
    else:
        moments = 8.0
    return n * (2 * param_bytes + moments)


# Attention's saved tensors scale with the query and key/value widths, not the hidden size:
# the varlen kernel keeps the rotated query and its output (q width), and the rotated key and
# the value (kv width each), in 16 bits. The fitted coefficients hold them for the measured
# shapes, whose query width equals the hidden size and whose kv width is at most a quarter of
# it (Llama-3-8B). Wider attention (Gemma-7B: 16 heads of 256 on a hidden size of 3,072, and
# as many kv heads) is counted on top; a shape within those bounds gets nothing extra. Measured
# on Gemma-7B: +4.0% at 4,096 checkpointed tokens, +1.5% at 16,384 (+3.0% and -1.0% without
# this term: it is small against the rest, and keeps the large-token side from under-predicting).
ATTENTION_BYTES_PER_QUERY_UNIT = 4.0
ATTENTION_BYTES_PER_KV_UNIT = 4.0
FITTED_KV_SHARE = 0.25


def wide_attention_bytes_per_token_layer(shape: ModelShape) -> float:
    """Activation bytes per token and layer of attention wider than the fitted shapes'."""
    projections = shape.linear_shapes()
    q_width, kv_width = projections["q_proj"][1], projections["k_proj"][1]
    extra_q = max(0, q_width - shape.hidden_size)
    extra_kv = max(0.0, kv_width - FITTED_KV_SHARE * shape.hidden_size)
    return ATTENTION_BYTES_PER_QUERY_UNIT * extra_q + ATTENTION_BYTES_PER_KV_UNIT * extra_kv


def activation_bytes(
    shape: ModelShape,
    tokens: int,
    gradient_checkpointing: bool,
    coef: MemoryCoefficients | None = None,
    lora_dropout: float = 0.05,
    activation_offload: bool = False,
    dropout_saves_inputs: bool = True,
) -> float:
    """Activation memory of one micro-batch of ``tokens`` packed tokens (on the GPU: with
    ``activation_offload`` the saved layer inputs but a few in flight are in host memory).

    ``dropout_saves_inputs``: whether LoRA dropout keeps a copy of every adapted input
    (PEFT's own dropout) or draws its mask again in the backward pass (the fast path's).
    """
    coef = coef or COEFFICIENTS
    per_token_layer = (
        coef.act_per_hidden * shape.hidden_size
        + coef.act_per_intermediate * shape.intermediate_size
        + wide_attention_bytes_per_token_layer(shape)
    )
    if lora_dropout > 0 and dropout_saves_inputs:
        adapted_inputs = 6 * shape.hidden_size + shape.intermediate_size
        per_token_layer += coef.dropout_bytes_per_input * adapted_inputs
    if gradient_checkpointing:
        saved_layers = shape.num_layers
        if activation_offload:
            saved_layers = min(shape.num_layers, OFFLOAD_LAYERS_IN_FLIGHT)
        saved_inputs = saved_layers * tokens * shape.hidden_size * 2.0
        return saved_inputs + coef.recompute_layer_factor * per_token_layer * tokens
    return shape.num_layers * per_token_layer * tokens


def offloaded_bytes(shape: ModelShape, tokens: int) -> int:
    """Pinned host memory of an offloaded micro-batch: every layer's 16-bit input."""
    return shape.num_layers * tokens * shape.hidden_size * 2


def offload_host_budget_bytes(container_memory_bytes: float | None) -> float | None:
    """The host memory offload may pin in a container of this much memory (None: unknown,
    no limit)."""
    if container_memory_bytes is None:
        return None
    return OFFLOAD_HOST_SHARE * container_memory_bytes


# TRL's chunked log-probability head (trl.kernels.chunked_logprob, TRL 1.15-1.16) projects at
# most this many tokens onto at most this many vocabulary entries at a time, into one reused
# 16-bit tile; the full logits never exist.
HEAD_TOKEN_TILE = 4096
HEAD_VOCAB_TILE = 32768


def head_bytes(shape: ModelShape, tokens: int) -> float:
    """The chunked LM head: the final hidden states and the copy of them the head saves (16-bit),
    their fp32 gradient accumulator, and the one projection tile it reuses."""
    hidden = tokens * shape.hidden_size * (2.0 + 2.0 + 4.0)
    tile = min(tokens, HEAD_TOKEN_TILE) * min(shape.vocab_size, HEAD_VOCAB_TILE) * 2.0
    return hidden + tile


def peak_breakdown_bytes(
    shape: ModelShape,
    *,
    method: str,
    lora_rank: int,
    tokens: int,
    gradient_checkpointing: bool,
    optimizer: str = "paged_adamw_8bit",
    coef: MemoryCoefficients | None = None,
    lora_dropout: float = 0.05,
    activation_offload: bool = False,
    dropout_saves_inputs: bool = True,
) -> dict[str, float]:
    """The parts of the predicted peak (bytes); they add up to :func:`predict_peak_bytes`."""
    activations = activation_bytes(
        shape,
        tokens,
        gradient_checkpointing,
        coef,
        lora_dropout,
        activation_offload=activation_offload,
        dropout_saves_inputs=dropout_saves_inputs,
    )
    live = {
        "weights": weight_bytes(shape, method),
        "adapterAndOptimizer": trainable_state_bytes(shape, lora_rank, optimizer, method),
        "activations": activations,
        "outputHead": head_bytes(shape, tokens),
    }
    coef = coef or COEFFICIENTS
    parts = {k: v * coef.fragmentation for k, v in live.items()}
    parts["overhead"] = coef.overhead_bytes
    return parts


def predict_peak_bytes(shape: ModelShape, **settings: Any) -> float:
    """Predicted peak of reserved GPU memory for one training step (keyword arguments as
    :func:`peak_breakdown_bytes`)."""
    return sum(peak_breakdown_bytes(shape, **settings).values())


def plan_micro_batch(
    shape: ModelShape,
    *,
    method: str,
    lora_rank: int,
    max_seq_length: int,
    memory_budget_gib: float,
    optimizer: str = "paged_adamw_8bit",
    gradient_checkpointing: bool | None = None,
    tokens_per_micro_batch: int | None = None,
    coef: MemoryCoefficients | None = None,
    lora_dropout: float = 0.05,
    activation_offload: bool | None = None,
    host_memory_gib: float | None = None,
    dropout_saves_inputs: bool = True,
) -> MicroBatchPlan:
    """Pick the packed token budget, checkpointing and activation offload for a memory budget.

    Without checkpointing a step does a third less work, so it wins whenever at least
    ``MIN_TOKENS_WITHOUT_CHECKPOINTING`` tokens still fit; otherwise the largest budget that
    fits with checkpointing. When that stays below ``OFFLOAD_BELOW_TOKENS`` (or nothing
    fits), checkpointing with the saved inputs offloaded to host memory is taken if it fits
    at least ``OFFLOAD_MIN_TOKEN_GAIN`` times the tokens, and its pinned inputs fit
    ``OFFLOAD_HOST_SHARE`` of ``host_memory_gib`` (the container's memory; None: unknown).
    ``gradient_checkpointing`` and ``activation_offload`` force their choice when given
    (offload needs checkpointing), and ``tokens_per_micro_batch`` the budget. Every budget
    is at least ``max_seq_length`` so the longest row always fits one micro-batch.

    When nothing fits: :class:`WithinPredictionMargin` (with the smallest checkpointed plan)
    if that plan is over the budget by no more than ``PREDICTION_MARGIN``, else ValueError;
    both say what to change.
    """
    if memory_budget_gib <= 0:
        raise ValueError("memory_budget_gib must be positive")
    if activation_offload and gradient_checkpointing is False:
        raise ValueError("activation offload keeps checkpointed inputs: it needs checkpointing")
    budget = memory_budget_gib * GIB
    floor = max(max_seq_length, min(TOKEN_BUDGETS))
    if tokens_per_micro_batch is not None:
        floor = max(max_seq_length, tokens_per_micro_batch)
        sizes = [floor]
    else:
        sizes = sorted({max(t, floor) for t in TOKEN_BUDGETS}, reverse=True)
    candidates: list[dict[str, Any]] = []
    host_budget = offload_host_budget_bytes(
        host_memory_gib * GIB if host_memory_gib is not None else None
    )

    def fits(tokens: int, gc: bool, offload: bool = False) -> float | None:
        peak = predict_peak_bytes(
            shape,
            method=method,
            lora_rank=lora_rank,
            tokens=tokens,
            gradient_checkpointing=gc,
            optimizer=optimizer,
            coef=coef,
            lora_dropout=lora_dropout,
            activation_offload=offload,
            dropout_saves_inputs=dropout_saves_inputs,
        )
        candidate: dict[str, Any] = {
            "tokens": tokens, "gradientCheckpointing": gc, "peakGiB": round(peak / GIB, 2)
        }  # fmt: skip
        if offload:
            candidate["activationOffload"] = True
        candidates.append(candidate)
        return peak if peak <= budget else None

    def offloaded(tokens: int, peak: float) -> MicroBatchPlan:
        host = offloaded_bytes(shape, tokens)
        return MicroBatchPlan(
            tokens, True, round(peak / GIB, 2), memory_budget_gib,
            f"{tokens} tokens fit with checkpointing and activation offload "
            f"({host / GIB:.1f} GiB of host memory)",
            candidates, activation_offload=True, offload_host_bytes=host,
        )  # fmt: skip

    def host_fits(tokens: int) -> bool:
        return host_budget is None or offloaded_bytes(shape, tokens) <= host_budget

    if gradient_checkpointing is not True and not activation_offload:
        for tokens in sizes:
            too_few = tokens < MIN_TOKENS_WITHOUT_CHECKPOINTING and tokens_per_micro_batch is None
            if too_few and gradient_checkpointing is None:
                break
            peak = fits(tokens, False)
            if peak is not None:
                return MicroBatchPlan(
                    tokens, False, round(peak / GIB, 2), memory_budget_gib,
                    f"{tokens} tokens fit without checkpointing", candidates,
                )  # fmt: skip
    best: tuple[int, float] | None = None
    if gradient_checkpointing is not False and not activation_offload:
        for tokens in sizes:
            peak = fits(tokens, True)
            if peak is not None:
                best = (tokens, peak)
                break
    asked = activation_offload is True or (activation_offload is None and AUTO_ACTIVATION_OFFLOAD)
    may_offload = asked and gradient_checkpointing is not False
    if may_offload and (activation_offload or best is None or best[0] < OFFLOAD_BELOW_TOKENS):
        for tokens in sizes:
            if best is not None and tokens <= best[0]:
                break
            if not host_fits(tokens):
                continue
            peak = fits(tokens, True, offload=True)
            if peak is None:
                continue
            if activation_offload or best is None or tokens >= OFFLOAD_MIN_TOKEN_GAIN * best[0]:
                return offloaded(tokens, peak)
            break
    if best is not None:
        tokens, peak = best
        return MicroBatchPlan(
            tokens, True, round(peak / GIB, 2), memory_budget_gib,
            f"{tokens} tokens fit with checkpointing", candidates,
        )  # fmt: skip
    smallest_gc = gradient_checkpointing is not False
    smallest_offload = bool(may_offload and host_fits(floor))
    smallest = predict_peak_bytes(
        shape,
        method=method,
        lora_rank=lora_rank,
        tokens=floor,
        gradient_checkpointing=smallest_gc,
        optimizer=optimizer,
        coef=coef,
        lora_dropout=lora_dropout,
        activation_offload=smallest_offload,
        dropout_saves_inputs=dropout_saves_inputs,
    )
    hint = ""
    if may_offload and not host_fits(floor) and fits(floor, True, offload=True) is not None:
        needed = offloaded_bytes(shape, floor) / OFFLOAD_HOST_SHARE / GIB
        hint = (
            f"; or at least {needed:.1f} GiB of container memory (resources.memory) for "
            "activation offload"
        )
    need = (
        f"even {floor} tokens per micro-batch need about {smallest / GIB:.1f} GiB, more than the "
        f"{memory_budget_gib:.1f} GiB budget"
    )
    advice = f"use method qlora, a smaller maxSeqLength or a larger GPU{hint}"
    # Only the smallest checkpointed configuration gets the benefit of the doubt.
    if smallest_gc and within_prediction_margin(smallest / GIB, memory_budget_gib):
        host = offloaded_bytes(shape, floor) if smallest_offload else 0
        plan = MicroBatchPlan(
            floor, True, round(smallest / GIB, 2), memory_budget_gib,
            f"{floor} tokens with checkpointing are predicted at {smallest / GIB:.1f} GiB, over "
            f"the {memory_budget_gib:.1f} GiB budget but within the memory model's "
            f"{PREDICTION_MARGIN:.0%} prediction margin",
            candidates, activation_offload=smallest_offload, offload_host_bytes=host,
            within_prediction_margin=True,
        )  # fmt: skip
        raise WithinPredictionMargin(
            f"{need}, but by less than the memory model's {PREDICTION_MARGIN:.0%} prediction "
            f"margin, so it may fit; if it runs out of memory: {advice}",
            plan,
        )
    raise ValueError(f"{need}: {advice}")


def plan_or_replace(
    shape: ModelShape,
    *,
    gradient_checkpointing: bool | None = None,
    tokens_per_micro_batch: int | None = None,
    activation_offload: bool | None = None,
    **settings: Any,
) -> tuple[MicroBatchPlan, str | None]:
    """Plan with the requested budget, checkpointing and offload; when they do not fit, the
    planner's own choice. Both the operator's fit check and the trainer's fast path follow this rule
    (a batch resolved for padded rows may not fit once packed).

    Returns the plan and, when the request was replaced, why it did not fit. Raises
    WithinPredictionMargin when nothing fits by the prediction but the smallest checkpointed
    budget is within the model's uncertainty, ValueError when no budget fits at all.
    ``settings`` as :func:`plan_micro_batch`.
    """
    try:
        plan = plan_micro_batch(
            shape,
            gradient_checkpointing=gradient_checkpointing,
            tokens_per_micro_batch=tokens_per_micro_batch,
            activation_offload=activation_offload,
            **settings,
        )
        return plan, None
    except ValueError as exc:
        requested = (gradient_checkpointing, tokens_per_micro_batch, activation_offload)
        if requested == (None, None, None):
            raise
        return plan_micro_batch(shape, **settings), str(exc)
