"""The fast path's LoRA dropout (``finetune_trainer.lora_dropout``), checked on the CPU.

PEFT is the reference. Both draw the dropout mask with the same kernel (``native_dropout``)
call from the same generator, so from the same seed the two paths see the same masks: the
forward output and every gradient must match PEFT's, and training must follow the same loss
curve. The memory test counts the bytes autograd keeps for the backward pass.
"""

from __future__ import annotations

import copy
import os
from typing import Any

import pytest
import torch
from finetune_operator.domain.estimator import ModelShape
from finetune_operator.domain.packed_memory import predict_peak_bytes
from finetune_trainer import fastpath
from finetune_trainer import lora_dropout as ld
from peft import LoraConfig, get_peft_model
from torch import nn

os.environ["HF_HUB_OFFLINE"] = "1"

SEQ = 48


def tiny_config() -> Any:
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=97,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
    )


@pytest.fixture(scope="module")
def base() -> nn.Module:
    from transformers import LlamaForCausalLM

    torch.manual_seed(0)
    return LlamaForCausalLM(tiny_config())


def lora(
    base: nn.Module, p: float, *, dtype: torch.dtype = torch.float32, **extra: Any
) -> nn.Module:
    """A PEFT model on a copy of ``base``; LoRA B starts non-zero so every gradient flows."""
    torch.manual_seed(1)
    config = LoraConfig(
        r=8,
        lora_alpha=16,
        lora_dropout=p,
        target_modules="all-linear",
        init_lora_weights=False,
        **extra,
    )
    model = get_peft_model(copy.deepcopy(base).to(dtype), config, autocast_adapter_dtype=False)
    return model.train()


def forward_backward(model: nn.Module, seed: int) -> dict[str, torch.Tensor]:
    """Loss, input-embedding gradient and every LoRA gradient of one step from ``seed``."""
    ids = torch.randint(0, 97, (2, SEQ), generator=torch.Generator().manual_seed(5))
    embeds = model.get_input_embeddings()(ids).detach().requires_grad_(True)
    torch.manual_seed(seed)
    out = model(inputs_embeds=embeds, labels=ids)
    out.loss.backward()
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    assert embeds.grad is not None
    return {"loss": out.loss.detach(), "input": embeds.grad, **grads}


def assert_close(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor], rtol: float) -> None:
    assert got.keys() == want.keys()
    for name, expected in want.items():
        actual = got[name].float()
        expected = expected.float()
        scale = expected.abs().max().clamp(min=1e-12)
        error = float((actual - expected).abs().max() / scale)
        assert error <= rtol, f"{name}: relative error {error:.2e}"


def assert_no_less_exact(
    got: dict[str, torch.Tensor], peft: dict[str, torch.Tensor], exact: dict[str, torch.Tensor]
) -> None:
    """``got`` strays from the float32 result no further than PEFT's result does (1.5x)."""
    for name, want in exact.items():
        scale = float(want.abs().max())
        peft_error = float((peft[name].float() - want).abs().max()) / scale
        error = float((got[name].float() - want).abs().max()) / scale
        assert error <= 1.5 * peft_error + 2e-3, (name, error, peft_error)


# --------------------------------------------------------------------------------------------
# The maths: PEFT's, given the same mask
# --------------------------------------------------------------------------------------------


def test_output_and_gradients_match_peft_under_the_same_masks(base: nn.Module) -> None:
    reference = lora(base, 0.2)
    fused = lora(base, 0.2)
    report = ld.patch_model(fused)
    assert len(report.patched) == 14 and report.kept == {}  # 7 projections x 2 layers
    want = forward_backward(reference, seed=3)
    got = forward_backward(fused, seed=3)
    assert_close(got, want, 1e-5)
    assert any("lora_A" in n for n in want) and any("lora_B" in n for n in want)
    # another seed draws other masks: the comparison above can tell masks apart
    other = forward_backward(fused, seed=4)
    assert float((other["input"] - want["input"]).abs().max()) > 1e-3 * float(
        want["input"].abs().max()
    )


