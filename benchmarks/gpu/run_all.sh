#!/usr/bin/env bash
# Every GPU benchmark of the project in one short run (about 8 minutes on one H200), for a machine
# that has torch, timm and lightning but maybe not the project's other dependencies:
#
#   bash benchmarks/gpu/run_all.sh OUTDIR [WHEELS_DIR] [SLIDE]
#
# WHEELS_DIR: wheels to install first (rasterio, openslide-python, openslide-bin...); SLIDE: a slide
# made by `python benchmarks/histo_embed.py --make-slide DIR --reps 3` (writing its JPEG tiles needs
# imagecodecs). Each benchmark runs under its own time limit, so one failure does not stop the rest;
# everything is logged to OUTDIR/gpu.log, the figures as JSON where a script writes them.
set -u
out=${1:?usage: run_all.sh OUTDIR [WHEELS_DIR] [SLIDE]}
wheels=${2:-}
slide=${3:-}
mkdir -p "$out"
export HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1 MLFLOW_ENABLE_ASYNC_LOGGING=false
if [ -n "$wheels" ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site "$wheels"/*.whl \
    && export PYTHONPATH=/tmp/site
fi
export PYTHONPATH="${PYTHONPATH:+$PYTHONPATH:}$PWD"
log="$out/gpu.log"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$log"
python3 -c "import torch, timm, lightning; print('torch', torch.__version__, 'timm', timm.__version__, 'lightning', lightning.__version__)" | tee -a "$log"

bench() {  # bench NAME SECONDS CMD...
  local name=$1 limit=$2; shift 2
  echo "== $name ($*)" | tee -a "$log"
  local t0=$SECONDS
  timeout "$limit" "$@" >>"$log" 2>&1
  echo "== $name: exit $? after $((SECONDS - t0)) s" | tee -a "$log"
}

bench pretrain_throughput 75 python3 benchmarks/pretrain_throughput.py --device cuda \
  --backbone vit_base_patch14_dinov2 --img-size 224 --in-chans 13 --batch-size 64 --steps 8 --repeats 2
bench contrastive_memory 50 python3 benchmarks/contrastive_memory.py --device cuda --sizes 16384 65536
bench sgd_memory 60 python3 benchmarks/sgd_memory.py --device cuda
bench tome 80 python3 benchmarks/tome.py --device cuda --skip-auc --rs 4,8,12,16,20 --json "$out/tome.json"
if [ -n "$slide" ]; then
  bench histo_embed 50 python3 benchmarks/histo_embed.py --accelerator cuda --slide "$slide" --mpp 0.25 \
    --backbone vit_base_patch14_dinov2 --batch-size 64 --num-workers 6 --precision bf16-mixed
fi
bench eo_sar_embed 100 python3 benchmarks/eo_sar_embed.py --device cuda --sizes 2048 4096 8192 --depth 12 \
  --window 224 --batch-size 64 --precision bf16-mixed --json "$out/eo_sar_embed.json"
[ -f benchmarks/gpu/fsdp_pretrain.py ] && [ "${WITH_FSDP:-0}" = 1 ] && bench fsdp_pretrain 120 python3 benchmarks/gpu/fsdp_pretrain.py --devices 1
exit 0
