"""The fast path's pure parts (planner, FLOPs) and its attention, checked on the CPU.

The attention test is the correctness contract of packing: a packed row with restarting
position ids must give every sequence exactly the logits it gets alone.
"""

from __future__ import annotations

import os
from typing import Any

import pytest
from finetune_operator.domain.estimator import ModelShape
from finetune_operator.domain.packed_memory import (
    PREDICTION_MARGIN,
    MemoryCoefficients,
    WithinPredictionMargin,
    plan_micro_batch,
    plan_or_replace,
    predict_peak_bytes,
)
from finetune_trainer import fastpath

os.environ["HF_HUB_OFFLINE"] = "1"

LLAMA3_8B = ModelShape(
    hidden_size=4096,
    num_layers=32,
    num_heads=32,
    num_kv_heads=8,
    head_dim=128,
    intermediate_size=14336,
    vocab_size=128256,
)
GIB = 1024**3


@pytest.fixture
def without_offload(monkeypatch: pytest.MonkeyPatch) -> None:
    """Plain checkpointing only: the margin's zones as they are where the planner may not
    offload (offload's own zones are tested with the switch on)."""
    from finetune_operator.domain import packed_memory

    monkeypatch.setattr(packed_memory, "AUTO_ACTIVATION_OFFLOAD", False)


def test_lora_params_of_llama3_8b_r64() -> None:
    # r * (in + out) for q, k, v, o, gate, up, down, times 32 layers: the well-known 168M.
    assert LLAMA3_8B.lora_params(64) == 167_772_160
    assert LLAMA3_8B.body_matmul_params == 32 * 218_103_808


def test_predicted_peak_grows_with_tokens_and_without_checkpointing() -> None:
    def peak(tokens: int, gc: bool) -> float:
        return predict_peak_bytes(
            LLAMA3_8B, method="qlora", lora_rank=64, tokens=tokens, gradient_checkpointing=gc
        )

    assert peak(8192, True) < peak(16384, True)
    assert peak(8192, True) < peak(8192, False)
    assert peak(4096, False) < peak(8192, False)


def prediction_error(shape: Any, measured_reserved_gib: float, **settings: Any) -> float:
    """Predicted peak over measured - 1; the measured figure is PyTorch's reserved peak, to
    which the CUDA context the model counts as overhead is added."""
    predicted = predict_peak_bytes(shape, **settings)
    return predicted / (measured_reserved_gib * GIB + MemoryCoefficients().overhead_bytes) - 1


# Peak reserved GiB on the H100 with expandable allocator segments, as the trainer runs
# (Llama-3-8B shape, QLoRA r=64 on all projections; the fast path's dropout keeps no inputs):
# bench/results/h100-2026-12-07/grid.json.
H100_PEAKS = [
    (4096, True, False, 0.0, 7.80),
    (8192, True, False, 0.0, 9.62),
    (16384, True, False, 0.0, 13.29),
    (16384, True, True, 0.0, 10.55),
    (12288, False, False, 0.0, 62.86),
    (12288, False, False, 0.05, 63.20),
    # the planner's own picks and two more sizes (bench/results/h100-2026-12-07b)
    (32768, True, False, 0.0, 20.95),
    (3072, True, True, 0.0, 6.79),
    (6144, True, True, 0.0, 7.72),
    (8192, True, True, 0.0, 8.17),
    (12288, True, True, 0.0, 9.35),
    (8192, False, False, 0.05, 43.96),
]


@pytest.mark.parametrize(("tokens", "gc", "offload", "dropout", "measured_gib"), H100_PEAKS)
def test_memory_model_matches_the_h100_measurements(
    tokens: int, gc: bool, offload: bool, dropout: float, measured_gib: float
) -> None:
    """Within 10%, and never under by more than 4%."""
    error = prediction_error(
        LLAMA3_8B,
        measured_gib,
        method="qlora",
        lora_rank=64,
        tokens=tokens,
        gradient_checkpointing=gc,
        activation_offload=offload,
        lora_dropout=dropout,
        dropout_saves_inputs=False,
    )
    assert -0.04 <= error <= 0.10


