#!/usr/bin/env bash
# Every GPU check the open issues name, as one prepared run for a bare GPU machine (torch, numpy, einops, safetensors,
# huggingface_hub there; deepspeed, diffusers, open_clip and their pure-Python needs carried as wheels in .whl/):
#   1. issue 12: the shipped vdit-s shapes (16 x 128 x 128 at micro-batch 16, the shape that crashed on its first
#      step) on the plain path and the DeepSpeed engine, then VDiT-B/2 and XL/2 at the latent shape (MFU);
#   2. issue 14: video VAE encode throughput and memory, Wan 2.1- and CogVideoX-sized with random weights;
#   3. issue 16: seconds per video of VDiT-B/2 at a latent shape, eager against torch.compile;
#   4. issue 14: the causal VAE's held-out PSNR/SSIM on the sample dump's clips (.gpu/clips.npz, made here with
#      `bench/vae_reconstruction.py decode`), two presets at 4x spatial compression trained side by side.
# Each part has its own time box, so one that hangs costs only its share; results land in $OUT as they finish.
#
#   OUT=out bash bench/gpu_session.sh
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
start=$SECONDS
log="$OUT/gpu_session.log"

part() {  # part NAME SECONDS COMMAND...: run COMMAND with a time box, its output into the one log (8 files come back)
    local name=$1 box=$2
    shift 2
    echo "=== $name (up to ${box} s, at $((SECONDS - start)) s)" | tee -a "$log"
    timeout -k 5 "$box" "$@" 2>&1 | tee -a "$log"
    local rc=${PIPESTATUS[0]}
    echo "=== $name: exit $rc after $((SECONDS - start)) s" | tee -a "$log"
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
    export PYTHONPATH=/tmp/site
fi

part train_shipped 80 python3 bench/train_gpu.py --device cuda --shapes shipped --presets VDiT-S/2 \
    --steps 6 --warmup 2 --row-timeout 38 --json "$OUT/train_shipped.json"
part train_latent 96 python3 bench/train_gpu.py --device cuda --shapes latent --presets VDiT-B/2,VDiT-XL/2 \
    --steps 8 --warmup 3 --row-timeout 23 --json "$OUT/train_latent.json"
part vae_encode 130 python3 bench/vae_encode.py --device cuda --repeats 2 --row-timeout 40 --json "$OUT/vae_encode.json"
part sampling 110 python3 bench/sampling.py --device cuda --preset VDiT-B/2 --latent 16x5x32x32 --repeats 2 \
    --samplings "teacher DDIM 32 + CFG;teacher DPM-Solver++ 16 + CFG;student 4" --json "$OUT/sampling.json"
if [ -f .gpu/clips.npz ]; then  # two trainings share the GPU: PSNR is what they measure, not speed
    for preset in CausalVAE-T-4x4x4 CausalVAE-T-1x4x4; do
        timeout -k 5 130 python3 bench/vae_reconstruction.py train --clips .gpu/clips.npz --device cuda \
            --preset "$preset" --minutes 1.9 --every 1000 >"$OUT/vae_recon_${preset}.jsonl" 2>&1 &
    done
    wait
    tail -n 3 "$OUT"/vae_recon_*.jsonl | tee -a "$log"
fi
echo "gpu_session: done after $((SECONDS - start)) s" | tee -a "$log"
