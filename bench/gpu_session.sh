#!/usr/bin/env bash
# Every GPU check the open issues name, as one prepared run for a bare GPU machine (torch, numpy, einops, safetensors,
# opencv there; deepspeed, diffusers, open_clip and their pure-Python needs carried as wheels in .whl/). Parts:
#   train_shipped   issue 12: the shipped vdit-s stages (16 x 128 x 128 at micro-batch 16 crashed on its first step)
#   train_latent    issue 12: VDiT-B/2 and XL/2 at the latent shape, batch 4 (MFU; engine against plain PyTorch)
#   vae_encode      issue 14: Wan 2.1- and CogVideoX-sized VAE encode throughput and memory, random weights
#   sampling        issue 16: seconds per video of VDiT-B/2 at a latent shape, eager against torch.compile
#   vae_recon       issue 14: the causal VAE's held-out PSNR/SSIM on .gpu/clips.npz (bench/vae_reconstruction.py decode)
#   model_stages    issue 15: ViT-L-14 scoring with keyframes preprocessed on the device, CoCa with a KV cache
#   train_full      issue 12: the shipped full-res stage alone, one step each path (does it run, at what speed)
#   train_tuning    issue 12: VDiT-B/2 at batch 16 on plain PyTorch and the engine at ZeRO 0/2 and with DeepSpeed's
#                   overlap options, with a profile of one step per row (where the engine's step goes)
#   train_xl8       issue 12: VDiT-XL/2 at batch 8, plain and engine (MFU at a batch a user would run)
#   train_compile   issue 12: VDiT-B/2 at batch 16 and XL/2 at batch 8 with torch.compile'd blocks, both paths, and a
#                   profile of the compiled engine step (the eager one spends half its device time in copies and
#                   elementwise kernels, which compile fuses)
# PARTS picks parts in order (default: the first session's five). Each part has its own time box and is skipped when
# BUDGET_S (seconds the whole command may take) would not cover it, so one that hangs costs only its share and a short
# lease still brings back the parts before it; results land in $OUT as they finish.
#
#   OUT=out PARTS="model_stages train_tuning train_full" BUDGET_S=400 bash bench/gpu_session.sh
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-out}
PARTS=${PARTS:-"train_shipped train_latent vae_encode sampling vae_recon"}
BUDGET_S=${BUDGET_S:-100000}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
start=$SECONDS
log="$OUT/gpu_session.log"

part() {  # part NAME SECONDS COMMAND...: run COMMAND with a time box, its output into the one log (8 files come back)
    local name=$1 box=$2
    shift 2
    if ((SECONDS - start + box > BUDGET_S)); then
        echo "=== $name: skipped, ${box} s would pass the budget of ${BUDGET_S} s at $((SECONDS - start)) s" | tee -a "$log"
        return
    fi
    echo "=== $name (up to ${box} s, at $((SECONDS - start)) s)" | tee -a "$log"
    timeout -k 5 "$box" "$@" 2>&1 | tee -a "$log"
    local rc=${PIPESTATUS[0]}
    echo "=== $name: exit $rc after $((SECONDS - start)) s" | tee -a "$log"
}

train_shipped() {
    part train_shipped 80 python3 bench/train_gpu.py --device cuda --shapes shipped --presets VDiT-S/2 \
        --steps 6 --warmup 2 --row-timeout 38 --json "$OUT/train_shipped.json"
}

train_latent() {
    part train_latent 96 python3 bench/train_gpu.py --device cuda --shapes latent --presets VDiT-B/2,VDiT-XL/2 \
        --steps 8 --warmup 3 --row-timeout 23 --json "$OUT/train_latent.json"
}

vae_encode() {
    part vae_encode 130 python3 bench/vae_encode.py --device cuda --repeats 2 --row-timeout 40 \
        --json "$OUT/vae_encode.json"
}

