"""Training: load the base model (4-bit for QLoRA), attach LoRA, run TRL's SFTTrainer with
resumable checkpoints and progress lines, save the adapter, optionally merge it.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from finetune_operator.api.finetunejob import FineTuneJobSpec
from finetune_operator.api.trainer_config import TrainerConfig
from finetune_operator.domain.uris import StorageUri

from .checkpoints import make_checkpoint_callback, prepare_for_resume, run_fingerprint
from .data import PreparedData, TokenizedExample
from .errors import invalid_config, model_not_found, out_of_memory, training_failed
from .progress import make_progress_callback

if TYPE_CHECKING:
    import torch
    from transformers import PreTrainedTokenizerBase
    from trl import SFTConfig

    from .remote_checkpoints import CheckpointSync

log = logging.getLogger(__name__)

BNB_OPTIMIZERS = {"paged_adamw_8bit", "adamw_8bit", "paged_adamw_32bit"}
# Rows of the eval set scored for evalLoss during training (the evaluator scores them all).
IN_TRAINING_EVAL_ROWS = 256


@dataclass
class TrainOutcome:
    model: Any  # the peft model (transformers/peft models are not typed precisely enough)
    adapter_dir: Path
    global_step: int
    log_history: list[dict[str, Any]]
    metrics: dict[str, float]
    training_arguments: dict[str, Any]
    resumed_from: str | None
    notes: list[str] = field(default_factory=list)
    # Uploads checkpoints of an s3:// output (rank 0); the final upload waits for it.
    checkpoint_sync: CheckpointSync | None = None


# ------------------------------------------------------------------ choices (pure-ish)


def resolve_device(requested: str) -> str:
    import torch

    if requested == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if requested == "cuda" and not torch.cuda.is_available():
        raise training_failed(
            "device: cuda was requested but no CUDA GPU is visible in the container"
        )
    return requested


def default_batch_and_checkpointing(device: str) -> tuple[int, bool]:
    """Conservative choice when no estimator is available."""
    return (4, True) if device == "cuda" else (2, False)


def resolve_batch_and_checkpointing(
    spec: FineTuneJobSpec, device: str, model_dir: str | Path
) -> tuple[int, bool, str]:
    """Batch size and gradient checkpointing in force, and who chose them.

    Explicit values win. ``auto``/unset go to the shared estimator when it is importable
    (``finetune_operator.domain.estimator.choose_batch_and_checkpointing``), else to a safe default.
    """
    batch = spec.training.batch_size
    gc = spec.training.gradient_checkpointing
    if batch != "auto" and gc is not None:
        return int(batch), bool(gc), "spec"
    default_batch, default_gc = default_batch_and_checkpointing(device)
    chosen_batch, chosen_gc, source = default_batch, default_gc, "default"
    if device == "cuda":
        estimate = _estimator_choice(spec, model_dir)
        if estimate is not None:
            chosen_batch, chosen_gc = estimate
            source = "estimator"
    return (
        int(batch) if batch != "auto" else chosen_batch,
        bool(gc) if gc is not None else chosen_gc,
        source,
    )


def _estimator_choice(spec: FineTuneJobSpec, model_dir: str | Path) -> tuple[int, bool] | None:
    import torch

    gpu_gib = torch.cuda.get_device_properties(0).total_memory / 2**30
    config_path = Path(model_dir) / "config.json"
    try:
        model_config = json.loads(config_path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        log.warning("cannot read %s for the memory estimate (%s); using defaults", config_path, exc)
        return None
    return estimator_choice(spec, model_config, gpu_gib)


def estimator_choice(
    spec: FineTuneJobSpec, model_config: dict[str, Any], gpu_memory_gib: float
) -> tuple[int, bool] | None:
    """Batch and checkpointing from the shared VRAM estimator, or None when it cannot choose."""
    from finetune_operator.domain.estimator import (
        ModelShape,
        TrainingSetup,
        choose_batch_and_checkpointing,
    )

    batch = spec.training.batch_size
    try:
        chosen_batch, chosen_gc, _estimate = choose_batch_and_checkpointing(
            ModelShape.from_hf_config(model_config),
            TrainingSetup.from_spec(spec),
            gpu_memory_gib,
            batch=batch if isinstance(batch, int) else None,
            gradient_checkpointing=spec.training.gradient_checkpointing,
        )
    except (ValueError, TypeError) as exc:
        log.warning("estimator could not choose batch/checkpointing (%s); using defaults", exc)
        return None
    return int(chosen_batch), bool(chosen_gc)


def _bnb_optimizer_works(name: str) -> bool:
    """Take one real step with the bitsandbytes optimizer on a CPU tensor."""
    try:
        import bitsandbytes as bnb
        import torch

        cls = {
            "paged_adamw_8bit": bnb.optim.PagedAdamW8bit,
            "adamw_8bit": bnb.optim.AdamW8bit,
            "paged_adamw_32bit": bnb.optim.PagedAdamW32bit,
        }[name]
        p = torch.nn.Parameter(torch.zeros(4096))
        opt = cls([p], lr=1e-3)
        p.grad = torch.ones_like(p)
        opt.step()
        return True
    except Exception as exc:
        log.warning("optimizer %s cannot run here: %s", name, exc)
        return False


def resolve_optimizer(name: str, device: str) -> tuple[str, str | None]:
    """The optimizer to use and a note when it had to be replaced."""
    if device == "cpu" and name in BNB_OPTIMIZERS and not _bnb_optimizer_works(name):
        return "adamw_torch", f"optimizer {name} does not run on this CPU; used adamw_torch instead"
    if device == "cpu" and name == "adamw_torch_fused":
        return name, None
    return name, None


def local_rank() -> int:
    """This process's GPU under torchrun (0 when run directly)."""
    return int(os.environ.get("LOCAL_RANK", "0"))


