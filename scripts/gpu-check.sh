#!/usr/bin/env bash
# gpu-check.sh — one-command check of a CUDA `diffpref` binary on a GPU machine (H100/H200, driver >= 580).
#
# Run it from the unpacked tarball made by scripts/build-cuda.sh (binary ./diffpref, fixtures under
# tests/fixtures), or from a repository checkout with --bin:
#
#   tar -xJf diffpref-cuda-sm90.tar.xz && cd diffpref-cuda-sm90 && bash scripts/gpu-check.sh
#   bash scripts/gpu-check.sh --bin target/cuda/release/diffpref          # from the repository root
#
# What it runs (each step with a timeout; a failing step is recorded and the check goes on):
#   1. environment: nvidia-smi, CUDA 13 user-space libraries found and put on LD_LIBRARY_PATH, ldd of the binary
#   2. `diffpref verify` on every golden, in f32 (the goldens' tolerances) and bf16 (verify's default looser
#      tolerances, x4000): tiny-sd + tests/fixtures/golden, tiny-sd2 + parity/sd2 + pipeline_sd2, tiny-sdxl +
#      parity/sdxl + pipeline_sdxl, and the reward goldens (no model folder)
#   3. `diffpref generate` on tiny-sd, and `diffpref score` (CLIP score, tiny CLIP) on the image it made
#   4. benchmarks: `bench foundation` (tiny-sd: UNet fwd/bwd, pipeline sampling steps/s; SD1.5-sized random
#      UNet at the SD1.5 latent: fwd/bwd and the CFG sampling step), `bench rewards`, and `bench dpo`:
#      Diffusion-DPO LoRA training steps/s and peak memory on tiny-sd and on the SD1.5-sized random UNet at
#      64x64 latents (512x512 px), one process per dtype and batch size, so an out-of-memory batch size is
#      recorded without taking the others down
# A preflight step first checks that the binary starts and the device opens; if it fails, the other steps are
# skipped (--keep-going runs them anyway). Everything goes to gpu-check-out/ (override with --out):
# gpu-report.json (one JSON report), logs/*.log, bench/*.json, images/, and gpu-check-logs.tar.gz (logs and
# bench rows in one file); a short table is printed at the end. Exit status 0 when every step passed, else 1.
#
# Options:
#   --bin PATH          diffpref binary (default: ./diffpref next to scripts/, else target/cuda/release/diffpref)
#   --fixtures DIR      fixtures folder (default: tests/fixtures under the same root)
#   --out DIR           output folder (default: ./gpu-check-out)
#   --device DEV        cuda, cuda:N or cpu (default cuda; cpu = smoke test of the plumbing on a CPU build)
#   --dtypes "LIST"     dtypes for verify and the SD1.5 benches (default "f32 bf16")
#   --batches "LIST"    DPO batch sizes (pairs per step) for the SD1.5-sized UNet (default "1 2 4 8")
#   --latent N          latent side for the SD1.5-sized benches (default 64 = 512x512 px)
#   --iters N           timed iterations per bench row (default 5; one warm-up is always added)
#   --no-sd15           skip the SD1.5-sized benches (on CPU: minutes, ~18 GB peak for DPO at a 32x32 latent)
#   --quick             small settings: batch 1 only (SD1.5 and tiny benches), --iters 2, --latent 32
#   --timeout S         per-step timeout in seconds (default 600; the SD1.5 benches get the same)
#   --keep-going        run every step even when the preflight step (binary starts, device opens) fails
#   --dry-run           print the commands, run nothing
set -uo pipefail
# The whole script is one block, read before it runs: editing the file meanwhile cannot derail a running check.
{
SELF_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd -P)"
ROOT="$(cd "$SELF_DIR/.." && pwd -P)"

BIN=""
FIXTURES=""
OUT="gpu-check-out"
DEVICE="cuda"
DTYPES="f32 bf16"
BATCHES="1 2 4 8"
TINY_BATCHES="1 4"
LATENT=64
ITERS=5
SD15=1
STEP_TIMEOUT=600
DRY=0
KEEP_GOING=0
SKIP_REST=""

