# The GPU measurement of issue 10, in one script: `source .gpu/setup.sh && bash bench/gpu_final.sh` (~3 min on an
# H200). Writes under $OUT: step_check (captured vs eager, step by step), bench64 (batch 64 fp32, no augmentation: the
# course's setting, and one concurrent-trial epoch of (c) to check it agrees with (c)),
# bench512 (batch 512 bf16, augmentation), seed_baseline.txt and captured_seed42.json (the course's 50-epoch run,
# captured, its end-of-run figures as a user gets them, and eval.py's test of its best checkpoint; no W&B there).
set -u
OUT=${OUT:-/tmp/final}; mkdir -p "$OUT"
# At most 8 files come back from the device machine: the GPU's name goes into step_check.txt.
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader | tee "$OUT/step_check.txt"
timeout 90 python3 bench/gpu_step_check.py --steps 40 --out "$OUT/step_check.json" >> "$OUT/step_check.txt" 2>&1
tail -18 "$OUT/step_check.txt"  # 7 optimizers x fp32/bf16, then evaluation
timeout 150 python3 -m cifarlab.bench --images 45000 --repeats 3 --batch-size 64 --precision 32 --data cifar10 \
  --trials 1 --trial-batch-size 64 --no-seed-baseline --no-startup --no-sweeper --set data.augment=false \
  --out "$OUT/bench64.json" \
  > "$OUT/bench64.txt" 2>&1; tail -12 "$OUT/bench64.txt"
timeout 90 python3 -m cifarlab.bench --images 45000 --repeats 3 --batch-size 512 --precision bf16-mixed --data cifar10 \
  --skip reference --trials none --no-seed-baseline --no-startup --no-sweeper --out "$OUT/bench512.json" \
  > "$OUT/bench512.txt" 2>&1; tail -10 "$OUT/bench512.txt"
OUT=$OUT bash bench/gpu_seed_baseline.sh captured_seed42  # seed_baseline.txt, captured_seed42.json; eval.py's check