def torch_dtype(name: str) -> torch.dtype:
    import torch

    return {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}[name]


def compute_dtype_name(spec: FineTuneJobSpec, device: str) -> str:
    """Matmul dtype: the spec's on GPU, float32 on CPU (no fast bf16/fp16 matmuls there)."""
    if device == "cpu":
        return "float32"
    quant = spec.resolved_quantization()
    if quant is not None:
        return quant.compute_dtype
    import torch

    return "bfloat16" if torch.cuda.is_bf16_supported() else "float16"


# ------------------------------------------------------------------ model


def base_model_kwargs(spec: FineTuneJobSpec, device: str) -> dict[str, Any]:
    """`from_pretrained` arguments for the base model: dtype, placement, 4-bit for QLoRA.

    Training and evaluation load the base the same way, so metrics describe the model that
    was trained.
    """
    from transformers import BitsAndBytesConfig

    dtype = torch_dtype(compute_dtype_name(spec, device))
    # Under DDP each process holds a whole copy on its own GPU (4-bit weights cannot move
    # after loading, so they are placed on the local rank's GPU right away).
    kwargs: dict[str, Any] = {
        "dtype": dtype,
        "device_map": {"": local_rank()} if device == "cuda" else {"": "cpu"},
        "trust_remote_code": spec.base_model.trust_remote_code,
    }
    quant = spec.resolved_quantization()
    if quant is not None:
        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type=quant.type,
            bnb_4bit_use_double_quant=quant.double_quant,
            bnb_4bit_compute_dtype=dtype,
        )
    return kwargs


def load_model_for_training(
    spec: FineTuneJobSpec, model_dir: str | Path, device: str, gradient_checkpointing: bool
) -> Any:
    """Base model (4-bit for QLoRA, 16/32-bit for LoRA) with a fresh LoRA adapter attached."""
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training
    from transformers import AutoModelForCausalLM

    quant = spec.resolved_quantization()
    try:
        model = AutoModelForCausalLM.from_pretrained(
            str(model_dir), **base_model_kwargs(spec, device)
        )
    except OSError as exc:
        raise model_not_found(f"cannot load the base model from {model_dir}: {exc}") from exc
    if quant is not None:
        model = prepare_model_for_kbit_training(
            model,
            use_gradient_checkpointing=gradient_checkpointing,
            gradient_checkpointing_kwargs={"use_reentrant": False},
        )
    targets = spec.lora.target_modules
    head = model.get_output_embeddings()
    head_names = {n for n, m in model.named_modules() if m is head and head is not None}
    if any(t in head_names or t == "lm_head" for t in targets):
        raise invalid_config(
            f"lora.targetModules {targets} include the output head, which SFT training cannot "
            "adapt (the loss reads its weight directly): remove it, or use [all-linear]"
        )
    lora = LoraConfig(
        r=spec.lora.r,
        lora_alpha=spec.lora.alpha,
        lora_dropout=spec.lora.dropout,
        target_modules="all-linear" if targets == ["all-linear"] else list(targets),
        task_type="CAUSAL_LM",
        bias="none",
    )
    try:
        return get_peft_model(model, lora)
    except ValueError as exc:
        raise training_failed(
            f"lora.targetModules {targets} do not match the model's layers ({exc}); use "
            "[all-linear] or names such as q_proj, v_proj"
        ) from exc


