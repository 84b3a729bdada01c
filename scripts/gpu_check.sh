#!/usr/bin/env bash
# GPU smoke check: build a 1000-image atlas on CUDA and print images/s collected and icons/s rendered.
#
#   scripts/gpu_check.sh [IMAGES]        IMAGES: default ../shared/data/imagenet-sample (from the repo root)
#
# Render settings: the article's (RenderConfig.article(): 1024 steps, 4 attempts, 80 px icons, batch 100,
# whitened) at one coarse level (LEVELS=10: about 40-70 icons), which docs/performance estimates keep
# under 5 minutes on one H100-class GPU (35-200 icons/s at 512 steps, 128 px). Override with the
# environment: LEVELS=10,20 STEPS=512 ATTEMPTS=2 MODEL=efficientnet_lite0 LIMIT=1000 ENGINE=ray
# OUT=runs/gpu-check. On a machine without a CUDA GPU it says so and exits 2.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
[ -x "$PY" ] || PY=python3
IMAGES=${1:-../shared/data/imagenet-sample}
OUT=${OUT:-runs/gpu-check}
LEVELS=${LEVELS:-10}
LIMIT=${LIMIT:-1000}
MODEL=${MODEL:-efficientnet_lite0}
ENGINE=${ENGINE:-local}
export NUMBA_CACHE_DIR=${NUMBA_CACHE_DIR:-$PWD/.cache/numba}

if ! "$PY" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 3)' 2>/dev/null; then
    echo "gpu_check: no CUDA GPU visible to torch ($("$PY" -c 'import torch; print(torch.__version__)' 2>/dev/null || echo 'torch missing')); run this on a GPU machine with a CUDA build of torch" >&2
    exit 2
fi
if [ ! -d "$IMAGES" ]; then
    echo "gpu_check: image folder $IMAGES not found (pass it as the first argument)" >&2
    exit 2
fi
"$PY" -c 'import torch; print("gpu_check: torch", torch.__version__, "on", torch.cuda.get_device_name(0))'

extra=()
[ -n "${STEPS:-}" ] && extra+=(--steps "$STEPS")
[ -n "${ATTEMPTS:-}" ] && extra+=(--attempts "$ATTEMPTS")
rm -rf "$OUT"
start=$(date +%s)
"$PY" -m actatlas.cli build --model "$MODEL" --images "$IMAGES" --limit "$LIMIT" --out "$OUT" \
    --device cuda --levels "$LEVELS" --article --engine "$ENGINE" --batch-size-collect 128 \
    --pca-dims 50 -q --json "${extra[@]}" > "$OUT.json"
end=$(date +%s)
"$PY" - "$OUT.json" "$OUT" $((end - start)) <<'PYEOF'
import json, sys
summary = json.loads(open(sys.argv[1]).read().strip().splitlines()[-1])
out, wall = sys.argv[2], int(sys.argv[3])
manifest = json.load(open(f"{out}/manifest.json"))
sec = summary["seconds_this_call"]
icons = sum(lv["cells"] for lv in summary["levels"])
collect_s = sec.get("collect") or 0.0
render_s = sec.get(f"render:{summary['layer']}") or 0.0
cfg = manifest["stages"][f"render:{summary['layer']}"]["config"]["render"]
print(f"atlas: {summary['samples']} samples, {icons} icons at levels {[lv['size'] for lv in summary['levels']]}"
      f" (steps {cfg['steps']}, attempts {cfg['attempts']}, {cfg['icon_size']} px, batch {cfg['batch_size']})")
print(f"collect: {summary['samples'] / max(collect_s, 1e-9):.1f} images/s ({collect_s:.1f} s)")
print(f"render:  {icons / max(render_s, 1e-9):.2f} icons/s ({render_s:.1f} s)")
print(f"mean icon fidelity {summary['mean_icon_fidelity']}, best real member {summary['mean_member_fidelity']}")
print(f"total wall time {wall} s" + ("  (over the 5-minute budget: lower STEPS/ATTEMPTS)" if wall > 300 else ""))
PYEOF