sampling() {
    part sampling 110 python3 bench/sampling.py --device cuda --preset VDiT-B/2 --latent 16x5x32x32 --repeats 2 \
        --samplings "teacher DDIM 32 + CFG;teacher DPM-Solver++ 16 + CFG;student 4" --json "$OUT/sampling.json"
}

vae_recon() {  # two trainings share the GPU: PSNR is what they measure, not speed
    [ -f .gpu/clips.npz ] || { echo "=== vae_recon: skipped, no .gpu/clips.npz" | tee -a "$log"; return; }
    part vae_recon 135 bash -c 'for preset in CausalVAE-T-4x4x4 CausalVAE-T-1x4x4; do
            timeout -k 5 130 python3 bench/vae_reconstruction.py train --clips .gpu/clips.npz --device cuda \
                --preset "$preset" --minutes 1.9 --every 1000 >"$0/vae_recon_${preset}.jsonl" 2>&1 &
        done; wait; tail -n 3 "$0"/vae_recon_*.jsonl' "$OUT"
}

model_stages() {
    part model_stages 150 python3 bench/model_stages.py --large-only --device cuda --precision fp16 --threads 8 \
        --large-clips 768 --caption-clips 64 --clips-per-video 8 --videos-per-batch 16 --score-batch 128 \
        --caption-batch 32 --preprocess-clips 256 --json "$OUT/model_stages.json"
}

train_full() {
    part train_full 150 python3 bench/train_gpu.py --device cuda --shapes shipped --shape-names "vdit-s full" \
        --presets VDiT-S/2 --paths real,plain --steps 1 --warmup 1 --row-timeout 70 --json "$OUT/train_full.json"
}

train_tuning() {  # one row a process; a profile of the default engine and plain steps (8 files come back at most)
    local common=(--device cuda --shapes latent --presets VDiT-B/2 --latent-batch 16 --steps 6 --warmup 3
        --row-timeout 40)
    part tuning_z2 90 python3 bench/train_gpu.py "${common[@]}" --paths plain,real --profile "$OUT/profiles" \
        --json "$OUT/tuning_z2.json"
    part tuning_z0 45 python3 bench/train_gpu.py "${common[@]}" --paths real --zero-stage 0
    part tuning_overlap 45 python3 bench/train_gpu.py "${common[@]}" --paths real \
        --zero-options '{"overlap_comm": true, "contiguous_gradients": true, "reduce_bucket_size": 500000000}'
}

train_xl8() {  # batch 16 runs out of the H200's memory on both paths
    part train_xl8 90 python3 bench/train_gpu.py --device cuda --shapes latent --presets VDiT-XL/2 --latent-batch 8 \
        --steps 4 --warmup 2 --row-timeout 42 --json "$OUT/train_xl8.json"
}

train_compile() {
    part compile_b2 150 python3 bench/train_gpu.py --device cuda --shapes latent --presets VDiT-B/2 --latent-batch 16 \
        --steps 6 --warmup 3 --compile --row-timeout 70 --profile "$OUT/profiles" --json "$OUT/compile_b2.json"
    part compile_xl 150 python3 bench/train_gpu.py --device cuda --shapes latent --presets VDiT-XL/2 --latent-batch 8 \
        --steps 4 --warmup 2 --compile --row-timeout 70 --json "$OUT/compile_xl.json"
}

{
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || echo "nvidia-smi: not available"
    python3 -c "import torch; print('torch', torch.__version__, 'CUDA', torch.version.cuda, torch.cuda.get_device_name(0))"
} 2>&1 | tee -a "$log"

shopt -s nullglob
wheels=(.whl/*.whl)
if ((${#wheels[@]})); then
    timeout 120 python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target /tmp/site "${wheels[@]}" 2>&1 | tail -3 | tee -a "$log"
    export PYTHONPATH=/tmp/site:$PWD  # bench/model_stages.py imports the project
fi

for name in $PARTS; do
    "$name"
done
echo "gpu_session: done after $((SECONDS - start)) s" | tee -a "$log"