def to_dataset(rows: list[TokenizedExample]) -> Any:  # a datasets.Dataset (untyped)
    from datasets import Dataset

    return Dataset.from_dict(
        {"input_ids": [r.input_ids for r in rows], "labels": [r.labels for r in rows]}
    )


def build_sft_config(
    config: TrainerConfig,
    device: str,
    batch: int,
    gradient_checkpointing: bool,
    optimizer: str,
    checkpoint_dir: Path,
    has_eval: bool,
) -> SFTConfig:
    from trl import SFTConfig

    from .distributed import ddp_timeout_seconds, plan_batch, world

    t = config.spec.training
    dtype = compute_dtype_name(config.spec, device)
    me = world()
    accumulation = plan_batch(batch, t.gradient_accumulation, me.world_size).accumulation
    ddp: dict[str, Any] = {}
    if me.distributed:
        ddp = {
            # LoRA touches every adapted layer each step; searching for unused ones costs
            # a graph walk per step and breaks with gradient checkpointing.
            "ddp_find_unused_parameters": False,
            "ddp_backend": "nccl" if device == "cuda" else "gloo",
            "ddp_timeout": ddp_timeout_seconds(),
        }
    return SFTConfig(
        output_dir=str(checkpoint_dir),
        per_device_train_batch_size=batch,
        per_device_eval_batch_size=batch,
        gradient_accumulation_steps=accumulation,
        gradient_checkpointing=gradient_checkpointing,
        gradient_checkpointing_kwargs={"use_reentrant": False},
        learning_rate=t.learning_rate,
        lr_scheduler_type=t.scheduler,
        warmup_steps=t.warmup_ratio,
        num_train_epochs=t.epochs,
        max_steps=t.max_steps or -1,
        optim=optimizer,
        weight_decay=t.weight_decay,
        max_grad_norm=t.max_grad_norm,
        seed=t.seed,
        data_seed=t.seed,
        logging_steps=t.logging_every_steps,
        save_strategy="steps",
        save_steps=t.checkpoint_every_steps,
        save_total_limit=2,
        eval_strategy="steps" if has_eval else "no",
        eval_steps=t.checkpoint_every_steps if has_eval else None,
        bf16=device == "cuda" and dtype == "bfloat16",
        fp16=device == "cuda" and dtype == "float16",
        use_cpu=device == "cpu",
        max_length=t.max_seq_length,
        packing=t.packing,
        packing_strategy="bfd",
        report_to=[],
        disable_tqdm=True,
        include_num_input_tokens_seen="non_padding",
        dataloader_num_workers=0,
        **ddp,
    )


def training_arguments_summary(
    config: TrainerConfig, device: str, batch: int, gc: bool, optimizer: str
) -> dict[str, Any]:
    """The settings that shaped the adapter (recorded in manifest.json)."""
    from .distributed import plan_batch, world

    t = config.spec.training
    quant = config.spec.resolved_quantization()
    batch_plan = plan_batch(batch, t.gradient_accumulation, world().world_size)
    return {
        "device": device,
        "epochs": t.epochs,
        "maxSteps": t.max_steps,
        "learningRate": t.learning_rate,
        "scheduler": t.scheduler,
        "warmupRatio": t.warmup_ratio,
        "maxSeqLength": t.max_seq_length,
        "batchSize": batch,
        "gradientAccumulation": t.gradient_accumulation,
        "worldSize": batch_plan.world_size,
        "globalBatchSize": batch_plan.global_batch,
        "gradientCheckpointing": gc,
        "optimizer": optimizer,
        "weightDecay": t.weight_decay,
        "maxGradNorm": t.max_grad_norm,
        "packing": t.packing,
        "seed": t.seed,
        "dropout": config.spec.lora.dropout,
        "computeDtype": compute_dtype_name(config.spec, device),
        "quantization": quant.model_dump(by_alias=True, mode="json") if quant else None,
        "completionOnly": config.spec.dataset.completion_only,
    }