def test_bfloat16_is_as_close_to_float32_as_peft_is(base: nn.Module) -> None:
    # bf16 rounding differs between any two orders of the same sums; the fused path must not
    # stray further from the float32 result (same masks) than PEFT's own bf16 path does.
    exact = forward_backward(lora(base, 0.2), seed=3)
    peft_bf16 = forward_backward(lora(base, 0.2, dtype=torch.bfloat16), seed=3)
    fused = lora(base, 0.2, dtype=torch.bfloat16)
    ld.patch_model(fused)
    assert_no_less_exact(forward_backward(fused, seed=3), peft_bf16, exact)


def test_gradient_checkpointing_recomputes_the_same_masks(base: nn.Module) -> None:
    reference = lora(base, 0.2)
    fused = lora(base, 0.2)
    ld.patch_model(fused)
    for model in (reference, fused):
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.enable_input_require_grads()
    assert_close(forward_backward(fused, seed=3), forward_backward(reference, seed=3), 1e-5)


def test_float32_adapters_under_bfloat16_autocast_match_peft(base: nn.Module) -> None:
    # The trainer's setting: float32 adapters, bf16 autocast. PEFT casts the input to
    # float32 first; the patched layer casts inside instead and keeps the shared input.
    reference = lora(base, 0.2)
    fused = lora(base, 0.2)
    ld.patch_model(fused)
    exact = forward_backward(reference, seed=3)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        want = forward_backward(reference, seed=3)
        got = forward_backward(fused, seed=3)
    assert_no_less_exact(got, want, exact)


def test_bitsandbytes_4bit_layers_match_peft() -> None:
    bnb = pytest.importorskip("bitsandbytes")

    def model() -> nn.Module:
        torch.manual_seed(2)
        layer = bnb.nn.Linear4bit(64, 48, bias=False, compute_dtype=torch.bfloat16)
        layer.weight = bnb.nn.Params4bit(torch.randn(48, 64), requires_grad=False)
        net = nn.Sequential(layer).to("cpu")  # quantises the weight to nf4
        net.is_loaded_in_4bit = True  # what PEFT reads to pick its bnb LoRA layer
        config = LoraConfig(r=8, lora_dropout=0.2, target_modules=["0"], init_lora_weights=False)
        return get_peft_model(net, config).train()

    def step(net: nn.Module) -> dict[str, torch.Tensor]:
        x = torch.randn(16, 64, generator=torch.Generator().manual_seed(7)).bfloat16()
        x.requires_grad_(True)
        torch.manual_seed(3)
        net(x).float().square().sum().backward()
        assert x.grad is not None
        grads = {n: p.grad for n, p in net.named_parameters() if p.grad is not None}
        return {"input": x.grad, **grads}

    reference, fused = model(), model()
    report = ld.patch_model(fused)
    assert report.patched == ["base_model.model.0"]
    assert type(fused.base_model.model[0]).__name__ == "Linear4bit"
    assert_close(step(fused), step(reference), 2e-2)


# --------------------------------------------------------------------------------------------
# The masks
# --------------------------------------------------------------------------------------------


def test_backward_uses_the_forward_mask() -> None:
    ok, why = ld.masks_regenerate("cpu")
    assert ok, why


def test_dropout_input_has_one_layout_in_both_passes() -> None:
    # CUDA's dropout kernel maps random numbers to elements by the input's vector width
    fresh = torch.randn(8, 32)
    assert ld.dropout_input(fresh, torch.float32) is fresh  # the usual case: no copy
    strided = torch.randn(8, 33)[:, 1:]
    misaligned = torch.randn(8 * 32 + 1)[1:].view(8, 32)
    assert misaligned.is_contiguous() and misaligned.data_ptr() % 16 != 0
    for x in (strided, misaligned):
        y = ld.dropout_input(x, torch.float32)
        assert y.is_contiguous() and y.data_ptr() % 16 == 0 and torch.equal(y, x)
    assert ld.dropout_input(fresh, torch.bfloat16).dtype == torch.bfloat16


