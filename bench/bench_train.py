"""Training throughput: plain TRL against the project's fast path, side by side on one GPU.

One invocation loads one frozen base model (random weights of a real architecture, built
from its config: nothing is downloaded), then trains LoRA adapters on it with:

- ``baseline``: a plain TRL script at common defaults: QLoRA nf4 + double quant, r=64 on all
  linear layers, batch 4, max length 2048, gradient checkpointing, paged_adamw_8bit, no
  packing (each batch padded to its longest row), SDPA attention;
- ``fast[:TOKENS[:gc|nogc]]``: the same TRL trainer with ``finetune_trainer.fastpath``:
  padding-free best-fit packing into micro-batches of TOKENS tokens, varlen flash attention
  with per-row boundaries, Liger kernels, and the planner's checkpointing choice (``fast``
  alone lets the planner pick both for ``--memory-budget-gib``).

Every variant sees the same rows (``bench/data.py``) and the same seed. It reports effective
(non-padding) tokens/s, step time, peak GPU memory and MFU, and writes the loss curves.
``--equivalence-steps N`` also trains N steps both ways on identical row groups (padded
micro-batches against one packed micro-batch) and compares the losses step by step.

MFU counts model FLOPs only (see ``fastpath.training_flops``): 4·N_frozen·T for the frozen
projections (forward + input gradient), 4·N_head·T_loss for the LM head, 6·N_lora·T for the
adapters and 6·hidden·layers·Σs² for causal attention; recomputation is not counted. The
peak is ``--peak-tflops`` (default 800, a measured bf16 matmul on an H100 SXM).
"""

from __future__ import annotations

import argparse
import gc
import itertools
import json
import os
import platform
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent / "trainer-image"))

from data import length_stats, make_rows  # noqa: E402

GIB = 1024**3
PROFILED_STEPS = 2