# Other shapes, expandable allocator segments as the trainer sets them: Qwen2.5 at r=16 with
# PEFT's dropout 0.05 (it keeps its inputs; bench/results/h100-2026-11-23/packed-qwen2.5-*.json),
# and checkpointed at r=64 with dropout 0 (bench/results/h100-2026-12-07b/memory-*.json) a small
# vocabulary (Mistral), a wide MLP and large vocabulary (Qwen2.5-7B), and wide attention heads
# with a 256k vocabulary (Gemma-7B: 16 heads of 256 on a hidden size of 3,072).
OTHER_SHAPE_PEAKS = [
    # family, rank, tokens, checkpointing, dropout, measured GiB
    ("qwen2.5-0.5b", 16, 16384, False, 0.05, 23.96),
    ("qwen2.5-0.5b", 16, 8192, False, 0.05, 12.61),
    ("qwen2.5-0.5b", 16, 32768, True, 0.05, 4.37),
    ("qwen2.5-3b", 16, 8192, False, 0.05, 41.26),
    ("qwen2.5-3b", 16, 32768, True, 0.05, 12.26),
    ("mistral-7b", 64, 4096, True, 0.0, 6.36),
    ("mistral-7b", 64, 16384, True, 0.0, 11.84),
    ("qwen2.5-7b", 64, 4096, True, 0.0, 7.49),
    ("qwen2.5-7b", 64, 16384, True, 0.0, 12.80),
    ("gemma-7b", 64, 4096, True, 0.0, 7.68),
    ("gemma-7b", 64, 16384, True, 0.0, 13.28),
]


@pytest.mark.parametrize(
    ("family", "rank", "tokens", "gc", "dropout", "measured_gib"), OTHER_SHAPE_PEAKS
)
def test_memory_model_matches_other_shapes(
    family: str, rank: int, tokens: int, gc: bool, dropout: float, measured_gib: float
) -> None:
    from finetune_operator.domain.estimator import MODEL_FAMILIES

    error = prediction_error(
        MODEL_FAMILIES[family],
        measured_gib,
        method="qlora",
        lora_rank=rank,
        tokens=tokens,
        gradient_checkpointing=gc,
        lora_dropout=dropout,
    )
    assert -0.04 <= error <= 0.10


def test_qlora_adapters_are_counted_in_bf16_and_lora_adapters_in_fp32() -> None:
    """TRL casts the adapters of a 4-bit base to bf16; PEFT keeps a 16-bit base's in fp32.
    Paged optimiser moments live outside PyTorch's reserved memory; others count."""
    from finetune_operator.domain.packed_memory import trainable_state_bytes

    n = LLAMA3_8B.lora_params(64)
    assert trainable_state_bytes(LLAMA3_8B, 64, "paged_adamw_8bit", "qlora") == n * 4
    assert trainable_state_bytes(LLAMA3_8B, 64, "paged_adamw_8bit", "lora") == n * 8
    assert trainable_state_bytes(LLAMA3_8B, 64, "adamw_torch", "qlora") == n * 12


def test_lora_dropout_costs_memory_without_checkpointing() -> None:
    def peak(dropout: float) -> float:
        return predict_peak_bytes(
            LLAMA3_8B,
            method="qlora",
            lora_rank=64,
            tokens=8192,
            gradient_checkpointing=False,
            lora_dropout=dropout,
        )

    assert peak(0.05) - peak(0.0) == pytest.approx(16.2 * GIB, rel=0.1)  # measured: 16.2 GiB
    assert peak(0.3) == peak(0.05)  # the copy is kept whatever the rate


@pytest.mark.parametrize("gc", [False, True])
def test_dropout_that_keeps_no_inputs_costs_what_no_dropout_costs(gc: bool) -> None:
    def peak(dropout: float, saves_inputs: bool) -> float:
        return predict_peak_bytes(
            LLAMA3_8B,
            method="qlora",
            lora_rank=64,
            tokens=8192,
            gradient_checkpointing=gc,
            lora_dropout=dropout,
            dropout_saves_inputs=saves_inputs,
        )

    assert peak(0.05, False) == peak(0.0, True) < peak(0.05, True)


def test_fast_path_and_operator_default_to_the_fused_dropout() -> None:
    import inspect

    from finetune_operator.domain.packed_memory import FAST_PATH_FUSED_LORA_DROPOUT

    default = inspect.signature(fastpath.apply).parameters["fused_lora_dropout"].default
    assert default is FAST_PATH_FUSED_LORA_DROPOUT is True


