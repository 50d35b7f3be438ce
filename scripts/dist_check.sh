#!/usr/bin/env bash
# One device call on a two-GPU machine (nvidia-h100-x2 / nvidia-h200-x2): install, then
# benchmarks/distributed.py for each model on 1 GPU, under DDP and under FSDP2 (checks and
# tokens/s for eager, stock torch.compile and adaattn). $OUT gets the table (dist-table.md)
# and one archive of every result, log and profile (dist.tgz: the device tool brings back only
# a few files a call); ~6 minutes for the default two models.
#   scripts/dist_check.sh [MODEL...]      (default: gpt llama-sdpa)
set -uo pipefail
OUT=${OUT:-out}
D=$(mktemp -d)
mkdir -p "$OUT"
# NVLink multicast stays off (the device README says why), also for the children torchrun starts
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
export TORCHINDUCTOR_CACHE_DIR=${TORCHINDUCTOR_CACHE_DIR:-/tmp/adaattn-dist-inductor}
python3 -m pip install -q --no-deps --no-build-isolation -e . > "$OUT/install.log" 2>&1 \
  || { echo "install failed"; tail -20 "$OUT/install.log"; exit 1; }
S=benchmarks/distributed.py
run() {   # name gpus args...
  local name=$1 gpus=$2; shift 2
  timeout 200 python3 -m torch.distributed.run --standalone --nproc_per_node="$gpus" "$S" \
    "$@" --out "$D/$name" > "$D/$name.log" 2>&1
  echo "$name: exit $?"
}
models=("$@")
[ ${#models[@]} -eq 0 ] && models=(gpt llama-sdpa)
for m in "${models[@]}"; do
  if [ "$m" = gpt ]; then
    common="--model gpt --layers 6 --seq 2048 --batch 8 --steps 15 --warmup 3"
    check="--check-seq 1024 --check-batch 2"
  else   # (100 MB buckets: 25 MB ones cut a 1B-class model into ~40 pieces to compile)
    common="--model $m --seq 2048 --batch 4 --steps 15 --warmup 3 --bucket-mb 100"
    check="--check-seq 1024 --check-batch 1"
  fi
  run "$m-1" 1 --parallel none $common --check-steps 0
  run "$m-ddp" 2 --parallel ddp $common $check
  run "$m-fsdp2" 2 --parallel fsdp2 $common $check
done
python3 "$S" --table "$D" | tee "$OUT/dist-table.md"
grep -h -A16 -E "^(none|ddp|fsdp2) x[0-9]" "$D"/*.log
tar czf "$OUT/dist.tgz" -C "$D" .