def environment() -> dict[str, Any]:
    import importlib.metadata as md

    import torch

    info: dict[str, Any] = {
        "date": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "allocatorConf": os.environ.get("PYTORCH_CUDA_ALLOC_CONF"),
    }
    for pkg in (
        "transformers",
        "peft",
        "trl",
        "bitsandbytes",
        "accelerate",
        "datasets",
        "liger-kernel",
        "triton",
    ):
        try:
            info[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            info[pkg] = None
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        info["gpu"] = props.name
        info["gpuMemoryGiB"] = round(props.total_memory / GIB, 1)
        try:
            import subprocess

            info["driver"] = subprocess.run(
                ["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                capture_output=True, text=True, check=False,
            ).stdout.strip()  # fmt: skip
        except OSError:
            info["driver"] = None
    return info


def load_base(model_dir: str, method: str) -> Any:
    import torch
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    kwargs: dict[str, Any] = {"dtype": torch.bfloat16, "attn_implementation": "sdpa"}
    if torch.cuda.is_available():
        kwargs["device_map"] = {"": 0}
    if method == "qlora":
        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=torch.bfloat16,
        )
    return AutoModelForCausalLM.from_pretrained(model_dir, **kwargs)


def lora_config(rank: int, dropout: float = 0.05) -> Any:
    from peft import LoraConfig

    return LoraConfig(
        r=rank,
        lora_alpha=16,
        lora_dropout=dropout,
        target_modules="all-linear",
        task_type="CAUSAL_LM",
    )


def reset_memory() -> None:
    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def peak_memory() -> dict[str, float]:
    import torch

    if not torch.cuda.is_available():
        return {}
    return {
        "peakAllocatedGiB": round(torch.cuda.max_memory_allocated() / GIB, 2),
        "peakReservedGiB": round(torch.cuda.max_memory_reserved() / GIB, 2),
    }


# Optimisers a variant may name (transformers' names): bitsandbytes' paged 8-bit AdamW keeps
# its moments in managed memory (the operator's default); torch's fused AdamW updates every
# adapter in one kernel with fp32 moments on the GPU.
DEFAULT_OPTIMIZER = "paged_adamw_8bit"
OPTIMIZERS = (
    DEFAULT_OPTIMIZER,
    "adamw_8bit",
    "paged_adamw_32bit",
    "adamw_torch",
    "adamw_torch_fused",
)


def parse_variant(text: str) -> dict[str, Any]:
    """``baseline`` | ``fast[@BUDGET_GIB][:TOKENS[:gc|nogc[:OPTION...]]]`` | ``unsloth[:TOKENS]``.

    Examples: ``fast@24``, ``fast:8192:nogc``, ``fast:8192:nogc:ga=4:dropout=0``,
    ``fast:16384:gc:offload``, ``fast:12288:nogc:dropimpl=peft``, ``fast:8192:gc:compile``,
    ``fast:12288:nogc:lora4bit``, ``unsloth:16384``.
    Options: ``ga`` (gradient accumulation steps), ``dropout`` (LoRA dropout of this
    variant), ``offload`` (checkpointed layer inputs in host memory), ``dropimpl``
    (``fused``, the fast path's dropout that keeps no inputs, or ``peft``, PEFT's own;
    default fused), ``compile`` (decoder layers through torch.compile, in place of Liger's
    kernels), ``liger`` (with ``compile``: keep Liger's kernels inside the compiled layers;
    Liger patches the model for good, so run such a variant after the plain compiled ones),
    ``lora4bit`` / ``nolora4bit`` (each 4-bit projection and its adapter as one autograd
    function, ``finetune_trainer/lora_4bit.py``, or PEFT's layers; default: as the trainer
    chooses, by the micro-batch's tokens, ``fastpath.use_fused_lora_4bit``; never with
    ``compile``), ``optim`` (the optimiser, one of
    OPTIMIZERS; default paged_adamw_8bit, the operator's default), ``flatoptim`` (the adapter
    weights as one flat parameter for a bitsandbytes optimiser,
    ``finetune_trainer/flat_optimizer.py``), ``dropk`` / ``nodropk`` (the fused projections'
    LoRA dropout drawn inside their adapter matmuls by Triton, ``dropout_kernels.py``, or
    PyTorch's dropout redrawn in the backward pass; default ``fastpath.DROPOUT_KERNELS``).
    ``unsloth`` trains with Unsloth in a child process (see ``unsloth_command``); TOKENS
    defaults to 8192.
    """
    parts = text.split(":")
    if parts[0] == "baseline":
        return {
            "name": text, "kind": "baseline", "ga": 1, "dropout": None, "dropimpl": "peft",
            "optim": DEFAULT_OPTIMIZER,
        }  # fmt: skip
    if parts[0] == "unsloth":
        if len(parts) > 2 or (len(parts) == 2 and not parts[1].isdigit()):
            raise SystemExit(f"unknown variant {text!r}: use unsloth[:TOKENS]")
        tokens = int(parts[1]) if len(parts) == 2 else 8192
        return {
            "name": text, "kind": "unsloth", "tokens": tokens, "ga": 1, "dropout": 0.0,
            "dropimpl": "unsloth",
        }  # fmt: skip
    head, _, budget = parts[0].partition("@")
    if head != "fast":
        raise SystemExit(
            f"unknown variant {text!r}: use baseline, unsloth[:TOKENS] or "
            "fast[@GIB][:TOKENS[:gc|nogc[:ga=N:dropout=P:offload]]]"
        )
    tokens = int(parts[1]) if len(parts) > 1 and parts[1] else None
    if len(parts) > 2 and parts[2] not in ("gc", "nogc", ""):
        raise SystemExit(f"unknown checkpointing {parts[2]!r} in {text!r}: use gc or nogc")
    gc_choice = {"gc": True, "nogc": False}.get(parts[2]) if len(parts) > 2 else None
    options: dict[str, str] = {}
    for part in parts[3:]:
        key, sep, value = part.partition("=")
        if part in (
            "offload", "compile", "liger", "lora4bit", "nolora4bit", "flatoptim", "dropk", "nodropk"
        ):  # fmt: skip
            options[part] = "1"
            continue
        if not sep or key not in ("ga", "dropout", "dropimpl", "optim"):
            raise SystemExit(
                f"unknown option {part!r} in {text!r}: use ga=N, dropout=P, offload, compile, "
                "liger, lora4bit, nolora4bit, flatoptim, dropk, nodropk, optim=NAME or "
                "dropimpl=peft|fused"
            )
        options[key] = value
    if "offload" in options and gc_choice is False:
        raise SystemExit(f"{text!r}: offload keeps checkpointed inputs, it needs gc")
    if "liger" in options and "compile" not in options:
        raise SystemExit(f"{text!r}: liger is the default without compile; use it with compile")
    if "lora4bit" in options and ("compile" in options or options.get("dropimpl") == "peft"):
        raise SystemExit(f"{text!r}: lora4bit carries the fused dropout and runs uncompiled")
    if options.get("optim", DEFAULT_OPTIMIZER) not in OPTIMIZERS:
        raise SystemExit(f"unknown optim in {text!r}: use one of {', '.join(OPTIMIZERS)}")
    if options.get("dropimpl", "fused") not in ("peft", "fused"):
        raise SystemExit(f"unknown dropimpl in {text!r}: use dropimpl=peft or dropimpl=fused")
    return {
        "name": text,
        "kind": "fast",
        "tokens": tokens,
        "gc": True if "offload" in options else gc_choice,
        "budget": float(budget) if budget else None,
        "ga": int(options.get("ga", 1)),
        "dropout": float(options["dropout"]) if "dropout" in options else None,
        "offload": True if "offload" in options else None,
        "dropimpl": options.get("dropimpl", "fused"),
        "compile": "compile" in options,
        "liger": True if "liger" in options else None,
        # None: as the trainer chooses
        "lora4bit": True if "lora4bit" in options else False if "nolora4bit" in options else None,
        "optim": options.get("optim", DEFAULT_OPTIMIZER),
        # None: the fast path's default (fastpath.FLAT_ADAPTER_OPTIMIZER)
        "flatoptim": True if "flatoptim" in options else None,
        # None: the fast path's default (fastpath.DROPOUT_KERNELS)
        "dropk": True if "dropk" in options else False if "nodropk" in options else None,
    }


class StepClock:
    """Trainer callback: wall time of every optimiser step (device synchronised)."""

    def __init__(self) -> None:
        from transformers import TrainerCallback

        clock = self

        class _Callback(TrainerCallback):
            def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
                clock.tick()

            def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
                clock.tick()

        self.callback = _Callback()
        self.stamps: list[float] = []

    def tick(self) -> None:
        import torch

        if torch.cuda.is_available():
            torch.cuda.synchronize()
        self.stamps.append(time.perf_counter())


class CompileWatch:
    """Trainer callback: dynamo's compile counts after every optimiser step of a variant with
    compiled layers, so the report shows whether any compilation fell in the measured steps."""

    def __init__(self, choice: Any) -> None:
        from transformers import TrainerCallback

        self.per_step: list[int] = []
        me = self

        class _Callback(TrainerCallback):
            def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
                me.per_step.append(int(choice.as_dict().get("compilations", -1)))

        self.callback = _Callback()


class StepProfiler:
    """Trainer callback: torch.profiler over a few measured optimiser steps of one variant.

    Writes the top operators by device time and by host time, and the share of the window
    the GPU spent running kernels (what is left is launch gaps, syncs and host work).
    """

    def __init__(self, first_step: int, steps: int, out_file: Path) -> None:
        from transformers import TrainerCallback

        self.first_step, self.steps, self.out_file = first_step, steps, out_file
        self.profile: Any = None
        self.started = 0.0
        me = self

        class _Callback(TrainerCallback):
            def on_step_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
                if state.global_step == me.first_step and me.profile is None:
                    me.start()

            def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
                if me.profile is not None and state.global_step == me.first_step + me.steps:
                    me.stop()

        self.callback = _Callback()

    def start(self) -> None:
        import torch
        from torch.profiler import ProfilerActivity, profile

        torch.cuda.synchronize()
        self.profile = profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA])
        self.profile.__enter__()
        self.started = time.perf_counter()

    def stop(self) -> None:
        import torch

        torch.cuda.synchronize()
        wall = time.perf_counter() - self.started
        self.profile.__exit__(None, None, None)
        averages = self.profile.key_averages()
        device_us = sum(getattr(e, "self_device_time_total", 0.0) for e in averages)
        lines = [
            f"window: {self.steps} optimiser steps, wall {wall:.3f} s, "
            f"kernel time {device_us / 1e6:.3f} s ({100 * device_us / 1e6 / wall:.1f}% of wall; "
            "overlapping streams can exceed 100%)",
            "",
            averages.table(
                sort_by="self_device_time_total", row_limit=45, max_name_column_width=70
            ),
            averages.table(sort_by="cpu_time_total", row_limit=30, max_name_column_width=70),
        ]
        self.out_file.parent.mkdir(parents=True, exist_ok=True)
        self.out_file.write_text("\n".join(lines))
        print(lines[0], flush=True)
        self.profile = None