@pytest.mark.parametrize(
    ("budget", "dropout", "tokens", "gc"),
    [
        (70, 0.05, 8192, False),  # the whole H100: no recomputation beats a larger batch
        (70, 0.0, 12288, False),  # without dropout's copies a larger batch fits
        # a 24 GB card: the largest checkpointed batch that fits; PEFT's dropout keeps copies
        # of one layer's inputs during its recompute (32,768 tokens measured 25.3 GiB with it)
        (24, 0.05, 24576, True),
        (24, 0.0, 32768, True),
    ],
)
def test_planner_choices_on_the_8b_shape(
    budget: float, dropout: float, tokens: int, gc: bool
) -> None:
    plan = plan_micro_batch(
        LLAMA3_8B,
        method="qlora",
        lora_rank=64,
        max_seq_length=2048,
        memory_budget_gib=budget,
        lora_dropout=dropout,
    )
    assert (plan.tokens_per_micro_batch, plan.gradient_checkpointing) == (tokens, gc)
    assert plan.predicted_peak_gib <= budget


def test_planner_respects_explicit_choices() -> None:
    plan = plan_micro_batch(
        LLAMA3_8B,
        method="qlora",
        lora_rank=64,
        max_seq_length=2048,
        memory_budget_gib=70,
        gradient_checkpointing=True,
        tokens_per_micro_batch=4096,
    )
    assert (plan.tokens_per_micro_batch, plan.gradient_checkpointing) == (4096, True)


def test_planner_never_goes_below_the_longest_row() -> None:
    plan = plan_micro_batch(
        LLAMA3_8B, method="qlora", lora_rank=64, max_seq_length=8192, memory_budget_gib=40
    )
    assert plan.tokens_per_micro_batch >= 8192


def test_planner_explains_a_budget_that_cannot_fit() -> None:
    with pytest.raises(ValueError, match=r"GiB budget: use method qlora"):
        plan_micro_batch(
            LLAMA3_8B, method="lora", lora_rank=64, max_seq_length=2048, memory_budget_gib=8
        )


def _smallest_checkpointed_gib(method: str, max_seq_length: int = 2048) -> float:
    return predict_peak_bytes(
        LLAMA3_8B, method=method, lora_rank=64, tokens=max(max_seq_length, 2048),
        gradient_checkpointing=True,
    ) / GIB  # fmt: skip


def _plan_smallest(method: str, budget: float, max_seq_length: int = 2048, **kw: Any) -> Any:
    return plan_micro_batch(
        LLAMA3_8B, method=method, lora_rank=64, max_seq_length=max_seq_length,
        memory_budget_gib=budget, **kw,
    )  # fmt: skip


@pytest.mark.parametrize(("method", "max_seq_length"), [("qlora", 2048), ("lora", 4096)])
@pytest.mark.usefixtures("without_offload")
def test_planner_zones_around_the_smallest_checkpointed_budget(
    method: str, max_seq_length: int
) -> None:
    peak = _smallest_checkpointed_gib(method, max_seq_length)
    # fits: the smallest checkpointed budget, a plain plan
    fits = _plan_smallest(method, peak + 0.01, max_seq_length)
    assert (fits.tokens_per_micro_batch, fits.gradient_checkpointing) == (max_seq_length, True)
    assert not fits.within_prediction_margin
    # over by less than the model's over-prediction: that configuration, to be tried
    edge = peak / (1 + PREDICTION_MARGIN)
    for budget in (peak - 0.01, edge + 0.01):
        with pytest.raises(WithinPredictionMargin) as caught:
            _plan_smallest(method, budget, max_seq_length)
        tried = caught.value.plan
        assert (tried.tokens_per_micro_batch, tried.gradient_checkpointing) == (
            max_seq_length,
            True,
        )
        assert tried.within_prediction_margin and not tried.activation_offload
        assert tried.predicted_peak_gib == round(peak, 2) and tried.memory_budget_gib == budget
        assert "prediction margin" in str(caught.value) and "maxSeqLength" in str(caught.value)
    # clearly over: refused as before
    with pytest.raises(ValueError, match=r"GiB budget: use method") as over:
        _plan_smallest(method, edge - 0.01, max_seq_length)
    assert not isinstance(over.value, WithinPredictionMargin)