usage() { sed -n '2,39p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//'; }
die() { printf '[gpu-check] ERROR: %s\n' "$*" >&2; exit 2; }
log() { printf '[gpu-check] %s\n' "$*" >&2; }

while [ $# -gt 0 ]; do
  case "$1" in
    --bin) BIN="$2"; shift ;;
    --fixtures) FIXTURES="$2"; shift ;;
    --out) OUT="$2"; shift ;;
    --device) DEVICE="$2"; shift ;;
    --dtypes) DTYPES="$2"; shift ;;
    --batches) BATCHES="$2"; shift ;;
    --latent) LATENT="$2"; shift ;;
    --iters) ITERS="$2"; shift ;;
    --no-sd15) SD15=0 ;;
    --quick) BATCHES="1"; TINY_BATCHES="1"; ITERS=2; LATENT=32 ;;
    --timeout) STEP_TIMEOUT="$2"; shift ;;
    --dry-run) DRY=1 ;;
    --keep-going) KEEP_GOING=1 ;;
    -h|--help) usage; exit 0 ;;
    *) die "unknown argument '$1' (see --help)" ;;
  esac
  shift
done

if [ -z "$BIN" ]; then
  for c in "$ROOT/diffpref" "$ROOT/target/cuda/release/diffpref"; do
    if [ -x "$c" ]; then BIN="$c"; break; fi
  done
  [ -n "$BIN" ] || BIN="$ROOT/diffpref"
fi
[ -n "$FIXTURES" ] || FIXTURES="$ROOT/tests/fixtures"
BIN="$(cd "$(dirname "$BIN")" 2>/dev/null && pwd -P)/$(basename "$BIN")"
FX="$FIXTURES"
if [ "$DRY" = 0 ]; then
  [ -x "$BIN" ] || die "no diffpref binary at $BIN (use --bin)"
  [ -d "$FX/golden" ] || die "no fixtures at $FX (use --fixtures)"
