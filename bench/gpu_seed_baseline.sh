# experiment=seed_baseline on the GPU machine, captured against eager, each with its test accuracy checked by
# eval.py (a fresh process, eager evaluation) on the run's best checkpoint:
# `source .gpu/setup.sh && bash bench/gpu_seed_baseline.sh` (~4 min on an H200). Writes under $OUT (at most
# 8 files come back): seed_baseline.txt (every run's last lines and wall time) and each run's metrics.json.
set -u
OUT=${OUT:-/tmp/sb}; mkdir -p "$OUT"
log="$OUT/seed_baseline.txt"
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader | tee "$log"
run() {  # name, timeout, train.py overrides...
  local name=$1 limit=$2; shift 2
  rm -rf "/tmp/$name" "/tmp/$name-eval"  # a run of the same name earlier on this machine: start clean
  local start; start=$(date +%s.%N); local lines; lines=$(wc -l < "$log")
  timeout "$limit" python3 train.py experiment=seed_baseline logger=none hydra.run.dir="/tmp/$name" "$@" \
    > "/tmp/$name.log" 2>&1
  echo "== $name ($*): rc $? wall_s $(python3 -c "print(round($(date +%s.%N) - $start, 1))")" >> "$log"
  tail -3 "/tmp/$name.log" >> "$log"
  cp "/tmp/$name/metrics.json" "$OUT/$name.json" 2>/dev/null
  local best; best=$(python3 -c "import json; print(json.load(open('/tmp/$name/metrics.json'))['best_ckpt'])" 2>/dev/null)
  if [ -n "$best" ]; then
    timeout 60 python3 eval.py ckpt_path="$best" trainer.capture=false hydra.run.dir="/tmp/$name-eval" \
      2>&1 | tail -1 | sed "s/^/   eval.py (eager) on the best checkpoint: /" >> "$log"
  fi
  tail -n +$((lines + 1)) "$log"
}
# Each argument names one run (default: the first three), e.g. `bash bench/gpu_seed_baseline.sh eager_seed1`.
for n in ${@:-captured_seed42 eager_seed42 captured_seed1}; do
  case $n in
    captured_seed42) run captured_seed42 90 ;;
    eager_seed42) run eager_seed42 240 trainer.capture=false ;;
    captured_seed1) run captured_seed1 90 seed=1 ;;
    eager_seed1) run eager_seed1 240 seed=1 trainer.capture=false ;;
    *) echo "unknown run: $n (captured_seed42, eager_seed42, captured_seed1, eager_seed1)"; exit 1 ;;
  esac
done