@pytest.mark.usefixtures("without_offload")
def test_only_the_checkpointed_configuration_gets_the_margin() -> None:
    budget = _smallest_checkpointed_gib("qlora") / (1 + PREDICTION_MARGIN) + 0.01
    with pytest.raises(ValueError) as refused:
        _plan_smallest("qlora", budget, gradient_checkpointing=False)
    assert not isinstance(refused.value, WithinPredictionMargin)
    # the fit check and the trainer replace a choice that does not fit with the planner's,
    # which tries the smallest checkpointed budget
    with pytest.raises(WithinPredictionMargin) as caught:
        plan_or_replace(
            LLAMA3_8B, method="qlora", lora_rank=64, max_seq_length=2048,
            memory_budget_gib=budget, gradient_checkpointing=False, tokens_per_micro_batch=8192,
        )  # fmt: skip
    assert (caught.value.plan.tokens_per_micro_batch, caught.value.plan.gradient_checkpointing) == (
        2048,
        True,
    )


def test_training_flops_by_hand() -> None:
    shape = ModelShape(
        hidden_size=8,
        num_layers=2,
        num_heads=2,
        num_kv_heads=1,
        head_dim=4,
        intermediate_size=16,
        vocab_size=32,
    )
    # body per layer: 2*8*8 + 2*8*4 + 3*8*16 = 128 + 64 + 384 = 576; two layers = 1152
    assert shape.body_matmul_params == 1152
    flops = fastpath.training_flops(shape, lora_rank=1, sequence_lengths=[3, 5], loss_tokens=4)
    lora = 2 * (2 * 16 + 2 * 12 + 2 * 24 + 24)  # r*(in+out) per module, two layers
    expected = 4 * 1152 * 8 + 4 * 8 * 32 * 4 + 6 * lora * 8 + 6 * 8 * 2 * (9 + 25)
    assert flops == pytest.approx(expected)


def test_sft_overrides_turn_on_padding_free_packing() -> None:
    plan = plan_micro_batch(
        LLAMA3_8B, method="qlora", lora_rank=64, max_seq_length=2048, memory_budget_gib=24
    )
    over = fastpath.sft_overrides(plan, 2048)
    assert over["packing"] and over["padding_free"] and over["packing_strategy"] == "bfd"
    assert over["max_length"] == plan.tokens_per_micro_batch
    assert over["per_device_train_batch_size"] == 1
    assert over["gradient_checkpointing"] is True


def test_cu_seqlens_from_restarting_positions() -> None:
    import torch

    pos = torch.tensor([[0, 1, 2, 0, 1, 0, 1, 2, 3]])
    cu, longest = fastpath.cu_seqlens_from_position_ids(pos)
    assert cu.tolist() == [0, 3, 5, 9]
    assert longest == 4


@pytest.fixture(scope="module")
def tiny_llama():
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=97,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
    )
    model = LlamaForCausalLM(config).eval()
    return model


def test_packed_rows_get_the_logits_they_get_alone(tiny_llama) -> None:
    import torch

    model = tiny_llama
    gen = torch.Generator().manual_seed(1)
    rows = [torch.randint(0, 97, (n,), generator=gen) for n in (7, 12, 5)]
    fastpath.set_attention(model, "sdpa")
    with torch.no_grad():
        alone = [model(input_ids=r[None]).logits[0] for r in rows]
        fastpath.set_attention(model, fastpath.register_varlen_attention())
        packed_ids = torch.cat(rows)[None]
        positions = torch.cat([torch.arange(len(r)) for r in rows])[None]
        packed = model(input_ids=packed_ids, position_ids=positions).logits[0]
        # without position ids the rows would see each other: the check must be able to fail
        leaked = model(input_ids=packed_ids).logits[0]
    fastpath.set_attention(model, "sdpa")
    reference = torch.cat(alone)
    assert torch.allclose(packed, reference, atol=1e-5, rtol=1e-4)
    assert not torch.allclose(leaked[7:], reference[7:], atol=1e-3)