fi
if [ "$DRY" = 0 ]; then
  mkdir -p "$OUT/logs" "$OUT/steps" "$OUT/bench" "$OUT/images"
  OUT="$(cd "$OUT" && pwd -P)"
  rm -f "$OUT"/steps/*.json "$OUT"/logs/*.log "$OUT"/bench/*.json "$OUT"/images/*.png
fi

on_cuda=0
case "$DEVICE" in cuda|cuda:*) on_cuda=1 ;; cpu) ;; *) die "--device $DEVICE: expected cuda, cuda:N or cpu" ;; esac
gpu_index="${DEVICE#cuda:}"; [ "$gpu_index" = "$DEVICE" ] && gpu_index=0

# ------------------------------------------------------------------------------------------------ helpers
json_str() {  # a JSON string literal
  local s="$1"
  s="${s//\\/\\\\}"; s="${s//\"/\\\"}"; s="${s//$'\t'/\\t}"; s="${s//$'\r'/\\r}"; s="${s//$'\n'/\\n}"
  s="$(printf '%s' "$s" | tr -d '\000-\010\013\014\016-\037')"
  printf '"%s"' "$s"
}
json_num() { if [[ "$1" =~ ^-?[0-9]+(\.[0-9]+)?$ ]]; then printf '%s' "$1"; else printf 'null'; fi; }
quote_cmd() { local out="" a; for a in "$@"; do out+="$(printf '%q' "$a") "; done; printf '%s' "${out% }"; }

SAMPLER_PID=""
start_mem_sampler() {  # nvidia-smi memory.used (MiB) every 100 ms into $1
  SAMPLER_PID=""
  [ "$on_cuda" = 1 ] && command -v nvidia-smi >/dev/null 2>&1 || return 0
  nvidia-smi --id="$gpu_index" --query-gpu=memory.used --format=csv,noheader,nounits -lms 100 >"$1" 2>/dev/null &
  SAMPLER_PID=$!
}
stop_mem_sampler() {  # prints the max MiB seen (empty if none)
  if [ -n "$SAMPLER_PID" ]; then
    kill "$SAMPLER_PID" 2>/dev/null; wait "$SAMPLER_PID" 2>/dev/null
    SAMPLER_PID=""
    awk 'BEGIN{m=""} /^[0-9]+/{ if (m=="" || $1+0>m) m=$1+0 } END{print m}' "$1" 2>/dev/null
  fi
}

NSTEP=0
FAILED=0
declare -a TABLE=()
# run_step NAME KIND [--bench-json FILE] -- CMD...: runs CMD with the step timeout, logs to logs/NAME.log,
# writes steps/NN-NAME.json.
run_step() {
  local name="$1" kind="$2"; shift 2
  local bench_json=""
  if [ "$1" = "--bench-json" ]; then bench_json="$2"; shift 2; fi
  [ "$1" = "--" ] && shift
  NSTEP=$((NSTEP + 1))
  local id; id="$(printf '%02d' "$NSTEP")"
  local logf="$OUT/logs/$id-$name.log" cmd; cmd="$(quote_cmd "$@")"
  if [ "$DRY" = 1 ]; then
    printf '%s\n' "$cmd"
    return 0
  fi
  if [ -n "$SKIP_REST" ]; then
    log "[$id] $name: skipped ($SKIP_REST)"
    printf '{"name": %s, "kind": %s, "status": "skipped", "exit_code": null, "seconds": 0, "command": %s, "summary": %s}' \
      "$(json_str "$name")" "$(json_str "$kind")" "$(json_str "$cmd")" "$(json_str "$SKIP_REST")" >"$OUT/steps/$id-$name.json"
    TABLE+=("$(printf '%-28s %-8s %7ss %10s  %s' "$name" skipped 0 "" "preflight failed")")
    return 0
  fi
  log "[$id] $name: $cmd"
  local memf="$OUT/logs/$id-$name.mem" t0 t1 rc
  start_mem_sampler "$memf"
  t0=$(date +%s.%N)
  timeout --kill-after=15 "$STEP_TIMEOUT" "$@" >"$logf" 2>&1
  rc=$?
  t1=$(date +%s.%N)
  local smi_peak; smi_peak="$(stop_mem_sampler "$memf")"
  rm -f "$memf"
  local secs; secs="$(awk -v a="$t0" -v b="$t1" 'BEGIN{printf "%.1f", b-a}')"
  local status="pass"
  if [ $rc = 124 ] || [ $rc = 137 ]; then status="timeout"; elif [ $rc != 0 ]; then status="fail"; fi
  [ "$status" = pass ] || FAILED=$((FAILED + 1))
  LAST_STATUS="$status"
  # One-line summary: verify's tally, else the last error line, else the last line.
  local summary
  summary="$(grep -E '^[0-9]+ passed, [0-9]+ failed, [0-9]+ errors' "$logf" | tail -1)"
  if [ -n "$summary" ] && ! printf '%s' "$summary" | grep -q ' 0 errors'; then
    summary="$summary; first: $(grep -m1 -E '^ *ERROR ' "$logf" | sed 's/^ *ERROR *//')"
  fi
  [ "$kind" = generate ] && [ "$status" = pass ] && summary="$(grep -c '\.png$' "$logf") images in $OUT/images"
  if [ -z "$summary" ] && [ "$status" != pass ]; then
    summary="$(grep -iE 'error|panic|out of memory|not found|cannot' "$logf" | grep -v '^ *[0-9]*: ' | head -1)"
  fi
  [ -n "$summary" ] || summary="$(grep -m1 '"mean":' "$logf" | tr -d ' ,')"
  [ -n "$summary" ] || summary="$(grep -v '^\s*$' "$logf" | tail -1)"
  # verify: the worst error/tolerance ratio and the tensors out of tolerance (with their golden).
  local extra=""
  if [ "$kind" = verify ]; then
    local worst fails
    worst="$(awk '/^== /{g=$2} /^  (ok|FAIL) /{for(i=1;i<NF;i++) if($i=="x" && $(i+1)=="tol" && ($(i-1)+0>m || m=="")){m=$(i-1)+0; w=$2}}
                  END{if(m!="") printf "%s %s", m, w}' "$logf")"
    fails="$(awk '/^== /{g=$2; sub(/.*\//, "", g)} /^  FAIL /{printf "%s%s:%s", (n++ ? " " : ""), g, $2}' "$logf")"
    extra="$(printf ', "worst_tol_ratio": %s, "worst_tensor": %s, "out_of_tolerance": %s' \
      "$(json_num "${worst%% *}")" "$(json_str "${worst#* }")" "$(json_str "$fails")")"
  fi
  [ "$status" = timeout ] && summary="timed out after ${STEP_TIMEOUT}s; $summary"
  summary="${summary:0:300}"
  {
    printf '{"name": %s, "kind": %s, "status": %s, "exit_code": %s, "seconds": %s, ' \
      "$(json_str "$name")" "$(json_str "$kind")" "$(json_str "$status")" "$rc" "$secs"
    printf '"command": %s, "log": %s, "summary": %s, "nvidia_smi_peak_mib": %s' \
      "$(json_str "$cmd")" "$(json_str "logs/$id-$name.log")" "$(json_str "$summary")" "$(json_num "$smi_peak")"
    printf '%s' "$extra"
    if [ -n "$bench_json" ] && [ -s "$bench_json" ]; then
      printf ', "bench": '; cat "$bench_json"
    fi
    printf '}'
  } >"$OUT/steps/$id-$name.json"
  local mem=""; [ -n "$smi_peak" ] && mem="$(awk -v m="$smi_peak" 'BEGIN{printf "%.1f GiB", m/1024}')"
  TABLE+=("$(printf '%-28s %-8s %7ss %10s  %s' "$name" "$status" "$secs" "$mem" "${summary:0:90}")")
  log "[$id] $name: $status (${secs}s${mem:+, nvidia-smi peak $mem})"
  return 0
}

