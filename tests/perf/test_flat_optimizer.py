"""LoRA adapters as one flat parameter for bitsandbytes' 8-bit optimisers (flat_optimizer.py):
the very updates of the per-weight optimiser, with bitsandbytes' real optimiser on the CPU."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

bnb = pytest.importorskip("bitsandbytes")
from finetune_trainer.flat_optimizer import flatten_adapters  # noqa: E402

REPO = Path(__file__).resolve().parents[2]
WIDTH = 256  # r=16 adapters on 256-wide layers: 4,096 elements, 16 whole state blocks


class Stack(nn.Module):
    def __init__(self, width: int = WIDTH, narrow: int = 8) -> None:
        super().__init__()
        self.up = nn.Linear(width, width)
        self.down = nn.Linear(width, width)
        self.small = nn.Linear(width, narrow)  # its r=16 lora_B is 8 x 16: too small for 8 bits

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.small(torch.tanh(self.down(torch.tanh(self.up(x)))))


def lora_model(seed: int = 0) -> Any:
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(seed)
    model = get_peft_model(
        Stack(), LoraConfig(r=16, lora_alpha=32, target_modules=["up", "down", "small"])
    )
    with torch.no_grad():  # non-zero lora_B, so lora_A gets gradients from the first step
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.02)
    return model


def train(
    model: Any, flat: bool, steps: int = 6, clip: float | None = 1.0, bits: int = 8
) -> tuple[Any, Any]:
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = bnb.optim.AdamW(params, lr=1e-2, weight_decay=0.01, optim_bits=bits)
    report = flatten_adapters(optimizer, model) if flat else None
    gen = torch.Generator().manual_seed(1)
    for _ in range(steps):
        x = torch.randn(64, WIDTH, generator=gen)
        loss = model(x).pow(2).mean()
        loss.backward()
        if clip is not None:
            torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
        optimizer.step()
        model.zero_grad(set_to_none=True)
    return optimizer, report


def adapter_weights(model: Any) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def test_flat_updates_are_the_per_weight_updates() -> None:
    reference, flat = lora_model(), lora_model()
    train(reference, flat=False)
    _, report = train(flat, flat=True)
    assert report.flattened == 5 and report.flat_parameters == 1
    assert report.kept == {"under 4096 elements (bitsandbytes keeps 32-bit states)": 1}
    expected, got = adapter_weights(reference), adapter_weights(flat)
    assert got.keys() == expected.keys()
    for name, value in got.items():
        assert torch.equal(value, expected[name]), name
    start = adapter_weights(lora_model())
    moved = [n for n in got if not torch.equal(got[n], start[n])]
    assert len(moved) == len(got)  # every adapter weight trained, flattened or not


def test_a_32bit_optimiser_takes_every_adapter_weight() -> None:
    """paged_adamw_32bit and the like update element by element: the small weight joins."""
    reference, flat = lora_model(), lora_model()
    train(reference, flat=False, bits=32)
    _, report = train(flat, flat=True, bits=32)
    assert report.flattened == 6 and report.kept == {}
    expected = adapter_weights(reference)
    for name, value in adapter_weights(flat).items():
        assert torch.equal(value, expected[name]), name


def test_one_update_and_state_for_all_flattened_weights() -> None:
    model = lora_model()
    optimizer, _ = train(model, flat=True, steps=1)
    flat = optimizer.param_groups[0]["params"][0]
    assert flat.numel() == 5 * 16 * WIDTH
    assert optimizer.state[flat]["state1"].dtype == torch.uint8  # 8-bit, as per weight
    assert flat.grad is None  # the gathered gradient is freed after the step
    # the adapter weights are views of it: what the optimiser writes, the model uses
    weight = model.base_model.model.up.lora_A["default"].weight
    assert weight.untyped_storage().data_ptr() == flat.untyped_storage().data_ptr()
    assert len(optimizer.state) == 2  # the flat parameter and the small weight kept apart


def test_state_dict_round_trip_resumes_the_same_run() -> None:
    straight = lora_model()
    train(straight, flat=True, steps=4, clip=None)

    resumed = lora_model()
    optimizer, _ = train(resumed, flat=True, steps=2, clip=None)
    saved = optimizer.state_dict()
    again = lora_model()
    again.load_state_dict(resumed.state_dict())
    fresh = bnb.optim.AdamW8bit([p for p in again.parameters() if p.requires_grad], lr=1e-2)
    fresh.param_groups[0]["weight_decay"] = 0.01
    flatten_adapters(fresh, again)
    fresh.load_state_dict(saved)
    gen = torch.Generator().manual_seed(1)
    for step in range(4):
        x = torch.randn(64, WIDTH, generator=gen)
        if step < 2:
            continue  # the batches the first two steps used
        again(x).pow(2).mean().backward()
        fresh.step()
        again.zero_grad(set_to_none=True)
    expected = adapter_weights(straight)
    for name, value in adapter_weights(again).items():
        assert torch.equal(value, expected[name]), name


def test_saved_adapter_is_unchanged(tmp_path: Path) -> None:
    from safetensors.torch import load_file

    model = lora_model()
    train(model, flat=True, steps=2)
    model.save_pretrained(tmp_path)
    saved = load_file(tmp_path / "adapter_model.safetensors")
    weights = {
        n.replace(".default", ""): p for n, p in adapter_weights(model).items()
    }  # PEFT drops the adapter name
    assert saved.keys() == weights.keys()
    for name, value in saved.items():
        assert torch.equal(value, weights[name])


def test_other_optimisers_and_trained_optimisers_are_left_alone() -> None:
    model = lora_model()
    params = [p for p in model.parameters() if p.requires_grad]
    report = flatten_adapters(torch.optim.AdamW(params), model)
    assert report.flattened == 0 and "not a bitsandbytes optimiser" in str(report.skipped)
    optimizer, _ = train(model, flat=False, steps=1)
    report = flatten_adapters(optimizer, model)
    assert report.flattened == 0 and "taken a step" in str(report.skipped)


def test_fast_path_trainer_flattens_on_request(tmp_path: Path) -> None:
    """The fast path's trainer (TRL's SFTTrainer, packed) trains a Llama with the flat
    optimiser on the CPU to the very losses of the per-weight one."""
    from datasets import Dataset
    from finetune_trainer import fastpath
    from finetune_trainer.tinymodel import build_tokenizer
    from peft import LoraConfig, get_peft_model
    from support.packed_training import PACKED_ROWS, packed_cpu_args
    from transformers import LlamaConfig, LlamaForCausalLM

    assert fastpath.FLAT_ADAPTER_OPTIMIZER is True  # on by default since the H100 run

    def run(flat: bool) -> tuple[list[float], Any]:
        torch.manual_seed(0)
        config = LlamaConfig(
            vocab_size=97, hidden_size=WIDTH, intermediate_size=2 * WIDTH, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=256,
        )  # fmt: skip
        model = get_peft_model(
            LlamaForCausalLM(config), LoraConfig(r=16, lora_alpha=32, target_modules="all-linear")
        )
        args = packed_cpu_args(tmp_path / str(flat), optim="adamw_8bit", max_steps=4)
        trainer = fastpath.trainer_class(flat_adapter_optimizer=flat)(
            model=model,
            args=args,
            train_dataset=Dataset.from_dict({"input_ids": PACKED_ROWS}),
            processing_class=build_tokenizer(),
        )
        trainer.train()
        losses = [e["loss"] for e in trainer.state.log_history if "loss" in e]
        return losses, trainer.flat_optimizer_report

    per_weight, none = run(False)
    flat, report = run(True)
    assert none is None
    # 7 projections x 2 layers x (lora_A, lora_B), each 16 x 256 or 16 x 512 and up
    assert report == {"flattened": 28, "flatParameters": 1, "skipped": None, "kept": {}}
    assert len(flat) == len(per_weight) == 4
    assert flat == pytest.approx(per_weight, rel=1e-6)
    assert flat[-1] < flat[0]


DDP_SCRIPT = r"""
import datetime, os, sys, json
import torch, torch.distributed as dist, torch.multiprocessing as mp
import bitsandbytes as bnb
from torch import nn
from peft import LoraConfig, get_peft_model
from finetune_trainer.flat_optimizer import flatten_adapters