class _NoProfiler:
    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc: Any) -> None:
        return None


def step_profiler(variant: dict[str, Any], args: argparse.Namespace) -> Any:
    """A context giving a StepProfiler for this variant when ``--profile`` asks for one."""
    import contextlib

    import torch

    if not args.profile or not torch.cuda.is_available():
        return _NoProfiler()
    safe = "".join(c if c.isalnum() or c in "-_" else "_" for c in variant["name"])
    out_file = args.out.parent / f"profile-{args.method}-{safe}.txt"
    first = args.warmup_steps + args.steps
    return contextlib.nullcontext(StepProfiler(first, PROFILED_STEPS, out_file))


def make_counting_trainer(fast: bool, flat_optimizer: bool | None = None) -> Any:
    from trl import SFTTrainer

    base: Any = SFTTrainer
    if fast:
        from finetune_trainer.fastpath import trainer_class

        # None: trainer_class's own default, as the trainer runs it
        base = trainer_class() if flat_optimizer is None else trainer_class(flat_optimizer)

    class CountingSFTTrainer(base):  # type: ignore[misc,valid-type]
        """SFTTrainer that records the real (non-padding) tokens of every micro-batch.

        It keeps the few small tensors it needs and counts after training: reading them
        during a step would make the host wait for the GPU and slow the run it measures.
        """

        token_log: list[Any]

        def training_step(self, model: Any, inputs: Any, num_items_in_batch: Any = None) -> Any:
            keep = ("labels", "cu_seq_lens_q", "attention_mask")
            kept = {k: inputs[k].detach() for k in keep if k in inputs}
            kept["shape"] = tuple(inputs["input_ids"].shape)
            self.token_log.append(kept)
            return super().training_step(model, inputs, num_items_in_batch)

    return CountingSFTTrainer


def count_tokens(kept: dict[str, Any]) -> dict[str, Any]:
    """Real tokens, row lengths, computed (padded) tokens and loss tokens of one micro-batch."""
    labels = kept["labels"]
    rows, width = kept["shape"]
    loss_tokens = int((labels[:, 1:] != -100).sum())
    padded = int(rows * width)
    if "cu_seq_lens_q" in kept:
        lengths = kept["cu_seq_lens_q"].diff().tolist()
    elif "attention_mask" in kept:
        lengths = kept["attention_mask"].sum(dim=1).tolist()
    else:
        lengths = [int(width)] * int(rows)
    return {"lengths": [int(x) for x in lengths], "loss_tokens": loss_tokens, "padded": padded}