def test_padded_batches_fall_back_to_sdpa(tiny_llama) -> None:
    import torch

    model = tiny_llama
    gen = torch.Generator().manual_seed(2)
    ids = torch.randint(0, 97, (2, 9), generator=gen)
    mask = torch.ones_like(ids)
    mask[1, 6:] = 0
    with torch.no_grad():
        fastpath.set_attention(model, "sdpa")
        want = model(input_ids=ids, attention_mask=mask).logits
        fastpath.set_attention(model, fastpath.register_varlen_attention())
        got = model(input_ids=ids, attention_mask=mask).logits
    fastpath.set_attention(model, "sdpa")
    assert torch.allclose(got[0], want[0], atol=1e-5)
    assert torch.allclose(got[1, :6], want[1, :6], atol=1e-5)


def test_apply_without_cuda_plans_for_a_given_budget(tiny_llama) -> None:
    report = fastpath.apply(
        tiny_llama, method="lora", lora_rank=8, max_seq_length=64, memory_budget_gib=1.0
    )
    assert report.kernels == []  # Liger needs CUDA
    assert report.plan is not None
    assert report.sft_overrides["packing"] is True
    assert report.sft_overrides["max_length"] >= 64


def test_apply_replans_when_resolved_choices_do_not_fit(tiny_llama) -> None:
    # batch x maxSeqLength resolved for padded rows can be far too many packed tokens
    report = fastpath.apply(
        tiny_llama,
        method="lora",
        lora_rank=8,
        max_seq_length=64,
        memory_budget_gib=0.6,
        gradient_checkpointing=False,
        tokens_per_micro_batch=10_000_000,
    )
    assert report.plan is not None
    assert report.plan["tokens_per_micro_batch"] < 10_000_000
    assert report.plan["predicted_peak_gib"] <= 0.6


@pytest.mark.usefixtures("without_offload")
def test_fast_path_tries_the_smallest_budget_within_the_prediction_margin() -> None:
    peak = _smallest_checkpointed_gib("qlora")
    run: dict[str, Any] = {"method": "qlora", "lora_rank": 64, "max_seq_length": 2048}
    tight = peak / (1 + PREDICTION_MARGIN) + 0.05
    for request in ({}, {"gradient_checkpointing": False, "tokens_per_micro_batch": 8192}):
        plan, warnings = fastpath.plan_for_gpu(LLAMA3_8B, memory_budget_gib=tight, **run, **request)
        assert (plan.tokens_per_micro_batch, plan.gradient_checkpointing) == (2048, True)
        assert plan.within_prediction_margin
        assert warnings == [
            f"predicted peak {plan.predicted_peak_gib:.1f} GiB is over the {tight:.1f} GiB "
            "budget, but within the prediction margin: trying 2048 tokens per micro-batch with "
            "gradient checkpointing"
        ]
        assert fastpath.sft_overrides(plan, 2048)["gradient_checkpointing"] is True
    fits, warnings = fastpath.plan_for_gpu(LLAMA3_8B, memory_budget_gib=peak + 0.01, **run)
    assert warnings == [] and not fits.within_prediction_margin
    with pytest.raises(ValueError, match="GiB budget: use method") as over:
        fastpath.plan_for_gpu(LLAMA3_8B, memory_budget_gib=tight - 0.1, **run)
    assert not isinstance(over.value, WithinPredictionMargin)


def test_apply_trains_the_smallest_checkpointed_budget_within_the_margin(tiny_llama) -> None:
    shape = ModelShape.from_config(tiny_llama.config)
    peak = predict_peak_bytes(
        shape, method="lora", lora_rank=8, tokens=2048, gradient_checkpointing=True,
        dropout_saves_inputs=False,
    ) / GIB  # fmt: skip
    report = fastpath.apply(
        tiny_llama, method="lora", lora_rank=8, max_seq_length=64,
        memory_budget_gib=peak / (1 + PREDICTION_MARGIN / 2),
    )  # fmt: skip
    assert report.plan is not None and report.plan["within_prediction_margin"]
    assert report.sft_overrides["max_length"] == 2048
    assert report.sft_overrides["gradient_checkpointing"] is True


