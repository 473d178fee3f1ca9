#!/bin/bash
# The GPU benchmarks in two calls of at most ten minutes each, from the repository root.
#   bench/run_h100.sh train   # bench_train (baseline vs fast path, equivalence) + trainer CLI
#   bench/run_h100.sh vram    # bench_vram (10 configurations) + bench_eval when present
#   bench/run_h100.sh memory  # packed-path peak memory of four model families, in parallel
#                             # processes (memory only: the step times disturb each other)
#   bench/run_h100.sh speed   # small budgets: the planner at 8/10/12/16/24 GiB, activation
#                             # offload, and Unsloth at 4,096-16,384 tokens in child processes
#                             # (about 7 minutes)
#   bench/run_h100.sh dropout # LoRA dropout 0.05, PEFT's against the fused one (speed, memory,
#                             # 30-step loss equivalence), and dropout 0; about 7 minutes
#   bench/run_h100.sh families # memory only: Qwen2.5-7B, Mistral-7B and a Gemma-7B shape at 4,096
#                             # and 16,384 checkpointed tokens against the memory model (~5 min)
#   bench/run_h100.sh grid    # one call: the 8B token grid (checkpointing, offload, dropout),
#                             # Unsloth, then two other families' peaks (about 8 minutes;
#                             # GRID_UNSLOTH= leaves Unsloth out, GRID_SECONDS caps the 8B part)
#   bench/run_h100.sh compile # decoder layers through torch.compile against eager ones, with
#                             # and without checkpointing (about 8 minutes)
#   bench/run_h100.sh profile # operator-level profile of two steps at 4,096 (+offload, with
#                             # and without the fused 4-bit projections), 16,384 checkpointed
#                             # tokens and 12,288 without: where the step time goes
#   bench/run_h100.sh lora4bit # 4-bit projections fused with their adapters against PEFT's
#                             # layers, whole GPU and small budgets, loss check, and the fused
#                             # AdamW against the paged 8-bit one (about 4 minutes)
#   bench/run_h100.sh lora4bit-budgets # the same at the planner's 8-24 GiB picks (~4 min)
#   bench/run_h100.sh flatoptim # the adapters as one flat optimiser parameter against the
#                             # per-weight paged 8-bit optimiser (about 4 minutes)
#   bench/run_h100.sh dropk   # LoRA dropout drawn inside the adapter matmuls (Triton): the
#                             # kernels checked and timed per projection, training at the
#                             # whole GPU, a 30-step loss check (about 9 minutes)
#   bench/run_h100.sh dropk-checkpointed # the same at 16,384 checkpointed tokens (~3 min)
# Unmarked fast variants fuse the 4-bit projections as the trainer does (from 8,192 tokens);
# lora4bit / nolora4bit force the choice.
# Needs the missing packages on PYTHONPATH (bench/gpu_wheels.sh) and writes to ${OUT:-out};
# speed and grid also need Unsloth's (bench/gpu_wheels.sh --unsloth .gpu/unsloth, or UNSLOTH_SITE).
set -uo pipefail
out=${OUT:-out}; mkdir -p "$out"
export PYTHONPATH=${SITE:-$PWD/.gpu/site}:$PWD/trainer-image:$PWD/operator
export HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader | tee "$out/gpu.txt"
case "${1:-train}" in
  train)
    python3 bench/bench_train.py --shape llama3-8b --build-dir /tmp/m8b \
      --variants "baseline,fast@24,fast,fast:32768:gc,fast:12288:nogc:dropout=0,fast:8192:nogc,fast:32768:gc:dropout=0" --steps 8 --warmup-steps 3 --rows 3000 \
      --equivalence-steps 12 --out "$out/train.json" 2>&1 | tee "$out/train.log" | grep -v "it/s\]\|s/it\]"
    python3 bench/bench_trainer_cli.py --shape llama3-8b --work-dir /tmp/cli --max-steps 30 \
      --out "$out/trainer-cli.json" 2>&1 | tail -5
    ;;
  memory)
    sweep() {  # shape variants
      python3 bench/bench_train.py --shape "$1" --build-dir "/tmp/m-$1" --drop-build \
        --memory-budget-gib 60 --variants "$2" --steps 2 --warmup-steps 1 --rows 1200 \
        --out "$out/memory-$1.json" > "$out/memory-$1.log" 2>&1
    }
    sweep llama3-8b "fast:2048:gc,fast:4096:gc,fast:8192:gc,fast:16384:gc,fast:8192:gc:dropout=0,fast:16384:gc:dropout=0,fast:4096:nogc" &
    sweep qwen2.5-7b "fast:4096:gc,fast:16384:gc,fast:4096:nogc" &
    (sweep mistral-7b "fast:4096:gc,fast:16384:gc"; sweep gemma-7b "fast:4096:gc,fast:16384:gc,fast:4096:nogc") &
    wait
    grep -h '"variant"' "$out"/memory-*.log | cut -c1-400
    ;;
  speed)
    # LoRA dropout 0 everywhere: Unsloth's fast path needs it, so the comparison is like for like.
    # COEFFICIENTS (default: the fit `grid` left in /tmp/fit, if any) and NO_AUTO_OFFLOAD=1 measure
    # what the planner would pick with a refit and with plain checkpointing only.
    coef=${COEFFICIENTS:-/tmp/fit/coefficients.json}
    planner=(); [ -f "$coef" ] && planner+=(--memory-coefficients "$coef")
    [ -n "${NO_AUTO_OFFLOAD:-}" ] && planner+=(--no-auto-offload)
    python3 bench/bench_train.py --shape llama3-8b --build-dir /tmp/m8b --lora-dropout 0 "${planner[@]}" \
      --variants "${SPEED_VARIANTS:-unsloth:4096,unsloth:8192,unsloth:16384,fast@8,fast@10,fast@12,fast@16,fast@24}" \
      --steps 5 --warmup-steps 2 --rows 1500 --unsloth-timeout 180 \
      --unsloth-site "${UNSLOTH_SITE:-$PWD/.gpu/unsloth}" --out "$out/speed.json" 2>&1 \
      | tee "$out/speed.log" | grep -v "it/s\]\|s/it\]"
    ;;
  dropout)
    # PEFT's dropout at 12,288 tokens without checkpointing is expected not to fit: last.
    python3 bench/bench_train.py --shape llama3-8b --build-dir /tmp/m8b \
      --variants "fast:12288:nogc:dropimpl=fused,fast:12288:nogc:dropout=0,fast:8192:nogc:dropimpl=peft,fast:8192:nogc:dropimpl=fused,fast:8192:gc:dropimpl=peft,fast:8192:gc:dropimpl=fused,fast:12288:nogc:dropimpl=peft" \
      --steps 6 --warmup-steps 3 --rows 3000 --dropout-equivalence-steps 30 \
      --out "$out/dropout.json" 2>&1 | tee "$out/dropout.log" | grep -v "it/s\]\|s/it\]"
    ;;
  grid)
    # Other families' models are built on the CPU while the 8B grid runs
    build() { python3 -c "import sys; sys.path.insert(0, 'bench'); from shapes import build_random_model as b; b('$1', '/tmp/m-$1', device='cpu')"; }
    # (after the 8B model's files are loaded and dropped, so the disk holds at most two models)
    (sleep 100; build qwen2.5-7b & build gemma-7b & wait) > "$out/build.log" 2>&1 &
    builder=$!
    timeout ${GRID_SECONDS:-330} python3 bench/bench_train.py --shape llama3-8b --build-dir /tmp/m8b --drop-build \
      --lora-dropout 0 --steps 3 --warmup-steps 1 --rows 1200 --unsloth-timeout 100 \
      --variants "${GRID_UNSLOTH-unsloth:16384,}fast:4096:gc,fast:8192:gc,fast:16384:gc,fast:16384:gc:offload,fast:12288:nogc,fast:12288:nogc:dropout=0.05" \
      --unsloth-site "${UNSLOTH_SITE:-$PWD/.gpu/unsloth}" --out "$out/grid.json" 2>&1 \
      | tee "$out/grid.log" | grep -v "it/s\]\|s/it\]" | cut -c1-600
    wait $builder
    family() {  # memory only: the two run side by side
      timeout 110 python3 bench/bench_train.py --shape "$1" --model-dir "/tmp/m-$1" \
        --memory-budget-gib 60 --lora-dropout 0 --variants "fast:4096:gc,fast:16384:gc" \
        --steps 2 --warmup-steps 1 --rows 800 --out "$out/memory-$1.json" > "$out/memory-$1.log" 2>&1
    }
    family qwen2.5-7b & family gemma-7b & wait
    grep -h '"variant"' "$out"/memory-*.log | cut -c1-300
    # Refit the activation coefficients on these runs and the expandable-segment runs on file;
    # `speed` picks the fit up from /tmp/fit when it runs on the same machine.
    python3 bench/compare_packed_memory.py --fit --write /tmp/fit/coefficients.json \
      "$out"/grid.json "$out"/memory-*.json bench/results/h100-2026-11-23/packed-qwen2.5-{0.5b,3b}.json \
      2>&1 | tee "$out/fit.txt"
    cp /tmp/fit/coefficients.json "$out/fit-coefficients.json" 2>/dev/null
    ;;
  compile)
    # Eager and compiled variants in separate processes: Liger patches the model for good,
    # and the compiled variants run without it (the compiler fuses the same operations); the
    # last one keeps Liger inside the compiled layers. Warm-up steps hold the compilation
    # (compiledLayers.compilationsAfterStep shows whether any fell in the measured steps).
    compile_run() {  # name variants
      python3 bench/bench_train.py --shape llama3-8b --build-dir /tmp/m8b --variants "$2" \
        --steps 6 --warmup-steps 3 --rows 1500 --out "$out/$1.json" 2>&1 \
        | tee "$out/$1.log" | grep -v "it/s\]\|s/it\]" | cut -c1-600
    }
    compile_run compile-eager "fast:8192:gc,fast:12288:nogc:dropout=0"
    compile_run compile "fast:8192:gc:compile,fast:12288:nogc:dropout=0:compile,fast:8192:gc:compile:liger"
    ;;
  lora4bit)
    # Each 4-bit projection and its adapter as one autograd function, against PEFT's layers
    # (with the fused dropout both), at the whole GPU and at two small-budget sizes, and 30
    # packed steps of each against PEFT's losses; then torch's fused AdamW in place of the paged
    # 8-bit one (one kernel for all adapters instead of two per tensor; about 8 minutes).
    python3 bench/bench_train.py --shape llama3-8b --build-dir /tmp/m8b \
      --variants "fast:12288:nogc:dropout=0.05:nolora4bit,fast:12288:nogc:dropout=0.05:lora4bit,fast:8192:gc:dropout=0.05:nolora4bit,fast:8192:gc:dropout=0.05:lora4bit,fast:4096:gc:offload:nolora4bit,fast:4096:gc:offload:lora4bit,fast:12288:nogc:dropout=0.05:optim=adamw_torch_fused:nolora4bit,fast:4096:gc:offload:optim=adamw_torch_fused" \
      --steps 6 --warmup-steps 3 --rows 3000 --dropout-equivalence-steps 30 \
      --out "$out/lora4bit.json" 2>&1 \
      | tee "$out/lora4bit.log" | grep -v "it/s\]\|s/it\]" | cut -c1-600
    ;;
  lora4bit-budgets)
    # The planner's picks at 8-24 GiB with PEFT's layers and with the fused projections, and
    # the whole GPU with both the fused projections and torch's fused AdamW (about 4 minutes).
    python3 bench/bench_train.py --shape llama3-8b --build-dir /tmp/m8b --lora-dropout 0 \
      --variants "fast@8:::nolora4bit,fast@8:::lora4bit,fast@12:::nolora4bit,fast@12:::lora4bit,fast@16:::nolora4bit,fast@16:::lora4bit,fast@24:::nolora4bit,fast@24:::lora4bit,fast:12288:nogc:dropout=0.05:lora4bit:optim=adamw_torch_fused,fast:12288:nogc:dropout=0.05:nolora4bit" \
      --steps 6 --warmup-steps 2 --rows 3000 --out "$out/lora4bit-budgets.json" 2>&1 \
      | tee "$out/lora4bit-budgets.log" | grep -v "it/s\]\|s/it\]" | cut -c1-600
    ;;
  flatoptim)
    # The adapters as one flat parameter for the paged 8-bit optimiser (one update and one
    # device sync per step instead of 448) against the per-weight optimiser, at the 8 and
    # 24 GiB picks and the whole GPU with dropout 0.05 (about 4 minutes).
    python3 bench/bench_train.py --shape llama3-8b --build-dir /tmp/m8b --lora-dropout 0 \
      --variants "fast@8,fast@8:::flatoptim,fast@24,fast@24:::flatoptim,fast:12288:nogc:dropout=0.05,fast:12288:nogc:dropout=0.05:flatoptim" \
      --steps 6 --warmup-steps 2 --rows 3000 --out "$out/flatoptim.json" 2>&1 \
      | tee "$out/flatoptim.log" | grep -v "it/s\]\|s/it\]" | cut -c1-600
    ;;
  dropk)
    # The kernels checked (a real 4-bit layer, with and without checkpointing) and timed per
    # projection with a few tiles; then training at the whole GPU with and without the
    # kernels, and with dropout 0; last, in a process of its own, 30 packed steps with the
    # kernels' dropout against PEFT's and PEFT's with other masks. Speed before the loss
    # check, so that a call cut short still brings the numbers back (about 9 minutes).
    # DROPK_SWEEP= skips the tile sweep, DROPK_VARIANTS trims the list: a shorter call.
    timeout 120 python3 bench/bench_dropout_kernels.py ${DROPK_SWEEP---sweep} --out "$out/dropout-kernels.json" 2>&1 \
      | tee "$out/dropout-kernels.log" | cut -c1-1500
    timeout 270 python3 bench/bench_train.py --shape llama3-8b --build-dir /tmp/m8b \
      --variants "${DROPK_VARIANTS:-fast:12288:nogc:dropout=0.05:lora4bit:optim=adamw_torch_fused:nodropk,fast:12288:nogc:dropout=0.05:lora4bit:optim=adamw_torch_fused:dropk,fast:12288:nogc:dropout=0:lora4bit:optim=adamw_torch_fused,fast:12288:nogc:dropout=0.05:lora4bit:nodropk,fast:12288:nogc:dropout=0.05:lora4bit:dropk}" \
      --steps 6 --warmup-steps 3 --rows 3000 --out "$out/dropk.json" 2>&1 \
      | tee "$out/dropk.log" | grep -v "it/s\]\|s/it\]" | cut -c1-600
    timeout 180 python3 bench/bench_train.py --shape llama3-8b --build-dir /tmp/m8b --variants "" \
      --rows 3000 --dropout-equivalence-steps 30 --dropout-equivalence-curves kernels \
      --out "$out/dropk-loss.json" 2>&1 | tee "$out/dropk-loss.log" | grep -v "it/s\]\|s/it\]" | cut -c1-600
    ;;
  dropk-checkpointed)
    # The kernels at 16,384 checkpointed tokens, the 16 GiB pick (about 3 minutes).
    python3 bench/bench_train.py --shape llama3-8b --build-dir /tmp/m8b \
      --variants "fast:16384:gc:dropout=0.05:nodropk,fast:16384:gc:dropout=0.05:dropk" \
      --steps 6 --warmup-steps 3 --rows 3000 --out "$out/dropk-gc.json" 2>&1 \
      | tee "$out/dropk-gc.log" | grep -v "it/s\]\|s/it\]" | cut -c1-600
    ;;
  profile)
    # Where the step time goes: two profiled steps (device and host time
    # per operator) at the 8 GiB pick, with PEFT's layers and with the fused 4-bit projections
    # (slower there: decision 2140), at 16,384 tokens, and the whole GPU with dropout 0.05 and
    # torch's fused AdamW, the best MFU so far (profile-*.txt; about 6 minutes).
    python3 bench/bench_train.py --shape llama3-8b --build-dir /tmp/m8b --profile \
      --variants "fast:4096:gc:offload:nolora4bit,fast:4096:gc:offload:lora4bit,fast:16384:gc,fast:12288:nogc:optim=adamw_torch_fused" \
      --steps 4 --warmup-steps 2 --rows 1500 \
      --out "$out/profile.json" 2>&1 | tee "$out/profile.log" | grep -v "it/s\]\|s/it\]" | cut -c1-600
    ;;
  families)
    # One family at a time, each built on the GPU (about 30 s; building 7B models on the CPU
    # took most of a 10-minute call) and dropped from the disk once loaded.
    for shape in qwen2.5-7b gemma-7b mistral-7b; do
      timeout 170 python3 bench/bench_train.py --shape "$shape" --build-dir "/tmp/m-$shape" --drop-build \
        --memory-budget-gib 60 --lora-dropout 0 --variants "fast:4096:gc,fast:16384:gc" \
        --steps 2 --warmup-steps 1 --rows 800 --out "$out/memory-$shape.json" > "$out/memory-$shape.log" 2>&1
    done
    grep -h '"variant"' "$out"/memory-*.log | cut -c1-300
    python3 bench/compare_packed_memory.py "$out"/memory-*.json 2>&1 | tee "$out/compare.txt"
    ;;
  vram)
    python3 bench/bench_vram.py --out "$out/vram.json" --models-dir /tmp/vram-models 2>&1 | tee "$out/vram.log" | tail -20
    if [ -f bench/bench_eval.py ]; then
      python3 bench/bench_eval.py > "$out/eval.json" 2> "$out/eval.log"; tail -c 2000 "$out/eval.json"
    fi
    ;;
esac