# ------------------------------------------------------------------ the fast path


def apply_fast_path(
    config: TrainerConfig, model: Any, args: SFTConfig, device: str, optimizer: str
) -> str | None:
    """With packing on a GPU: varlen attention, fused kernels, a planned token budget.

    See ``fastpath.py``. An explicit ``batchSize`` becomes a budget of batchSize x
    maxSeqLength tokens per packed micro-batch; ``auto`` lets the planner pick it for the
    GPU's free memory. Changes ``args`` (and the model's checkpointing) in place. Returns
    the note to log (:func:`fast_path` also returns the plan).
    """
    applied = fast_path(config, model, args, device, optimizer)
    return applied[0] if applied else None


def fast_path(
    config: TrainerConfig, model: Any, args: SFTConfig, device: str, optimizer: str
) -> tuple[str, dict[str, Any] | None] | None:
    """:func:`apply_fast_path`, returning its note and the memory plan trained with."""
    t = config.spec.training
    if not t.packing or device != "cuda":
        return None
    from . import fastpath

    explicit = t.batch_size if isinstance(t.batch_size, int) else None
    report = fastpath.apply(
        model,
        method=config.spec.method,
        lora_rank=config.spec.lora.r,
        max_seq_length=t.max_seq_length,
        optimizer=optimizer,
        gradient_checkpointing=t.gradient_checkpointing,
        tokens_per_micro_batch=explicit * t.max_seq_length if explicit else None,
        compute_dtype=compute_dtype_name(config.spec, device),
        lora_dropout=config.spec.lora.dropout,
    )
    for key, value in report.sft_overrides.items():
        setattr(args, key, value)
    if hasattr(args, "activation_checkpointing"):  # transformers >= 5.2x reads the new name
        args.activation_checkpointing = args.gradient_checkpointing
    args.per_device_eval_batch_size = 1
    if not args.gradient_checkpointing:
        model.gradient_checkpointing_disable()
    note = (
        f"fast path: {report.attention} attention, kernels {report.kernels or 'none'}, "
        f"{args.max_length} tokens per packed micro-batch, gradient checkpointing "
        f"{bool(args.gradient_checkpointing)}, LoRA dropout "
        f"{report.lora_dropout.get('implementation', 'peft')}"
    )
    if report.activation_offload:
        note += f", activation offload to host memory ({report.activation_offload['hostGiB']} GiB)"
    if report.lora_4bit is not None and report.lora_4bit["patched"]:
        note += f", {report.lora_4bit['patched']} 4-bit projections fused with their adapters"
        if report.lora_4bit.get("dropout_kernels"):
            note += " (LoRA dropout drawn inside their matmuls)"
        elif "dropout_kernels_note" in report.lora_4bit:
            note += f" (PyTorch's dropout: {report.lora_4bit['dropout_kernels_note']})"
    if report.compiled_layers is not None:
        choice = report.compiled_layers
        note += (
            f", {choice.layers} decoder layers compiled ({choice.backend})"
            if choice.compiled
            else f", decoder layers not compiled ({choice.note})"
        )
    if report.plan and report.plan.get("within_prediction_margin"):
        note += (
            f"; predicted peak {report.plan['predicted_peak_gib']:.1f} GiB over the "
            f"{report.plan['memory_budget_gib']:.1f} GiB budget, within the prediction margin: "
            "trying the smallest micro-batch"
        )
    log.info(note)
    return note, report.plan


def out_of_gpu_memory_message(
    batch: int, gc: bool, method: str, plan: dict[str, Any] | None
) -> str:
    """What ran out of GPU memory and what to change; ``plan``: the fast path's memory plan
    (packing on a GPU), whose micro-batch is tokens, not rows."""
    qlora = "" if method == "qlora" else ", use method qlora"
    if plan is None:
        return (
            f"out of GPU memory at batch size {batch} (gradient checkpointing {gc}): set "
            "training.batchSize lower, enable training.gradientCheckpointing, shorten "
            "training.maxSeqLength or use method qlora"
        )
    where = (
        f"out of GPU memory at {plan['tokens_per_micro_batch']} tokens per packed micro-batch "
        f"(gradient checkpointing {gc})"
    )
    if plan.get("within_prediction_margin"):
        return (
            f"{where}, the smallest configuration, tried because its predicted peak of "
            f"{plan['predicted_peak_gib']:.1f} GiB was over the {plan['memory_budget_gib']:.1f} "
            "GiB budget by less than the memory model's prediction margin: shorten "
            f"training.maxSeqLength (a micro-batch is never smaller){qlora} or use a GPU with "
            "more memory (resources.gpuProduct)"
        )
    return (
        f"{where}: set a smaller training.batchSize (batchSize x maxSeqLength tokens), enable "
        f"training.gradientCheckpointing, shorten training.maxSeqLength{qlora} or use a GPU "
        "with more memory (resources.gpuProduct)"
    )