def step_metrics(
    stamps: list[float],
    micro: list[dict[str, Any]],
    ga: int,
    history: list[dict[str, Any]],
    shape: Any,
    args: argparse.Namespace,
) -> dict[str, Any]:
    """Throughput figures of one variant from its step clock and counted micro-batches (the
    same for every variant, in this process or in a child process)."""
    result: dict[str, Any] = {}
    # per-step figures: stamps[0] is train begin, stamps[i] the end of step i
    step_times = [b - a for a, b in itertools.pairwise(stamps)]
    per_step = [micro[i * ga : (i + 1) * ga] for i in range(len(step_times))]
    measured = slice(args.warmup_steps, args.warmup_steps + args.steps)
    times = step_times[measured]
    batches = [m for step in per_step[measured] for m in step]
    lengths = [s for m in batches for s in m["lengths"]]
    real = sum(lengths)
    padded = sum(m["padded"] for m in batches)
    loss_tokens = sum(m["loss_tokens"] for m in batches)
    seconds = sum(times)
    step_tokens = [sum(sum(m["lengths"]) for m in step) for step in per_step]
    # Per-step rates: with a few measured steps one part-filled packing bin moves the
    # window's figure a lot; the median step's rate does not move with it.
    rates = sorted(
        tokens / t for tokens, t in zip(step_tokens[measured], times, strict=True) if t > 0
    )
    from finetune_trainer.fastpath import training_flops

    flops = training_flops(
        shape, lora_rank=args.rank, sequence_lengths=lengths, loss_tokens=loss_tokens
    )
    result.update(
        {
            "measuredSteps": len(times),
            "stepTimeS": round(seconds / max(1, len(times)), 4),
            "tokensPerStep": round(real / max(1, len(times)), 1),
            "effectiveTokensPerSecond": round(real / seconds, 1) if seconds else None,
            "paddedTokensPerSecond": round(padded / seconds, 1) if seconds else None,
            "paddingShare": round(1 - real / padded, 4) if padded else None,
            "rowsPerSecond": round(len(lengths) / seconds, 2) if seconds else None,
            "mfu": round(flops / seconds / (args.peak_tflops * 1e12), 4) if seconds else None,
            "modelTflopsPerSecond": round(flops / seconds / 1e12, 1) if seconds else None,
            "medianStepTimeS": round(sorted(times)[len(times) // 2], 4) if times else None,
            "medianStepTokensPerSecond": round(rates[len(rates) // 2], 1) if rates else None,
            "stepTimesS": [round(t, 4) for t in step_times],
            "stepTokens": step_tokens,
            "stepPaddedTokens": [sum(m["padded"] for m in step) for step in per_step],
            "lossCurve": [
                {
                    "step": h["step"],
                    "loss": h["loss"],
                    "tokensSeen": sum(sum(m["lengths"]) for s in per_step[: h["step"]] for m in s),
                }
                for h in history
            ],
        }
    )
    return result


def run_trl_variant(
    variant: dict[str, Any],
    base: Any,
    tokenizer: Any,
    rows: list[dict[str, Any]],
    args: argparse.Namespace,
) -> dict[str, Any]:
    import torch
    from datasets import Dataset
    from finetune_operator.domain.estimator import ModelShape
    from finetune_trainer import compile_layers, fastpath, offload
    from trl import SFTConfig

    reset_memory()
    offload.uninstall(base)  # a variant that failed may have left it on
    compile_layers.uncompile(base)
    result: dict[str, Any] = {"variant": variant["name"]}
    config_kwargs: dict[str, Any] = {
        "per_device_train_batch_size": 4,
        "gradient_accumulation_steps": variant["ga"],
        "gradient_checkpointing": True,
        "max_length": args.seq_len,
        "packing": False,
        "completion_only_loss": True,
    }
    if variant["kind"] == "fast":
        report = fastpath.apply(
            base,
            method=args.method,
            lora_rank=args.rank,
            max_seq_length=args.seq_len,
            memory_budget_gib=variant["budget"] or args.memory_budget_gib,
            gradient_checkpointing=variant["gc"],
            lora_dropout=args.lora_dropout if variant["dropout"] is None else variant["dropout"],
            # an offloaded variant is planned (and its host buffers sized) for its tokens
            tokens_per_micro_batch=variant["tokens"] if variant.get("offload") else None,
            activation_offload=variant.get("offload"),
            fused_lora_dropout=variant["dropimpl"] == "fused",
            compile_layers=variant.get("compile", False),
            use_liger=variant.get("liger"),
            optimizer=variant["optim"],
            fused_lora_4bit=False,  # chosen below, once TRL has wrapped the model in PEFT
        )
        overrides = dict(report.sft_overrides)
        if variant["tokens"]:
            overrides["max_length"] = variant["tokens"]
        if variant["gc"] is not None:
            overrides["gradient_checkpointing"] = variant["gc"]
        config_kwargs.update(overrides)
        result["fastpath"] = report.as_dict()
    if not config_kwargs["gradient_checkpointing"]:
        base.gradient_checkpointing_disable()
    result["config"] = {k: v for k, v in config_kwargs.items()}
    result["config"]["lora_dropout"] = (
        args.lora_dropout if variant["dropout"] is None else variant["dropout"]
    )
    result["config"]["lora_dropout_impl"] = variant["dropimpl"]
    result["config"]["optim"] = variant["optim"]
    # Profiled steps (--profile) come after the measured ones: the profiler slows what it sees.
    steps = args.warmup_steps + args.steps + (PROFILED_STEPS if args.profile else 0)
    with tempfile.TemporaryDirectory() as tmp:
        sft_args = SFTConfig(
            output_dir=tmp,
            optim=variant["optim"],
            learning_rate=args.lr,
            lr_scheduler_type="constant",
            max_steps=steps,
            logging_steps=1,
            save_strategy="no",
            report_to=[],
            bf16=torch.cuda.is_available(),
            use_cpu=not torch.cuda.is_available(),
            seed=args.seed,
            dataset_num_proc=min(8, os.cpu_count() or 1),
            **config_kwargs,
        )
        torch.manual_seed(args.seed)
        clock = StepClock()
        trainer_cls = make_counting_trainer(variant["kind"] == "fast", variant.get("flatoptim"))
        trainer = trainer_cls(
            model=base,
            args=sft_args,
            train_dataset=Dataset.from_list(rows),
            processing_class=tokenizer,
            peft_config=lora_config(
                args.rank, args.lora_dropout if variant["dropout"] is None else variant["dropout"]
            ),
            callbacks=[clock.callback],
        )
        trainer.token_log = []
        if (
            variant["kind"] == "fast"
            and result["fastpath"]["lora_dropout"]["implementation"] == "fused"
        ):
            # fastpath.apply saw the base model; TRL wrapped it in PEFT since
            from finetune_trainer import lora_dropout

            patched = lora_dropout.patch_model(trainer.model)
            result["loraDropoutPatched"] = len(patched.patched)
            result["loraDropoutKept"] = patched.kept
        if variant["kind"] == "fast" and fastpath.use_fused_lora_4bit(
            False if variant["compile"] or variant["dropimpl"] == "peft" else variant["lora4bit"],
            sft_args.max_length,
        ):
            from finetune_trainer import lora_4bit

            dropk = variant.get("dropk")
            result["lora4bit"] = lora_4bit.patch_model(
                trainer.model, fastpath.DROPOUT_KERNELS if dropk is None else dropk
            ).as_dict()
        reset_memory()
        if torch.cuda.is_available():
            # Frozen weights plus the adapter, before any activation or optimiser state: the
            # fixed part of the peak, which the memory model's weight terms must match.
            result["allocatedBeforeTrainGiB"] = round(torch.cuda.memory_allocated() / GIB, 2)
        compiled = report.compiled_layers if variant["kind"] == "fast" else None
        watch = CompileWatch(compiled) if compiled is not None and compiled.compiled else None
        if watch is not None:
            trainer.add_callback(watch.callback)
        with step_profiler(variant, args) as profiler:
            if profiler is not None:
                trainer.add_callback(profiler.callback)
            trainer.train()
        result.update(peak_memory())
        if getattr(trainer, "flat_optimizer_report", None) is not None:
            result["flatOptimizer"] = trainer.flat_optimizer_report
        if compiled is not None:
            # Compilation happens in the first steps; the warm-up steps keep it off the clock.
            result["compiledLayers"] = compiled.as_dict()
            if watch is not None:
                result["compiledLayers"]["compilationsAfterStep"] = watch.per_step
            compile_layers.uncompile(base)
        offloader = offload.installed(base)
        if offloader is not None:
            result["activationOffload"] = offloader.stats().as_dict()
            offload.uninstall(base)
        peft_model = trainer.model
        history = [h for h in trainer.state.log_history if "loss" in h]
        micro = [count_tokens(kept) for kept in trainer.token_log]
        ga = sft_args.gradient_accumulation_steps
        del trainer
    result.update(
        step_metrics(clock.stamps, micro, ga, history, ModelShape.from_config(base.config), args)
    )
    # hand the base model back without adapters
    base_back = peft_model.unload() if hasattr(peft_model, "unload") else peft_model
    del peft_model
    if hasattr(base_back, "gradient_checkpointing_disable"):
        base_back.gradient_checkpointing_disable()
    reset_memory()
    return result


# ---------------------------------------------------------------------------------------------
# Unsloth, in a child process (it patches transformers, TRL and PEFT when imported)
# ---------------------------------------------------------------------------------------------


def unsloth_command(
    variant: dict[str, Any], args: argparse.Namespace, model_dir: str, out_file: Path
) -> tuple[list[str], dict[str, str]]:
    """Command line and environment of one ``unsloth[:TOKENS]`` variant (bench_unsloth.py).

    Unsloth's own TRL and datasets (``gpu_wheels.sh --unsloth``) come first on the path;
    nothing is fetched and no usage statistics are sent.
    """
    command = [
        sys.executable,
        str(HERE / "bench_unsloth.py"),
        "--model-dir", model_dir,
        "--name", variant["name"],
        "--tokens", str(variant["tokens"]),
        "--method", args.method,
        "--rank", str(args.rank),
        "--steps", str(args.steps),
        "--warmup-steps", str(args.warmup_steps),
        "--rows", str(args.rows),
        "--seed", str(args.seed),
        "--lr", str(args.lr),
        "--peak-tflops", str(args.peak_tflops),
        "--out", str(out_file),
    ]  # fmt: skip
    env = dict(os.environ)
    inherited = [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p]
    env["PYTHONPATH"] = os.pathsep.join([str(Path(args.unsloth_site).resolve()), *inherited])
    env.update({"HF_HUB_OFFLINE": "1", "UNSLOTH_DISABLE_STATISTICS": "1", "PYTHONUNBUFFERED": "1"})
    return command, env


def run_unsloth_variant(
    variant: dict[str, Any], args: argparse.Namespace, model_dir: str
) -> dict[str, Any]:
    import subprocess

    safe = "".join(c if c.isalnum() or c in "-_" else "_" for c in variant["name"])
    log_file = args.out.parent / f"{safe}.log"
    with tempfile.TemporaryDirectory() as tmp:
        out_file = Path(tmp) / "result.json"
        command, env = unsloth_command(variant, args, model_dir, out_file)
        done = subprocess.run(
            command, env=env, capture_output=True, text=True, timeout=args.unsloth_timeout
        )
        log_file.parent.mkdir(parents=True, exist_ok=True)
        log_file.write_text(done.stdout + done.stderr)
        if done.returncode != 0 or not out_file.exists():
            tail = (done.stderr or done.stdout)[-600:]
            return {"variant": variant["name"], "error": f"exit {done.returncode}: {tail}"}
        result: dict[str, Any] = json.loads(out_file.read_text())
    return result


# ---------------------------------------------------------------------------------------------
# Step-aligned equivalence: the same row groups, padded micro-batches vs one packed micro-batch
# ---------------------------------------------------------------------------------------------


def _padded_batches(rows: list[dict[str, Any]], size: int, pad_id: int) -> list[dict[str, Any]]:
    import torch

    out = []
    for i in range(0, len(rows), size):
        chunk = rows[i : i + size]
        width = max(len(r["input_ids"]) for r in chunk)
        ids = torch.full((len(chunk), width), pad_id, dtype=torch.long)
        labels = torch.full((len(chunk), width), -100, dtype=torch.long)
        mask = torch.zeros((len(chunk), width), dtype=torch.long)
        for j, r in enumerate(chunk):
            n = len(r["input_ids"])
            ids[j, :n] = torch.tensor(r["input_ids"])
            labels[j, :n] = torch.tensor(
                [
                    t if m else -100
                    for t, m in zip(r["input_ids"], r["completion_mask"], strict=True)
                ]
            )
            mask[j, :n] = 1
        out.append({"input_ids": ids, "attention_mask": mask, "labels": labels})
    return out


def _packed_batch(rows: list[dict[str, Any]]) -> dict[str, Any]:
    import torch

    ids = [t for r in rows for t in r["input_ids"]]
    labels = [
        t if m else -100
        for r in rows
        for t, m in zip(r["input_ids"], r["completion_mask"], strict=True)
    ]
    pos = [p for r in rows for p in range(len(r["input_ids"]))]
    lengths = [len(r["input_ids"]) for r in rows]
    cu = torch.tensor([0, *list(__import__("itertools").accumulate(lengths))], dtype=torch.int32)
    return {
        "input_ids": torch.tensor([ids]),
        "labels": torch.tensor([labels]),
        "position_ids": torch.tensor([pos]),
        "cu_seq_lens_q": cu,
        "cu_seq_lens_k": cu,
        "max_length_q": max(lengths),
        "max_length_k": max(lengths),
    }


def _token_loss_sum(model: Any, batch: dict[str, Any]) -> tuple[Any, int]:
    """Sum of next-token cross-entropy over labelled positions, never across row boundaries."""
    import torch.nn.functional as F

    device = next(p for p in model.parameters() if p.requires_grad).device
    inputs = {
        k: (v.to(device) if hasattr(v, "to") else v) for k, v in batch.items() if k != "labels"
    }
    labels = batch["labels"].to(device)
    if "position_ids" in batch:  # a packed row: the first token of each row has no predecessor
        labels = labels.clone()
        labels[inputs["position_ids"] == 0] = -100
    logits = model(**inputs, use_cache=False).logits
    shift_logits = logits[:, :-1].float()
    shift_labels = labels[:, 1:]
    loss = F.cross_entropy(
        shift_logits.reshape(-1, shift_logits.shape[-1]),
        shift_labels.reshape(-1),
        ignore_index=-100,
        reduction="sum",
    )
    return loss, int((shift_labels != -100).sum())


def equivalence_trajectory(
    base: Any,
    rows: list[dict[str, Any]],
    mode: str,
    args: argparse.Namespace,
    pad_id: int,
    dropimpl: str = "peft",
    mask_seed: int | None = None,
) -> list[float]:
    """Loss per step; ``dropimpl`` picks the LoRA dropout (``peft``, ``fused``, ``lora4bit``:
    the fused one inside each 4-bit projection's single autograd function, or ``kernels``:
    that function with the dropout drawn in its adapter matmuls, dropout_kernels.py),
    ``mask_seed`` reseeds the random stream after the adapter's initialisation (only the
    dropout masks change)."""
    import torch
    from finetune_trainer import lora_4bit, lora_dropout
    from peft import get_peft_model

    reset_memory()
    torch.manual_seed(args.seed)
    model = get_peft_model(base, lora_config(args.rank))
    if dropimpl in ("fused", "lora4bit", "kernels"):
        lora_dropout.patch_model(model)
    if mask_seed is not None:
        torch.manual_seed(mask_seed)
    # checkpointing keeps the full-vocabulary logits of a 16-row group within memory
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.enable_input_require_grads()
    for p in model.parameters():
        if p.requires_grad:
            p.data = p.data.to(torch.bfloat16)
    if dropimpl in ("lora4bit", "kernels"):
        report = lora_4bit.patch_model(model, dropout_kernels=dropimpl == "kernels")
        if dropimpl == "kernels" and not report.dropout_kernels:
            raise SystemExit("the dropout kernels cannot run here (is Triton installed?)")
    params = [p for p in model.parameters() if p.requires_grad]
    optim = torch.optim.AdamW(params, lr=args.lr, weight_decay=0.0)
    model.train()
    group = args.equivalence_group
    losses = []
    for step in range(args.equivalence_steps):
        chunk = rows[step * group : (step + 1) * group]
        batches = (
            _padded_batches(chunk, 4, pad_id) if mode == "baseline" else [_packed_batch(chunk)]
        )
        total = sum(int((b["labels"][:, 1:] != -100).sum()) for b in batches)
        step_loss = 0.0
        for b in batches:
            loss_sum, _n = _token_loss_sum(model, b)
            (loss_sum / total).backward()
            step_loss += float(loss_sum.detach()) / total
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optim.step()
        optim.zero_grad(set_to_none=True)
        losses.append(step_loss)
    back = model.unload()
    back.gradient_checkpointing_disable()
    del model, optim, params
    reset_memory()
    return losses


def dropout_equivalence(
    base: Any, rows: list[dict[str, Any]], args: argparse.Namespace, pad_id: int
) -> dict[str, Any]:
    """Packed steps on identical rows with PEFT's dropout and the fused one.

    From the same seed the fused dropout draws PEFT's masks (same kernel, same generator
    state), so its curve should follow PEFT's up to rounding. The control is PEFT against
    itself with another mask stream: how far dropout noise alone moves the curve. The fused
    dropout passes when its largest per-step difference from PEFT is at most twice the
    control's (or 0.5%). ``lora4bit`` (the fused dropout inside each 4-bit projection's
    single autograd function, lora_4bit.py) is held to the same tolerance.
    """
    from finetune_trainer import fastpath

    fastpath.apply(
        base, method=args.method, lora_rank=args.rank, max_seq_length=args.seq_len,
        fused_lora_dropout=False,
    )  # fmt: skip
    saved = args.equivalence_steps
    args.equivalence_steps = args.dropout_equivalence_steps
    # (dropout implementation, mask seed) of each curve; PEFT's two are always run
    plans = {
        "peft": ("peft", 1),
        "peftOtherMasks": ("peft", 2),
        "fused": ("fused", 1),
        "lora4bit": ("lora4bit", 1),
        "kernels": ("kernels", 1),
    }
    wanted = {"peft", "peftOtherMasks", *args.dropout_equivalence_curves.split(",")}
    if unknown := wanted - plans.keys():
        raise SystemExit(
            f"unknown --dropout-equivalence-curves {sorted(unknown)}: use {list(plans)}"
        )
    try:
        curves = {
            name: equivalence_trajectory(base, rows, "fast", args, pad_id, impl, seed)
            for name, (impl, seed) in plans.items()
            if name in wanted
        }
    finally:
        args.equivalence_steps = saved

    def rel(a: list[float], b: list[float]) -> list[float]:
        return [abs(x - y) / y for x, y in zip(a, b, strict=True)]

    control = rel(curves["peftOtherMasks"], curves["peft"])
    tolerance = max(2 * max(control), 0.005)
    result: dict[str, Any] = {
        "steps": args.dropout_equivalence_steps,
        "rowsPerStep": args.equivalence_group,
        "loraDropout": 0.05,
        **curves,
        "controlMaxRelativeDifference": max(control),
        "controlMeanRelativeDifference": sum(control) / len(control),
        "tolerance": tolerance,
    }
    for name in ("fused", "lora4bit", "kernels"):
        if name in curves:
            diff = rel(curves[name], curves["peft"])
            result[f"{name}VsPeftMaxRelativeDifference"] = max(diff)
            result[f"{name}VsPeftMeanRelativeDifference"] = sum(diff) / len(diff)
            result[f"{name}WithinTolerance"] = max(diff) <= tolerance
    if "fused" in curves:  # the name earlier results use
        result["withinTolerance"] = result["fusedWithinTolerance"]
    return result


# ---------------------------------------------------------------------------------------------


def print_table(results: list[dict[str, Any]], baseline: dict[str, Any] | None) -> None:
    cols = [
        "variant",
        "tok/s (eff)",
        "tok/s (median step)",
        "x base",
        "step s",
        "tok/step",
        "pad %",
        "peak GiB",
        "MFU %",
        "final loss",
    ]
    print("\n" + " | ".join(cols))
    print("-" * 100)
    for r in results:
        if "error" in r:
            print(f"{r['variant']} | ERROR {r['error'][:80]}")
            continue
        speed = r.get("effectiveTokensPerSecond") or 0
        ratio = (
            speed / baseline["effectiveTokensPerSecond"]
            if baseline and baseline.get("effectiveTokensPerSecond")
            else float("nan")
        )
        loss = r["lossCurve"][-1]["loss"] if r.get("lossCurve") else float("nan")
        print(
            f"{r['variant']} | {speed:,.0f} | {r.get('medianStepTokensPerSecond') or 0:,.0f} | {ratio:.2f} | {r['stepTimeS']:.3f} | {r['tokensPerStep']:,.0f} | "
            f"{100 * (r['paddingShare'] or 0):.1f} | {r.get('peakReservedGiB', float('nan'))} | "
            f"{100 * (r['mfu'] or 0):.1f} | {loss:.4f}"
        )


def use_planner_settings(coefficients: Path | None, auto_offload: bool) -> None:
    """Point the packed planner (the trainer's and this harness's) at other coefficients or
    keep it from offloading by itself, for this process."""
    from finetune_operator.domain import packed_memory

    if coefficients is not None:
        fields = json.loads(coefficients.read_text())
        packed_memory.COEFFICIENTS = packed_memory.MemoryCoefficients(**fields)
    if not auto_offload:
        packed_memory.AUTO_ACTIVATION_OFFLOAD = False


def planner_settings() -> dict[str, Any]:
    import dataclasses

    from finetune_operator.domain import packed_memory

    return {
        "coefficients": dataclasses.asdict(packed_memory.COEFFICIENTS),
        "autoActivationOffload": packed_memory.AUTO_ACTIVATION_OFFLOAD,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        epilog=__doc__.split("\n\n", 1)[1],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--model-dir", help="existing model directory (config, weights, tokenizer)")
    parser.add_argument(
        "--shape",
        default="llama3-8b",
        help="build a random model of this shape (bench/shapes.py) when --model-dir is missing",
    )
    parser.add_argument(
        "--build-dir",
        default=os.path.join(tempfile.gettempdir(), "bench-model"),
        help="where to write the random model",
    )
    parser.add_argument("--method", choices=["qlora", "lora"], default="qlora")
    parser.add_argument("--rank", type=int, default=64)
    parser.add_argument(
        "--seq-len", type=int, default=2048, help="longest row (baseline max_length)"
    )
    parser.add_argument(
        "--variants", default="baseline,fast", help="comma list: baseline, fast[:TOKENS[:gc|nogc]]"
    )
    parser.add_argument("--steps", type=int, default=8, help="measured optimiser steps per variant")
    parser.add_argument("--warmup-steps", type=int, default=3)
    parser.add_argument("--rows", type=int, default=1500)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument(
        "--memory-budget-gib",
        type=float,
        default=None,
        help="fast path memory budget (default: the whole GPU)",
    )
    parser.add_argument("--equivalence-steps", type=int, default=0)
    parser.add_argument(
        "--equivalence-group", type=int, default=16, help="rows per equivalence step"
    )
    parser.add_argument(
        "--dropout-equivalence-steps",
        type=int,
        default=0,
        help="packed steps with PEFT's LoRA dropout and the fused one on identical rows",
    )
    parser.add_argument(
        "--dropout-equivalence-curves",
        default="fused,lora4bit,kernels",
        help="which dropout implementations to hold against PEFT's (comma-separated: fused, "
        "lora4bit, kernels); PEFT's own two curves always run",
    )
    parser.add_argument("--peak-tflops", type=float, default=800.0)
    parser.add_argument(
        "--lora-dropout", type=float, default=0.05, help="LoRA dropout (a variant's dropout= wins)"
    )
    parser.add_argument(
        "--profile",
        action="store_true",
        help="profile two measured steps of every variant (profile-*.txt next to --out)",
    )
    parser.add_argument(
        "--drop-build",
        action="store_true",
        help="delete the built random model once loaded (several shapes on one small disk)",
    )
    parser.add_argument(
        "--unsloth-site",
        default=os.environ.get("UNSLOTH_SITE", str(HERE.parent / ".gpu" / "unsloth")),
        help="unpacked Unsloth wheels for unsloth variants (gpu_wheels.sh --unsloth DIR)",
    )
    parser.add_argument(
        "--unsloth-timeout", type=float, default=300.0, help="seconds per unsloth variant"
    )
    parser.add_argument(
        "--memory-coefficients",
        type=Path,
        help="JSON of packed-memory coefficients the planner uses instead of its own "
        "(compare_packed_memory.py --fit --write): measures what a refit would pick",
    )
    parser.add_argument(
        "--no-auto-offload",
        dest="auto_offload",
        action="store_false",
        help="keep the planner from choosing activation offload by itself (fast@BUDGET "
        "variants; it does by default, decision 2100): what plain checkpointing gets",
    )
    parser.add_argument("--out", type=Path, default=Path("bench-train.json"))
    args = parser.parse_args(argv)
    use_planner_settings(args.memory_coefficients, args.auto_offload)
    # As the trainer does before torch is imported (finetune_trainer.cli): the memory model is
    # calibrated for expandable allocator segments, so the harness measures with them too.
    os.environ.setdefault("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")

    import torch
    from shapes import build_random_model
    from transformers import AutoTokenizer

    env = environment()
    print(json.dumps(env), flush=True)
    t0 = time.perf_counter()
    model_dir = args.model_dir or str(
        build_random_model(
            args.shape, args.build_dir, device="cuda" if torch.cuda.is_available() else "cpu"
        )
    )
    t_build = time.perf_counter() - t0
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    rows = make_rows(args.rows, args.seed)
    variants = [parse_variant(v) for v in args.variants.split(",") if v]
    out: dict[str, Any] = {"environment": env, "results": []}
    # Unsloth runs in child processes, before this one takes any GPU memory.
    for variant in [v for v in variants if v["kind"] == "unsloth"]:
        started = time.perf_counter()
        try:
            res = run_unsloth_variant(variant, args, str(model_dir))
        except Exception as exc:
            res = {"variant": variant["name"], "error": f"{type(exc).__name__}: {exc}"}
        res["wallS"] = round(time.perf_counter() - started, 1)
        out["results"].append(res)
        print(json.dumps({k: v for k, v in res.items() if k != "lossCurve"}), flush=True)
    t0 = time.perf_counter()
    base = load_base(model_dir, args.method)
    t_load = time.perf_counter() - t0
    if args.drop_build and not args.model_dir:
        import shutil

        shutil.rmtree(model_dir, ignore_errors=True)
    print(f"model ready: build {t_build:.0f}s, load {t_load:.0f}s", flush=True)
    out |= {
        "model": {
            "shape": args.shape if not args.model_dir else model_dir,
            "shapeName": args.shape,
            "method": args.method,
            "rank": args.rank,
        },
        "data": length_stats([len(r["input_ids"]) for r in rows]),
        "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "planner": planner_settings(),
    }
    baseline_result = None

    def save() -> None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(out, indent=1))

    def run(variant: dict[str, Any]) -> None:
        nonlocal baseline_result
        started = time.perf_counter()
        try:
            res = run_trl_variant(variant, base, tokenizer, rows, args)
        except Exception as exc:  # one failing variant must not hide the others
            traceback.print_exc()
            res = {"variant": variant["name"], "error": f"{type(exc).__name__}: {exc}"}
            reset_memory()
        res["wallS"] = round(time.perf_counter() - started, 1)
        out["results"].append(res)
        if variant["kind"] == "baseline" and "error" not in res:
            baseline_result = res
        print(json.dumps({k: v for k, v in res.items() if k != "lossCurve"}), flush=True)
        save()

    for v in [v for v in variants if v["kind"] == "baseline"]:
        run(v)
    if args.equivalence_steps:
        from finetune_trainer import fastpath

        eq: dict[str, Any] = {
            "steps": args.equivalence_steps,
            "rowsPerStep": args.equivalence_group,
            "lr": args.lr,
        }
        try:
            eq_rows = rows[::-1]  # rows the throughput runs touched least
            eq["baseline"] = equivalence_trajectory(
                base, eq_rows, "baseline", args, tokenizer.pad_token_id
            )
            report = fastpath.apply(
                base, method=args.method, lora_rank=args.rank, max_seq_length=args.seq_len
            )
            eq["fastpathAttention"] = report.attention
            eq["fastpathKernels"] = report.kernels
            eq["fast"] = equivalence_trajectory(base, eq_rows, "fast", args, tokenizer.pad_token_id)
            rel = [abs(f - b) / b for f, b in zip(eq["fast"], eq["baseline"], strict=True)]
            eq["relativeDifference"] = rel
            eq["maxRelativeDifference"] = max(rel)
            eq["finalRelativeDifference"] = rel[-1]
            eq["lossDrop"] = eq["baseline"][0] - eq["baseline"][-1]
        except Exception as exc:
            traceback.print_exc()
            eq["error"] = f"{type(exc).__name__}: {exc}"
            reset_memory()
        out["equivalence"] = eq
        print(json.dumps(eq), flush=True)
        save()
    if args.dropout_equivalence_steps:
        try:
            deq = dropout_equivalence(base, rows[::-1], args, tokenizer.pad_token_id)
        except Exception as exc:
            traceback.print_exc()
            deq = {"error": f"{type(exc).__name__}: {exc}"}
            reset_memory()
        out["dropoutEquivalence"] = deq
        print(json.dumps(deq), flush=True)
        save()
    for v in [v for v in variants if v["kind"] == "fast"]:
        run(v)
    print_table(out["results"], baseline_result)
    if "equivalence" in out and "maxRelativeDifference" in out["equivalence"]:
        e = out["equivalence"]
        print(
            f"\nequivalence: {e['steps']} steps, loss {e['baseline'][0]:.4f} -> {e['baseline'][-1]:.4f} (baseline) / {e['fast'][-1]:.4f} (fast); max rel diff {100 * e['maxRelativeDifference']:.2f}%"
        )
    d = out.get("dropoutEquivalence", {})
    if "tolerance" in d:
        others = "; ".join(
            f"{name} {d[name][-1]:.4f}, max {100 * d[f'{name}VsPeftMaxRelativeDifference']:.2f}% "
            f"from peft (within: {d[f'{name}WithinTolerance']})"
            for name in ("fused", "lora4bit", "kernels")
            if name in d
        )
        print(
            f"dropout equivalence: {d['steps']} packed steps, loss {d['peft'][0]:.4f} -> "
            f"{d['peft'][-1]:.4f} (peft); peft vs peft (other masks) max "
            f"{100 * d['controlMaxRelativeDifference']:.2f}%, tolerance "
            f"{100 * d['tolerance']:.2f}%; {others}"
        )
    save()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