def test_each_projection_draws_its_own_mask_at_rate_p() -> None:
    # With A the identity the output is the dropped input itself: its zeros are the mask.
    x = torch.rand(256, 128) + 0.5
    eye = torch.eye(128)
    torch.manual_seed(0)
    first = ld.dropped_projection(x, eye, 0.1) != 0
    second = ld.dropped_projection(x, eye, 0.1) != 0
    n = first.numel()
    for kept in (first, second):
        # within 5 standard deviations of 90% kept
        assert abs(float(kept.float().mean()) - 0.9) < 5 * (0.09 / n) ** 0.5
    both_dropped = float((~first & ~second).float().mean())
    assert abs(both_dropped - 0.01) < 5 * (0.0099 / n) ** 0.5  # independent masks


def test_the_generator_advances_as_with_peft(base: nn.Module) -> None:
    # later random draws (other dropouts, sampling) see the stream they see with PEFT
    reference, fused = lora(base, 0.2), lora(base, 0.2)
    ld.patch_model(fused)
    ids = torch.randint(0, 97, (1, SEQ))
    states = []
    for model in (reference, fused):
        torch.manual_seed(9)
        model(input_ids=ids)
        states.append(torch.get_rng_state())
    assert torch.equal(states[0], states[1])


# --------------------------------------------------------------------------------------------
# Training
# --------------------------------------------------------------------------------------------


def loss_curve(model: nn.Module, steps: int) -> list[float]:
    params = [p for p in model.parameters() if p.requires_grad]
    optimiser = torch.optim.AdamW(params, lr=1e-2)
    batches = torch.Generator().manual_seed(11)
    torch.manual_seed(12)
    losses = []
    for _ in range(steps):
        ids = torch.randint(0, 97, (4, SEQ), generator=batches)
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        optimiser.step()
        optimiser.zero_grad(set_to_none=True)
        losses.append(float(loss.detach()))
    return losses


def test_training_follows_peft_loss_curve(base: nn.Module) -> None:
    reference, fused = lora(base, 0.1), lora(base, 0.1)
    ld.patch_model(fused)
    want = loss_curve(reference, 6)
    got = loss_curve(fused, 6)
    assert want[-1] < want[0]  # it learns
    assert got == pytest.approx(want, rel=1e-5)


def test_dropout_zero_leaves_the_model_as_peft_made_it(base: nn.Module) -> None:
    reference, model = lora(base, 0.0), lora(base, 0.0)
    choice = ld.choose(model, 0.0, fused=True)
    assert choice.implementation == "none" and not choice.saves_inputs
    assert not any(isinstance(m, ld.DroppedLoraA) for m in model.modules())
    assert loss_curve(model, 4) == loss_curve(reference, 4)


# --------------------------------------------------------------------------------------------
# Memory: what autograd keeps for the backward pass
# --------------------------------------------------------------------------------------------


def saved_activation_bytes(model: nn.Module) -> int:
    """Bytes of the distinct non-parameter storages autograd saves in one forward pass."""
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    seen: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        if storage.data_ptr() not in params:
            seen[storage.data_ptr()] = storage.nbytes()
        return t

    ids = torch.randint(0, 97, (1, 256), generator=torch.Generator().manual_seed(0))
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(input_ids=ids)
    return sum(seen.values())


def test_fused_dropout_keeps_no_copy_of_the_inputs(base: nn.Module) -> None:
    peft_dropout = saved_activation_bytes(lora(base, 0.1))
    no_dropout = saved_activation_bytes(lora(base, 0.0))
    fused = lora(base, 0.1)
    ld.patch_model(fused)
    fused_dropout = saved_activation_bytes(fused)
    # PEFT keeps each projection's dropped input: six hidden-wide and one intermediate-wide
    # per layer (float32, 256 tokens), plus its masks
    copies = 2 * 256 * 4 * (6 * 32 + 64)
    assert peft_dropout - no_dropout >= copies
    assert fused_dropout == no_dropout


# --------------------------------------------------------------------------------------------
# Patching
# --------------------------------------------------------------------------------------------