# ------------------------------------------------------------------ the step


def _is_oom(exc: BaseException) -> bool:
    import torch

    return isinstance(exc, torch.cuda.OutOfMemoryError) or "out of memory" in str(exc).lower()


def train_adapter(
    config: TrainerConfig, prepared: PreparedData, tokenizer: PreTrainedTokenizerBase
) -> TrainOutcome:
    """Train (resuming when a complete checkpoint of this run exists) and save the adapter."""
    import torch
    from transformers.trainer_callback import PrinterCallback
    from trl import SFTTrainer

    out = Path(config.paths.output_dir)
    checkpoint_dir = out / "checkpoints"
    device = resolve_device(config.device)
    batch, gc, choice_source = resolve_batch_and_checkpointing(
        config.spec, device, config.paths.base_model
    )
    optimizer, opt_note = resolve_optimizer(config.spec.training.optimizer, device)
    notes = [f"device {device}; batch {batch}, gradient checkpointing {gc} ({choice_source})"]
    if opt_note:
        log.warning(opt_note)
        notes.append(opt_note)

    from .distributed import plan_batch, select_resume, world

    me = world()
    if me.distributed:
        batch_plan = plan_batch(batch, config.spec.training.gradient_accumulation, me.world_size)
        notes.append(
            f"data-parallel over {me.world_size} processes: gradient accumulation "
            f"{batch_plan.accumulation} per process, global batch {batch_plan.global_batch}"
        )
        if (batch_note := batch_plan.note()) is not None:
            log.warning(batch_note)
            notes.append(batch_note)

    fingerprint = run_fingerprint(config.spec, prepared.report.digest)
    # Only rank 0 tidies the folder; the others read the same answer without writing.
    resume = (
        prepare_for_resume(checkpoint_dir, fingerprint)
        if me.is_main
        else select_resume(checkpoint_dir, fingerprint)
    )
    remote = StorageUri.parse(config.spec.output.uri).scheme == "s3"
    if remote and me.distributed:
        notes.append(
            "checkpoints stay in the pod's scratch folder: s3:// checkpoint sync covers "
            "single-process runs"
        )
    elif remote and resume is None:
        from .remote_checkpoints import restore_latest

        resume = restore_latest(
            config.spec.output.uri, checkpoint_dir, fingerprint, _secret_name(config)
        )
    if resume is not None:
        log.info("resuming from %s", resume)
        notes.append(f"resumed from {resume.name}")
    sync = None
    if remote and not me.distributed:
        from .remote_checkpoints import CheckpointSync

        sync = CheckpointSync(
            config.spec.output.uri, fingerprint, out / "checkpoint-upload", _secret_name(config)
        )

    torch.manual_seed(config.spec.training.seed)
    model = load_model_for_training(config.spec, config.paths.base_model, device, gc)
    eval_rows = prepared.eval[:IN_TRAINING_EVAL_ROWS]
    args = build_sft_config(config, device, batch, gc, optimizer, checkpoint_dir, bool(eval_rows))
    applied = fast_path(config, model, args, device, optimizer)
    fast_note, fast_plan = applied if applied else (None, None)
    if fast_note:
        notes.append(fast_note)
    trainer_cls = SFTTrainer
    if fast_note:
        from .fastpath import trainer_class

        trainer_cls = trainer_class()
    trainer = trainer_cls(
        model=model,
        args=args,
        train_dataset=to_dataset(prepared.train),
        eval_dataset=to_dataset(eval_rows) if eval_rows else None,
        processing_class=tokenizer,
        callbacks=[
            make_checkpoint_callback(fingerprint, sync.submit if sync else None),
            make_progress_callback(config.progress_interval_seconds),
        ],
    )
    trainer.remove_callback(PrinterCallback)
    try:
        trainer.train(resume_from_checkpoint=str(resume) if resume else None)
        if fast_note:
            from .fastpath import after_training

            after_training(model)
        if (compiled := _compiled_layers_note(model)) is not None:
            log.info(compiled)
            notes.append(compiled)
        metrics: dict[str, float] = {}
        if eval_rows:
            ev = trainer.evaluate()
            if "eval_loss" in ev:
                metrics["evalLoss"] = float(ev["eval_loss"])
    except Exception as exc:
        if sync is not None:
            sync.close()  # let the last checkpoint land: the next pod resumes from it
        if _is_oom(exc):
            raise out_of_memory(
                out_of_gpu_memory_message(
                    batch, bool(args.gradient_checkpointing), config.spec.method, fast_plan
                )
            ) from exc
        raise training_failed(f"training failed: {type(exc).__name__}: {exc}") from exc

    adapter_dir = out / "adapter"
    if me.is_main:
        adapter_dir = save_adapter(trainer.model, tokenizer, adapter_dir)
    return TrainOutcome(
        model=trainer.model,
        adapter_dir=adapter_dir,
        global_step=int(trainer.state.global_step),
        log_history=list(trainer.state.log_history),
        metrics=metrics,
        training_arguments=training_arguments_summary(
            config, device, batch, bool(args.gradient_checkpointing), optimizer
        ),
        resumed_from=str(resume) if resume else None,
        notes=notes,
        checkpoint_sync=sync,
    )