# ------------------------------------------------------------------------------------ 1. environment
ENV_NOTES=""
if [ "$on_cuda" = 1 ] && [ "$DRY" = 0 ]; then
  # The binary needs libcuda.so.1 (driver), libcudart.so.13, libcublas(Lt).so.13, libcurand.so.10. Search the
  # usual places (CUDA toolkits, PyTorch/JAX virtual environments' nvidia/cu13/lib) and put the directories that
  # hold most of them first; the binary's own folder first of all (a bundled libcurand.so.10).
  roots=(/usr/local /usr/lib /usr/lib64 /opt /root /home)
  for py in python3 python; do
    if command -v "$py" >/dev/null 2>&1; then
      sp="$("$py" -c 'import site,sys; print("\n".join(site.getsitepackages()+[site.getusersitepackages()]))' 2>/dev/null)"
      while IFS= read -r d; do [ -d "$d" ] && roots+=("$d"); done <<<"$sp"
    fi
  done
  cuda_libdirs="$(find "${roots[@]}" \( -path /proc -o -path /sys -o -path /dev \) -prune -o \
      \( -name libcudart.so.13 -o -name libcublas.so.13 -o -name libcublasLt.so.13 \
         -o -name libcurand.so.10 -o -name libnvrtc.so.13 \) -printf '%h\n' 2>/dev/null \
    | grep -v '/stubs$' | grep -v '/nodriver$' | sort | uniq -c | sort -rn | awk '{print $2}' | paste -sd: -)"
  export LD_LIBRARY_PATH="$(dirname "$BIN")${cuda_libdirs:+:$cuda_libdirs}${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
  log "LD_LIBRARY_PATH=$LD_LIBRARY_PATH"
  ldd_out="$(ldd "$BIN" 2>&1 | grep -E 'not found|libcuda|cublas|curand|cudart|nvrtc')"
  printf '%s\n' "$ldd_out" >"$OUT/logs/00-ldd.log"
  printf '%s\n' "$ldd_out" | sed 's/^/[gpu-check]   /' >&2
  if printf '%s' "$ldd_out" | grep -q 'not found'; then
    ENV_NOTES="missing libraries: $(printf '%s\n' "$ldd_out" | grep 'not found' | awk '{print $1}' | paste -sd' ' -)"
    log "WARNING: $ENV_NOTES"
    case "$ENV_NOTES" in *libcuda.so.1*) log "  libcuda.so.1 comes with the NVIDIA driver: is this a GPU machine with a driver (>= 580)?" ;; esac
    case "$ENV_NOTES" in *libcurand*) log "  libcurand.so.10: rebuild with scripts/build-cuda.sh --with-curand, or copy it next to the binary (docs/perf.md)" ;; esac
    case "$ENV_NOTES" in *libcublas*|*libcudart*) log "  CUDA 13 libraries (PyTorch cu13 wheels: site-packages/nvidia/cu13/lib) not found; add their folder to LD_LIBRARY_PATH" ;; esac
  fi
  if printf '%s' "$ldd_out" | grep -E 'libcuda\.so\.1' | grep -qE '/stubs/|/nodriver/'; then
    ENV_NOTES="${ENV_NOTES:+$ENV_NOTES; }libcuda.so.1 resolves to the build stub: remove it from LD_LIBRARY_PATH"
    log "WARNING: libcuda.so.1 resolves to the build-time stub"
  fi