def test_out_of_memory_at_the_margin_says_what_was_tried_and_what_to_change() -> None:
    from finetune_trainer.train import out_of_gpu_memory_message

    budget = _smallest_checkpointed_gib("qlora") / (1 + PREDICTION_MARGIN / 2)
    plan = fastpath.plan_for_gpu(
        LLAMA3_8B, method="qlora", lora_rank=64, max_seq_length=2048, memory_budget_gib=budget
    )[0]
    message = out_of_gpu_memory_message(1, True, "qlora", plan.as_dict())
    assert message.startswith("out of GPU memory at 2048 tokens per packed micro-batch")
    assert f"predicted peak of {plan.predicted_peak_gib:.1f} GiB" in message
    assert f"{budget:.1f} GiB budget" in message and "prediction margin" in message
    assert "training.maxSeqLength" in message and "resources.gpuProduct" in message
    assert "batchSize" not in message and "qlora" not in message
    assert "use method qlora" in out_of_gpu_memory_message(1, True, "lora", plan.as_dict())


def _plan_8b(budget: float, **settings: object) -> object:
    return plan_micro_batch(
        LLAMA3_8B, method="qlora", lora_rank=64, max_seq_length=2048, memory_budget_gib=budget,
        **settings,  # type: ignore[arg-type]
    )  # fmt: skip


def test_offload_leaves_only_the_layers_in_flight_on_the_gpu() -> None:
    from finetune_operator.domain.packed_memory import OFFLOAD_LAYERS_IN_FLIGHT, offloaded_bytes

    def peak(offload: bool) -> float:
        return predict_peak_bytes(
            LLAMA3_8B, method="qlora", lora_rank=64, tokens=16384,
            gradient_checkpointing=True, activation_offload=offload,
        )  # fmt: skip

    saved_per_layer = 16384 * 4096 * 2
    moved = (LLAMA3_8B.num_layers - OFFLOAD_LAYERS_IN_FLIGHT) * saved_per_layer
    assert peak(False) - peak(True) == pytest.approx(moved)
    assert offloaded_bytes(LLAMA3_8B, 16384) == 4 * GIB  # 32 layers x 16,384 x 4,096 x 2


@pytest.fixture
def auto_offload(monkeypatch: pytest.MonkeyPatch) -> None:
    """The planner's offload rule as it is once switched on (AUTO_ACTIVATION_OFFLOAD)."""
    from finetune_operator.domain import packed_memory

    monkeypatch.setattr(packed_memory, "AUTO_ACTIVATION_OFFLOAD", True)


def _offloaded_budgets(dropout: float) -> list[tuple[float, Any, Any]]:
    """(budget, plan, plan without offload) for budgets from 5 to 30 GiB, where any fits."""
    out = []
    for tenths in range(50, 300, 5):
        try:
            plan = _plan_8b(tenths / 10, lora_dropout=dropout)
        except ValueError:
            continue
        try:
            plain = _plan_8b(tenths / 10, lora_dropout=dropout, activation_offload=False)
        except ValueError:
            plain = None
        out.append((tenths / 10, plan, plain))
    return out


@pytest.mark.usefixtures("auto_offload")
@pytest.mark.parametrize("dropout", [0.05, 0.0])
def test_planner_offloads_only_when_it_buys_a_much_larger_batch(dropout: float) -> None:
    from finetune_operator.domain.packed_memory import OFFLOAD_BELOW_TOKENS, OFFLOAD_MIN_TOKEN_GAIN

    offloading = []
    for budget, plan, plain in _offloaded_budgets(dropout):
        assert plan.predicted_peak_gib <= budget
        if not plan.activation_offload:
            assert plain is not None and plan.offload_host_bytes == 0
            chosen = (plan.tokens_per_micro_batch, plan.gradient_checkpointing)
            assert chosen == (plain.tokens_per_micro_batch, plain.gradient_checkpointing)
            continue
        offloading.append(budget)
        assert plan.gradient_checkpointing and "activation offload" in plan.reason
        assert plan.offload_host_bytes == 32 * plan.tokens_per_micro_batch * 4096 * 2
        if plain is not None:  # checkpointing alone fits, but at most half the tokens
            assert plain.gradient_checkpointing
            assert plain.tokens_per_micro_batch < OFFLOAD_BELOW_TOKENS
            assert (
                plan.tokens_per_micro_batch >= OFFLOAD_MIN_TOKEN_GAIN * plain.tokens_per_micro_batch
            )
    # small budgets offload, a 24 GB card and up never does
    assert offloading and max(offloading) < 24


