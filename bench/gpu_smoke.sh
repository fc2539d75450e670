# GPU smoke test of the captured step (cifarlab.step): `source .gpu/setup.sh && bash bench/gpu_smoke.sh`.
# Writes under $OUT (or /tmp/smoke): step_check.json, train.txt, bench64.json/.txt, bench512.json/.txt.
set -u
OUT=${OUT:-/tmp/smoke}; mkdir -p "$OUT"
nvidia-smi --query-gpu=name --format=csv,noheader
timeout 60 python3 bench/gpu_step_check.py --steps 40 --out "$OUT/step_check.json" 2>&1 | tail -8
( time timeout 60 python3 train.py data=cifar10 data.download=false trainer.max_epochs=1 logger=none \
    callbacks.figures=false hydra.run.dir=/tmp/smoke-run ) > "$OUT/train.txt" 2>&1
tail -6 "$OUT/train.txt"
for spec in "64 32" "512 bf16-mixed"; do
  set -- $spec
  timeout 80 python3 -m cifarlab.bench --images 45000 --repeats 1 --batch-size $1 --precision $2 --skip reference \
    --trials none --no-seed-baseline --no-startup --no-sweeper --out "$OUT/bench$1.json" > "$OUT/bench$1.txt" 2>&1
  tail -9 "$OUT/bench$1.txt"
done