fi
gpu_name=""; gpu_driver=""; gpu_mem=""; gpu_cap=""
if [ "$on_cuda" = 1 ] && [ "$DRY" = 0 ] && command -v nvidia-smi >/dev/null 2>&1; then
  nvidia-smi >"$OUT/logs/00-nvidia-smi.log" 2>&1
  IFS=',' read -r gpu_name gpu_driver gpu_mem gpu_cap < <(nvidia-smi --id="$gpu_index" \
    --query-gpu=name,driver_version,memory.total,compute_cap --format=csv,noheader 2>/dev/null | sed 's/, /,/g')
  log "GPU $gpu_index: $gpu_name, driver $gpu_driver, $gpu_mem, compute capability $gpu_cap"
elif [ "$on_cuda" = 1 ] && [ "$DRY" = 0 ]; then
  log "WARNING: no nvidia-smi on PATH"
fi

# ---------------------------------------------------------------------------------------- preflight
# The binary starts and the device opens (one scheduler golden: no model, a second on any device). If not,
# every later step would fail the same way: they are skipped unless --keep-going.
G="$FX/golden"; P="$FX/parity"
LAST_STATUS=""
run_step preflight preflight -- "$BIN" verify --device "$DEVICE" "$G/scheduler_common.safetensors"
if [ "$DRY" = 0 ] && [ "$LAST_STATUS" != pass ] && [ "$KEEP_GOING" = 0 ]; then
  SKIP_REST="preflight failed: $(grep -m1 -iE 'error' "$OUT"/logs/*-preflight.log | cut -c1-200)"
  log "preflight failed; skipping the other steps (--keep-going runs them anyway)"
fi

