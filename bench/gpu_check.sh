#!/usr/bin/env bash
# Issue 12's GPU check, for a machine with only torch, numpy and einops: bench/train_gpu.py on every GPU preset at
# the latent shape and on the shipped vdit-s stages (16 x 128 x 128 at micro-batch 16 is the shape that crashed the
# flash and cuDNN kernels). The plain PyTorch path always runs; the engine (DeepSpeed) path runs when wheels/ carries
# deepspeed and what training.engine imports (installed offline, --no-deps). Ends inside 7 minutes; what finished is
# in $OUT/train_gpu.json (rewritten after each row) and $OUT/train_gpu.log.
#
#   OUT=out bash bench/gpu_check.sh
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-out}
mkdir -p "$OUT"
start=$SECONDS
budget=400  # seconds for everything below, under the 7 minutes a device session allows one check

nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || echo "nvidia-smi: not available"
python3 -c "import torch; print('torch', torch.__version__, 'CUDA', torch.version.cuda, torch.cuda.get_device_name(0))"

shopt -s nullglob
wheels=(wheels/*.whl)
if ((${#wheels[@]})); then
    timeout 90 python3 -m pip install --quiet --no-deps --no-index "${wheels[@]}" \
        || echo "wheels: install failed; the engine path will say what is missing"
else
    echo "no wheels/*.whl: the engine (DeepSpeed) path is skipped"
fi

left=$((budget - (SECONDS - start)))
timeout -k 10 "$left" python3 bench/train_gpu.py --device cuda --shapes all --row-timeout 150 \
    --json "$OUT/train_gpu.json" 2>&1 | tee "$OUT/train_gpu.log"
rc=${PIPESTATUS[0]}
if ((rc == 124 || rc == 137)); then
    echo "train_gpu.py ran out of its ${left} s: $OUT/train_gpu.json holds the rows that finished"
fi
echo "gpu_check: exit $rc after $((SECONDS - start)) s"
exit "$rc"