def _compiled_layers_note(model: Any) -> str | None:
    """What the compiler did during training, when the fast path compiled the layers."""
    from .compile_layers import compiled_choice

    choice = compiled_choice(model)
    if choice is None or choice.stats is None:
        return None
    counts = ", ".join(f"{key} {value}" for key, value in choice.stats.as_dict().items())
    return f"compiled decoder layers: {counts}"


def _secret_name(config: TrainerConfig) -> str | None:
    ref = config.spec.output.credentials_secret_ref
    return ref.name if ref else None


def save_adapter(model: Any, tokenizer: PreTrainedTokenizerBase, adapter_dir: Path) -> Path:
    """Write adapter weights, config and tokenizer to a temp folder, then swap it in."""
    tmp = adapter_dir.with_name(adapter_dir.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(str(tmp), safe_serialization=True)
    _sort_target_modules(tmp / "adapter_config.json")
    tokenizer.save_pretrained(str(tmp))
    if adapter_dir.exists():
        shutil.rmtree(adapter_dir)
    os.replace(tmp, adapter_dir)
    return adapter_dir


def _sort_target_modules(config_file: Path) -> None:
    """peft keeps target_modules as a set, so its JSON order follows string hashing and
    changes from process to process; sorted, identical weights give an identical digest."""
    if not config_file.is_file():
        return
    config = json.loads(config_file.read_text(encoding="utf-8"))
    modules = config.get("target_modules")
    if isinstance(modules, list):
        config["target_modules"] = sorted(modules)
        config_file.write_text(json.dumps(config, indent=2, sort_keys=True), encoding="utf-8")


def merge_adapter(
    base_model_dir: str | Path,
    adapter_dir: str | Path,
    merged_dir: str | Path,
    dtype_name: str,
    device: str,
    trust_remote_code: bool = False,
) -> Path:
    """Reload the unquantised base in ``dtype_name``, apply the adapter, merge and save."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if device == "cpu" and dtype_name != "float32":
        log.info("merging on CPU in float32 instead of %s", dtype_name)
        dtype_name = "float32"
    base = AutoModelForCausalLM.from_pretrained(
        str(base_model_dir),
        dtype=torch_dtype(dtype_name),
        device_map={"": local_rank()} if device == "cuda" else {"": "cpu"},
        trust_remote_code=trust_remote_code,
    )
    merged = PeftModel.from_pretrained(base, str(adapter_dir)).merge_and_unload()
    target = Path(merged_dir)
    tmp = target.with_name(target.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    merged.save_pretrained(str(tmp), safe_serialization=True)
    AutoTokenizer.from_pretrained(str(adapter_dir)).save_pretrained(str(tmp))
    if target.exists():
        shutil.rmtree(target)
    os.replace(tmp, target)
    return target