# ------------------------------------------------------------------------------------------- 2. verify
sd_goldens=(); reward_goldens=()
for f in "$G"/*.safetensors; do
  case "$(basename "$f")" in
    aesthetic.*|clip_hf.*|open_clip.*|imagereward.*) reward_goldens+=("$f") ;;
    tokenizer.*) ;;            # the real CLIP tokenizer's golden: checked against clip-tokenizer below
    *) sd_goldens+=("$f") ;;   # dpo_ref_unet (weights, no `kind`) is skipped by verify itself
  esac
done
dev=(--device "$DEVICE")
for dt in $DTYPES; do
  run_step "verify-sd15-$dt" verify -- "$BIN" verify "${dev[@]}" --dtype "$dt" --model "$FX/tiny-sd" "${sd_goldens[@]}"
  run_step "verify-sd2-$dt" verify -- "$BIN" verify "${dev[@]}" --dtype "$dt" --model "$FX/tiny-sd2" \
    "$P"/sd2/*.safetensors "$P/pipeline_sd2.safetensors"
  run_step "verify-sdxl-$dt" verify -- "$BIN" verify "${dev[@]}" --dtype "$dt" --model "$FX/tiny-sdxl" \
    "$P"/sdxl/*.safetensors "$P/pipeline_sdxl.safetensors"
  run_step "verify-rewards-$dt" verify -- "$BIN" verify "${dev[@]}" --dtype "$dt" "${reward_goldens[@]}"
done
run_step verify-tokenizer verify -- "$BIN" verify --model "$FX/clip-tokenizer" "$G/tokenizer.safetensors"

# ------------------------------------------------------------------------------- 3. generate and score
run_step generate-tiny-sd generate -- "$BIN" generate "${dev[@]}" --model "$FX/tiny-sd" \
  --prompt "a red circle on a blue square" --prompt "a green triangle" --steps 20 --seed 0 --out "$OUT/images"
run_step score-clip score -- "$BIN" score "${dev[@]}" --reward clip --weights "$FX/tiny-clip-hf" \
  --images "$OUT/images" --prompt "a red circle on a blue square" --json

# ------------------------------------------------------------------------------------------- 4. bench
B="$OUT/bench"
first_dt="${DTYPES%% *}"
tiny_b=(); for b in $TINY_BATCHES; do tiny_b+=(--batch "$b"); done
run_step bench-foundation-tiny bench --bench-json "$B/foundation-tiny.json" -- \
  "$BIN" bench foundation "${dev[@]}" --model "$FX/tiny-sd" --iters "$ITERS" "${tiny_b[@]}" \
  --json "$B/foundation-tiny.json"
run_step bench-rewards bench --bench-json "$B/rewards.json" -- \
  "$BIN" bench rewards "${dev[@]}" --model "$FX/tiny-sd" --iters "$ITERS" "${tiny_b[@]}" --json "$B/rewards.json"
run_step bench-dpo-tiny bench --bench-json "$B/dpo-tiny.json" -- \
  "$BIN" bench dpo "${dev[@]}" --dtype "$first_dt" --model "$FX/tiny-sd" --iters "$ITERS" "${tiny_b[@]}" \
  --json "$B/dpo-tiny.json"
if [ "$SD15" = 1 ]; then
  for dt in $DTYPES; do
    # Sampling (CFG step = UNet forward on 2b latents) and UNet forward/backward on the SD1.5-sized UNet.
    run_step "bench-sd15-unet-$dt" bench --bench-json "$B/sd15-unet-$dt.json" -- \
      "$BIN" bench foundation "${dev[@]}" --dtype "$dt" --model "$FX/tiny-sd" --sd15 --latent "$LATENT" \
      --iters "$ITERS" --batch 1 --json "$B/sd15-unet-$dt.json"
    for b in $BATCHES; do
      run_step "bench-dpo-sd15-lora-$dt-b$b" bench --bench-json "$B/dpo-sd15-$dt-b$b.json" -- \
        "$BIN" bench dpo "${dev[@]}" --dtype "$dt" --sd15 --latent "$LATENT" --iters "$ITERS" --batch "$b" \
        --json "$B/dpo-sd15-$dt-b$b.json"
    done
  done
fi
# Side by side with PyTorch (scripts/torch_reference.py) where python has torch and diffusers: the same rows,
# diffpref run again in the same step, the ratio in the log and in torch-*.json.
PY="${PYTHON:-python3}"
if [ -f "$SELF_DIR/torch_reference.py" ] && "$PY" -c "import torch, diffusers" >/dev/null 2>&1; then
  run_step torch-dpo-tiny bench -- "$PY" "$SELF_DIR/torch_reference.py" dpo --model "$FX/tiny-sd" \
    --device "$DEVICE" --dtype "$first_dt" --iters "$ITERS" --diffpref "$BIN" --json "$B/torch-dpo-tiny.json"
  run_step torch-pipeline-tiny bench -- "$PY" "$SELF_DIR/torch_reference.py" pipeline --model "$FX/tiny-sd" \
    --device "$DEVICE" --dtype "$first_dt" --iters "$ITERS" --diffpref "$BIN" --json "$B/torch-pipeline-tiny.json"
  if [ "$SD15" = 1 ]; then
    for dt in $DTYPES; do
      for b in $BATCHES; do
        run_step "torch-dpo-sd15-$dt-b$b" bench -- "$PY" "$SELF_DIR/torch_reference.py" dpo --sd15 \
          --latent "$LATENT" --batch "$b" --device "$DEVICE" --dtype "$dt" --iters "$ITERS" --diffpref "$BIN" \
          --json "$B/torch-dpo-sd15-$dt-b$b.json"
      done
    done
  fi
else
  log "torch side by side: skipped (no torch_reference.py next to this script, or $PY lacks torch/diffusers)"
fi
[ "$DRY" = 1 ] && exit 0

# ------------------------------------------------------------------------------------------- report
REPORT="$OUT/gpu-report.json"
build_info=""
[ -f "$(dirname "$BIN")/BUILD-INFO.txt" ] && build_info="$(cat "$(dirname "$BIN")/BUILD-INFO.txt")"
{
  printf '{\n"report": "diffpref gpu-check",\n'
  printf '"date": %s,\n' "$(json_str "$(date -u +%Y-%m-%dT%H:%M:%SZ)")"
  printf '"host": %s,\n' "$(json_str "$(uname -n)")"
  printf '"device": %s,\n' "$(json_str "$DEVICE")"
  printf '"gpu": {"name": %s, "driver": %s, "memory_total": %s, "compute_capability": %s},\n' \
    "$(json_str "$gpu_name")" "$(json_str "$gpu_driver")" "$(json_str "$gpu_mem")" "$(json_str "$gpu_cap")"
  printf '"binary": %s,\n"build_info": %s,\n' "$(json_str "$BIN")" "$(json_str "$build_info")"
  printf '"ld_library_path": %s,\n"environment_notes": %s,\n' "$(json_str "${LD_LIBRARY_PATH:-}")" "$(json_str "$ENV_NOTES")"
  printf '"settings": {"dtypes": %s, "batches": %s, "latent": %s, "iters": %s, "sd15": %s, "step_timeout_s": %s},\n' \
    "$(json_str "$DTYPES")" "$(json_str "$BATCHES")" "$LATENT" "$ITERS" "$([ "$SD15" = 1 ] && echo true || echo false)" "$STEP_TIMEOUT"
  printf '"steps_failed": %s,\n"steps": [\n' "$FAILED"
  first=1
  for f in "$OUT"/steps/*.json; do
    [ -e "$f" ] || continue
    [ $first = 1 ] || printf ',\n'
    first=0
    cat "$f"
  done
  printf '\n]\n}\n'
} >"$REPORT"

echo
echo "diffpref gpu-check on ${gpu_name:-$DEVICE}${gpu_driver:+ (driver $gpu_driver)}"
printf '%-28s %-8s %8s %10s  %s\n' step status time smi-peak summary
for line in "${TABLE[@]}"; do printf '%s\n' "$line"; done
echo
# Benchmark rows, as the bench commands printed them.
for f in "$OUT"/logs/*-bench-*.log; do
  [ -s "$f" ] || continue
  awk '/^model +measure +seconds/{on=1; next} on && NF' "$f"
done
echo
# The logs and bench rows in one archive next to the report (two files to carry back).
tar -czf "$OUT/gpu-check-logs.tar.gz" -C "$OUT" logs bench 2>/dev/null
echo "report: $REPORT ($NSTEP steps, $FAILED failed); logs: $OUT/gpu-check-logs.tar.gz"
[ "$FAILED" = 0 ]
exit $?
}