def test_patch_keeps_parameters_and_unpatch_restores_peft(base: nn.Module) -> None:
    model = lora(base, 0.1)
    params = dict(model.named_parameters())
    keys = list(model.state_dict())
    ids = torch.randint(0, 97, (1, SEQ))
    model.eval()
    with torch.no_grad():
        before = model(input_ids=ids).logits
    ld.patch_model(model)
    assert ld.patch_model(model).patched  # idempotent: already patched layers are reported
    assert list(model.state_dict()) == keys
    assert all(p is params[n] for n, p in model.named_parameters())
    layer = model.base_model.model.model.layers[0].self_attn.q_proj
    assert isinstance(layer.lora_A["default"], ld.DroppedLoraA)
    assert layer.cast_input_dtype_enabled is False
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids).logits, before)  # evaluation: no dropout
    assert ld.unpatch_model(model) == 14
    assert type(layer.lora_A["default"]) is nn.Linear
    assert type(layer.lora_dropout["default"]) is nn.Dropout
    assert layer.lora_dropout["default"].p == 0.1
    assert layer.cast_input_dtype_enabled is True


def test_dora_adapters_keep_peft_dropout(base: nn.Module) -> None:
    model = lora(base, 0.1, use_dora=True)
    report = ld.patch_model(model)
    assert report.patched == [] and len(report.kept) == 14
    assert all("variant" in why for why in report.kept.values())
    choice = ld.choose(model, 0.1, fused=True)
    assert choice.implementation == "peft" and choice.saves_inputs


# --------------------------------------------------------------------------------------------
# The fast path and the memory model
# --------------------------------------------------------------------------------------------


def test_fast_path_patches_and_plans_without_the_dropout_copies(base: nn.Module) -> None:
    model = lora(base, 0.1)
    report = fastpath.apply(
        model, method="lora", lora_rank=8, max_seq_length=64, memory_budget_gib=1.0,
        lora_dropout=0.1,
    )  # fmt: skip
    dropout = report.lora_dropout
    assert dropout["implementation"] == "fused" and dropout["savesInputs"] is False
    assert "base_model.model.model.layers.1.mlp.down_proj" in dropout["patched"]
    assert report.plan is not None
    plan = report.plan
    shape = ModelShape.from_config(model.config)
    peak = predict_peak_bytes(
        shape, method="lora", lora_rank=8, tokens=plan["tokens_per_micro_batch"],
        gradient_checkpointing=plan["gradient_checkpointing"], lora_dropout=0.1,
        dropout_saves_inputs=False,
    )  # fmt: skip
    assert plan["predicted_peak_gib"] == round(peak / 1024**3, 2)


def test_fast_path_keeps_peft_dropout_when_asked(base: nn.Module) -> None:
    model = lora(base, 0.1)
    report = fastpath.apply(
        model, method="lora", lora_rank=8, max_seq_length=64, memory_budget_gib=1.0,
        lora_dropout=0.1, fused_lora_dropout=False,
    )  # fmt: skip
    assert report.lora_dropout["implementation"] == "peft"
    assert report.lora_dropout["savesInputs"] is True
    assert not any(isinstance(m, ld.DroppedLoraA) for m in model.modules())


@pytest.mark.slow
def test_fast_trainer_logs_peft_losses_with_the_fused_dropout(tmp_path: Any) -> None:
    """The trainer's own SFTTrainer on packed rows of the tiny model, LoRA dropout 0.1: the
    fused dropout logs the loss curve PEFT's dropout logs."""
    from finetune_trainer.tinymodel import build_tiny_model
    from support.packed_training import packed_cpu_args, packed_lora_trainer
    from transformers import AutoModelForCausalLM

    model_dir = build_tiny_model(tmp_path / "model", initializer_range=0.3)

    def run(fused: bool) -> list[float]:
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
        args = packed_cpu_args(
            tmp_path / f"out-{fused}",
            bf16=False,  # float32 on the CPU: the same masks give the same numbers
            gradient_checkpointing=True,
        )
        trainer = packed_lora_trainer(model, args, dropout=0.1)
        if fused:
            assert len(ld.patch_model(trainer.model).patched) == 14
        trainer.train()
        return [h["loss"] for h in trainer.state.log_history if "loss" in h]

    peft_losses = run(fused=False)
    fused_losses = run(fused=True)
    assert len(peft_losses) == 5
    assert fused_losses == pytest.approx(peft_losses, rel=1e-5)