WIDTH = 256

def run(rank, flat, out):
    # a file rendezvous: no port that a test running beside this one could take first
    dist.init_process_group("gloo", init_method=f"file://{out}.store", rank=rank, world_size=2,
                            timeout=datetime.timedelta(seconds=60))
    torch.manual_seed(0)
    base = nn.Sequential(nn.Linear(WIDTH, WIDTH), nn.Tanh(), nn.Linear(WIDTH, WIDTH))
    model = get_peft_model(base, LoraConfig(r=16, lora_alpha=32, target_modules=["0", "2"]))
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.02)
    ddp = nn.parallel.DistributedDataParallel(model)
    optimizer = bnb.optim.AdamW8bit([p for p in ddp.parameters() if p.requires_grad], lr=1e-2)
    if flat:  # after the wrap, as the Trainer builds its optimiser after accelerate's prepare
        assert flatten_adapters(optimizer, model).flattened == 4
    gen = torch.Generator().manual_seed(10 + rank)  # each rank its own batches
    for _ in range(4):
        ddp(torch.randn(32, WIDTH, generator=gen)).pow(2).mean().backward()
        optimizer.step()
        ddp.zero_grad(set_to_none=True)
    weights = {n: p.detach().flatten()[:8].tolist() for n, p in model.named_parameters()
               if p.requires_grad}
    with open(f"{out}-{rank}.json", "w") as f:
        json.dump(weights, f)
    # no destroy_process_group(): with the file rendezvous it may wait for ever at the end

if __name__ == "__main__":
    flat, out = sys.argv[1] == "1", sys.argv[2]
    mp.spawn(run, args=(flat, out), nprocs=2)
"""


def test_two_ddp_ranks_train_alike_with_the_flat_optimiser(tmp_path: Path) -> None:
    """Under DDP (gloo, CPU) the weights are views of the flat parameter after the model is
    wrapped: both ranks end with the per-weight optimiser's weights."""
    import json
    import os
    import subprocess
    import sys

    script = tmp_path / "ddp_flat.py"
    script.write_text(DDP_SCRIPT)
    results = {}
    for flat in ("0", "1"):
        out = tmp_path / f"w{flat}"
        proc = subprocess.run(
            [sys.executable, str(script), flat, str(out)],
            capture_output=True, text=True, timeout=240, check=False,
            env={**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO / "operator"),
                                                             str(REPO / "trainer-image")])},
        )  # fmt: skip
        assert proc.returncode == 0, proc.stderr[-3000:]
        results[flat] = [json.loads(Path(f"{out}-{rank}.json").read_text()) for rank in (0, 1)]
    per_weight, flat_run = results["0"], results["1"]
    assert per_weight[0] == per_weight[1]  # DDP keeps the ranks in step
    assert flat_run[0] == flat_run[1]
    assert flat_run[0] == per_weight[0]