def _first_offloading_budget() -> tuple[float, Any]:
    """The smallest budget where offload wins over checkpointing alone, which also fits."""
    budgets = _offloaded_budgets(0.05)
    return next((b, p) for b, p, plain in budgets if p.activation_offload and plain is not None)


@pytest.mark.usefixtures("auto_offload")
def test_offload_must_fit_the_containers_host_memory() -> None:
    budget, plan = _first_offloading_budget()
    pinned = plan.offload_host_bytes / GIB
    # half of the container's memory may be pinned
    roomy: Any = _plan_8b(budget, host_memory_gib=2 * pinned)
    assert (roomy.tokens_per_micro_batch, roomy.activation_offload) == (
        plan.tokens_per_micro_batch,
        True,
    )
    tight: Any = _plan_8b(budget, host_memory_gib=2 * pinned - 0.01)
    assert tight.tokens_per_micro_batch < plan.tokens_per_micro_batch
    assert tight.offload_host_bytes <= (2 * pinned - 0.01) / 2 * GIB


@pytest.mark.usefixtures("auto_offload")
def test_offload_can_be_forced_or_refused() -> None:
    plan: Any = _plan_8b(24, activation_offload=True, tokens_per_micro_batch=16384)
    assert (plan.tokens_per_micro_batch, plan.activation_offload) == (16384, True)
    budget, _ = _first_offloading_budget()
    plan = _plan_8b(budget + 2, activation_offload=False)
    assert plan.activation_offload is False
    with pytest.raises(ValueError, match="needs checkpointing"):
        _plan_8b(24, activation_offload=True, gradient_checkpointing=False)


@pytest.mark.usefixtures("auto_offload")
def test_an_explicit_batch_too_large_for_checkpointing_alone_is_offloaded() -> None:
    budget, offloaded = _first_offloading_budget()
    tokens = offloaded.tokens_per_micro_batch
    plan: Any = _plan_8b(budget, tokens_per_micro_batch=tokens)
    assert (plan.tokens_per_micro_batch, plan.activation_offload) == (tokens, True)


@pytest.mark.usefixtures("auto_offload")
def test_a_budget_only_offload_fits_names_the_host_memory_it_needs() -> None:
    budget, plan, _ = next(b for b in _offloaded_budgets(0.05) if b[2] is None)
    assert plan.activation_offload
    with pytest.raises(ValueError, match=r"GiB of container memory \(resources.memory\)"):
        _plan_8b(budget, host_memory_gib=0.1)


def test_attention_wider_than_the_fitted_shapes_is_counted_on_top() -> None:
    """Measured shapes (query width = hidden, kv width <= hidden / 4) get nothing extra; a
    Gemma-7B shape (16 heads of 256 on hidden 3,072, as many kv heads) and an MHA model pay
    for the wider query, key and value their attention keeps."""
    from dataclasses import replace

    from finetune_operator.domain.estimator import MODEL_FAMILIES
    from finetune_operator.domain.packed_memory import wide_attention_bytes_per_token_layer

    for measured in (LLAMA3_8B, MODEL_FAMILIES["qwen2.5-0.5b"], MODEL_FAMILIES["qwen2.5-3b"]):
        assert wide_attention_bytes_per_token_layer(measured) == 0
    gemma_like = replace(LLAMA3_8B, hidden_size=3072, num_heads=16, num_kv_heads=16, head_dim=256)
    # query 4,096 wide (1,024 over hidden), key/value 4,096 (3,328 over a quarter of hidden)
    assert wide_attention_bytes_per_token_layer(gemma_like) == 4 * 1024 + 4 * 3328

    from finetune_operator.domain.packed_memory import activation_bytes

    def kept(shape: ModelShape) -> float:
        return activation_bytes(shape, 8192, gradient_checkpointing=False, lora_dropout=0.0)

    narrow = replace(gemma_like, num_heads=24, num_kv_heads=6, head_dim=128)
    assert kept(gemma_like) - kept(narrow) == 8192 * gemma_like.num_layers * (4 * 1024 + 4 * 3328)
