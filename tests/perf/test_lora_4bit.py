"""A 4-bit projection and its LoRA adapter as one autograd function (lora_4bit.py): the same
outputs, losses and gradients as PEFT's layer, with and without dropout and checkpointing,
on the CPU with bitsandbytes' real 4-bit weights."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from finetune_trainer import lora_dropout as ld
from support.packed_training import (
    TINY_LAYERS,
    packed_batch,
    quantise_projections,
    steps,
    tiny_4bit_model,
    tiny_lora_model,
)

pytest.importorskip("bitsandbytes")
from finetune_trainer import lora_4bit


@pytest.mark.parametrize("gc", [False, True], ids=["eager", "checkpointed"])
@pytest.mark.parametrize("dropout", [0.0, 0.1])
def test_fused_projection_trains_like_peft(dropout: float, gc: bool) -> None:
    reference = tiny_4bit_model(dropout=dropout, gc=gc)
    fused = tiny_4bit_model(dropout=dropout, gc=gc)
    report = lora_4bit.patch_model(fused)
    assert len(report.patched) == 7 * TINY_LAYERS and not report.kept

    ref_losses, ref_grads = steps(reference)
    losses, grads = steps(fused)

    assert losses == pytest.approx(ref_losses, rel=1e-5)
    assert grads.keys() == ref_grads.keys()
    for name, grad in grads.items():
        torch.testing.assert_close(grad, ref_grads[name], rtol=1e-4, atol=1e-6, msg=name)


def test_dropout_masks_are_the_ones_peft_draws() -> None:
    """With dropout on, a different mask would change the loss: the fused layers' losses
    differ from a run with other masks as much as PEFT's do, and equal PEFT's own."""
    fused = tiny_4bit_model(dropout=0.3)
    lora_4bit.patch_model(fused)
    reference = tiny_4bit_model(dropout=0.3)
    fused.train()
    torch.manual_seed(7)
    a = float(fused(**packed_batch(0)).loss)
    torch.manual_seed(7)
    b = float(reference(**packed_batch(0)).loss)
    torch.manual_seed(8)
    c = float(reference(**packed_batch(0)).loss)
    assert a == pytest.approx(b, rel=1e-6)
    assert abs(c - b) > 1e-4  # other masks: another loss


def test_fused_projection_keeps_no_dropped_input() -> None:
    """Saved for backward: the input, the rank-wide hidden state, the adapter weights; never
    a tensor the size of the dropped input next to the input itself."""
    model = tiny_4bit_model(dropout=0.1)
    lora_4bit.patch_model(model)
    layer = model.base_model.model.model.layers[0].mlp.down_proj
    x = torch.randn(1, 40, layer.in_features, requires_grad=True)
    saved: list[torch.Size] = []

    def pack(t: torch.Tensor) -> torch.Tensor:
        saved.append(t.shape)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        layer(x).sum().backward()
    big = [s for s in saved if s.numel() == x.numel()]
    assert big == [x.shape]  # x itself, once
    assert torch.Size([1, 40, 4]) in saved  # the rank-wide lora_A output


def test_layers_fall_back_to_peft_where_the_function_does_not_apply() -> None:
    model = tiny_4bit_model()
    lora_4bit.patch_model(model)
    batch = packed_batch(0)
    with torch.no_grad():
        with model.disable_adapter():
            base_only = float(model(**batch).loss)
        reference = tiny_4bit_model()
        with reference.disable_adapter():
            expected = float(reference(**batch).loss)
    assert base_only == pytest.approx(expected, rel=1e-6)


def test_after_the_fused_dropout_patch_and_unpatched_again() -> None:
    reference = tiny_4bit_model(dropout=0.1)
    model = tiny_4bit_model(dropout=0.1)
    ld.patch_model(model)  # the fast path's dropout first, as the trainer does
    report = lora_4bit.patch_model(model)
    assert len(report.patched) == 7 * TINY_LAYERS
    assert steps(model, 2)[0] == pytest.approx(steps(reference, 2)[0], rel=1e-5)
    assert lora_4bit.unpatch_model(model) == 7 * TINY_LAYERS
    assert not any(type(m).__name__.startswith("Fused") for m in model.modules())


def test_saved_adapter_is_peft_own(tmp_path: Any) -> None:
    """On by default from 8,192 tokens: what the trainer saves after training with the fused
    layers is PEFT's adapter (same files, keys and values as training with PEFT's layers), and
    plain PEFT loads it to the same outputs."""
    from peft import PeftModel
    from safetensors.torch import load_file

    reference, fused = tiny_4bit_model(dropout=0.1), tiny_4bit_model(dropout=0.1)
    lora_4bit.patch_model(fused)
    steps(reference, 2), steps(fused, 2)
    reference.save_pretrained(tmp_path / "reference")
    fused.save_pretrained(tmp_path / "fused")
    assert sorted(p.name for p in (tmp_path / "fused").iterdir()) == sorted(
        p.name for p in (tmp_path / "reference").iterdir()
    )
    ref_weights = load_file(tmp_path / "reference" / "adapter_model.safetensors")
    weights = load_file(tmp_path / "fused" / "adapter_model.safetensors")
    assert weights.keys() == ref_weights.keys()
    for key, value in weights.items():
        torch.testing.assert_close(value, ref_weights[key], rtol=1e-4, atol=1e-6)

    loaded = PeftModel.from_pretrained(tiny_4bit_model().get_base_model(), tmp_path / "fused")

    def loss(model: Any) -> float:
        # train mode, the same dropout masks (bitsandbytes' CPU inference path, taken in eval
        # mode without grad, needs larger shapes than the tiny model's)
        torch.manual_seed(7)
        return float(model.train()(**packed_batch(1)).loss.detach())

    assert loss(loaded) == pytest.approx(loss(fused), rel=1e-5)


def test_dense_layers_are_left_alone() -> None:
    model = tiny_lora_model(dropout=0.1, prepare=quantise_projections)  # MLP in 4 bits
    report = lora_4bit.patch_model(model)
    assert len(report.patched) == 3 * TINY_LAYERS
    patched = {n.rsplit(".", 1)[-1] for n in report.patched}
    assert patched == {"gate_proj", "up_proj", "down_proj"}


def test_dora_keeps_peft_forward() -> None:
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    base = LlamaForCausalLM(
        LlamaConfig(
            vocab_size=97,
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=1,
            num_attention_heads=4,
            num_key_value_heads=2,
        )
    )
    quantise_projections(base)
    model = get_peft_model(base, LoraConfig(r=4, use_dora=True, target_modules=["up_proj"]))
    report = lora_4bit.patch_model(model)
    assert report.patched == [] and "DoRA" in next(iter(report.kept.values()))


def test_bf16_as_the_trainer_runs_it() -> None:
    """bf16 compute, bf16 adapters (TRL casts a 4-bit model's adapters), dropout 0.05: losses
    within bf16 rounding of PEFT's (the adapter output is added inside the matmul here, after
    rounding there)."""
    import bitsandbytes as bnb

    def bf16_model() -> Any:
        model = tiny_4bit_model(dropout=0.05)
        for module in model.modules():
            if isinstance(module, bnb.nn.Linear4bit):
                module.compute_dtype = torch.bfloat16
        for param in model.parameters():
            if param.dtype == torch.float32:
                param.data = param.data.to(torch.bfloat16)
        return model

    reference, fused = bf16_model(), bf16_model()
    lora_4bit.patch_model(fused)
    ref_losses, _ = steps(reference)
    losses, grads = steps(fused)
    assert all(g.dtype == torch.bfloat16 for g in grads.values())
    assert losses == pytest.approx(ref_losses, rel=2e-3)


def test_fast_path_fuses_from_the_measured_micro_batch_size() -> None:
    """Auto (None): fused from LORA_4BIT_MIN_TOKENS tokens per micro-batch, where the H100
    measured a gain; smaller micro-batches and unplanned runs keep PEFT's layers."""
    from finetune_trainer import fastpath

    assert fastpath.FUSED_LORA_4BIT is None
    threshold = fastpath.LORA_4BIT_MIN_TOKENS
    assert threshold == 8192
    assert fastpath.use_fused_lora_4bit(None, threshold) is True
    assert fastpath.use_fused_lora_4bit(None, threshold - 1024) is False
    assert fastpath.use_fused_lora_4bit(None, None) is False
    assert fastpath.use_fused_lora_4bit(False, 32768) is False
    assert fastpath.use_fused_lora_4bit(True, 2048) is True

    def apply(**kwargs: Any) -> Any:
        return fastpath.apply(
            tiny_4bit_model(), method="qlora", lora_rank=4, max_seq_length=64, **kwargs
        ).lora_4bit

    assert apply(fused_lora_4bit=True, dropout_kernels=False) == {
        "patched": 7 * TINY_LAYERS,
        "kept": {},
        "dropout_kernels": False,
    }
    assert apply() is None  # no budget, no plan: PEFT's layers
    planned = {"memory_budget_gib": 80.0, "gradient_checkpointing": True}
    assert apply(tokens_per_micro_batch=threshold, **planned)["patched"] == 7 * TINY_LAYERS
    assert apply(tokens_per_micro_batch=4096, **planned) is None
    assert apply(tokens_per_micro_batch=threshold, fused_lora_4bit=False, **planned) is None


def test_layers_go_back_to_peft_after_training() -> None:
    """Evaluation and generation after training run PEFT's (bitsandbytes') layers: the fused
    function would dequantise the whole weight for every decoded token."""
    from finetune_trainer import fastpath

    model = tiny_4bit_model()
    report = fastpath.apply(
        model, method="qlora", lora_rank=4, max_seq_length=64, fused_lora_4bit=True,
        dropout_kernels=False,
    )  # fmt: skip
    assert any(isinstance(m, lora_4bit._FusedForward) for m in model.modules())
    assert report.lora_4bit == {
        "patched": 7 * TINY_LAYERS,
        "kept": {},
        "dropout_kernels": False,
    }
    assert fastpath.after_training(model) == 7 * TINY_LAYERS
    assert not any(isinstance(m, lora_4bit._FusedForward) for m in model.modules())
    assert fastpath.after_training(model) == 0  # nothing left to give back


def test_with_activation_offload_as_the_planner_may_choose() -> None:
    """Checkpointed layer inputs in host memory around the fused projections: PEFT's losses."""
    from finetune_trainer.offload import ActivationOffloader, install

    def model(fused: bool) -> Any:
        net = tiny_4bit_model(dropout=0.1, gc=True)
        ld.patch_model(net)
        if fused:
            assert lora_4bit.patch_model(net).patched
        install(net, ActivationOffloader(min_bytes=0))
        return net

    reference, _ = steps(model(False))
    losses, _ = steps(model(True))
    assert losses == pytest.approx(reference, rel=1e-5)
