#!/usr/bin/env bash
# build-cuda.sh — build the CUDA `diffpref` binary on a machine WITHOUT a GPU and package it, with the
# fixtures that scripts/gpu-check.sh needs, into dist/diffpref-cuda-sm<cap>.tar.xz.
#
#   scripts/build-cuda.sh                 # build + package (CUDA_COMPUTE_CAP=90: H100/H200)
#   scripts/build-cuda.sh --with-curand   # also bundle libcurand.so.10 (+43 MB compressed)
#   scripts/build-cuda.sh --no-fixtures   # binary + scripts only (~10 MB): dist/diffpref-cuda-sm<cap>-bin.tar.xz,
#                                         # for a GPU machine that has a repository checkout (fixtures from there)
#   scripts/build-cuda.sh --no-package    # build only
#   CUDA_COMPUTE_CAP=80 scripts/build-cuda.sh   # another GPU generation (A100)
#
# It uses the pinned CUDA 13.0 toolchain of ../shared/cuda/setup-cuda-build.sh (NVIDIA's PyPI wheels plus a
# link-time libcuda stub; see ../shared/cuda/README.md). The build goes to its own target directory
# (target/cuda by default), so the ordinary CPU build cache is untouched, and env.sh is sourced only in a
# subshell, so nothing leaks into this shell. Nothing here is needed for the normal CPU build or for CI.
#
# Environment:
#   DIFFPREF_SHARED       folder holding cuda/setup-cuda-build.sh (default: <repo>/../shared)
#   DIFFPREF_CUDA_PREFIX  toolchain prefix (default: $HOME/.cache/diffpref-cuda, as the setup script)
#   CUDA_COMPUTE_CAP      GPU compute capability (default 90)
#   CARGO_TARGET_DIR      cargo target dir (default: <repo>/target/cuda)
#   DIST_DIR              where the tarball goes (default: <repo>/dist)
#   XZ_LEVEL              xz preset for the tarball (default 9; -T0 is always used)
set -euo pipefail
# One block, read before it runs: editing this file meanwhile cannot derail a running build.
{

log() { printf '[build-cuda] %s\n' "$*" >&2; }
die() { printf '[build-cuda] ERROR: %s\n' "$*" >&2; exit 1; }

usage() { sed -n '2,23p' "$0" | sed 's/^# \{0,1\}//'; }

WITH_CURAND=0
PACKAGE=1
FIXTURES=1
while [ $# -gt 0 ]; do
  case "$1" in
    --with-curand) WITH_CURAND=1 ;;
    --no-package) PACKAGE=0 ;;
    --no-fixtures) FIXTURES=0 ;;
    -h|--help) usage; exit 0 ;;
    *) die "unknown argument '$1' (see --help)" ;;
  esac
  shift
done

REPO="$(git -C "$(dirname "$0")" rev-parse --show-toplevel 2>/dev/null)" \
  || REPO="$(cd "$(dirname "$0")/.." && pwd -P)"
cd "$REPO"
[ -f Cargo.toml ] && grep -q '^name = "diffpref"' Cargo.toml || die "$REPO is not the diffpref repository"

SHARED="${DIFFPREF_SHARED:-$REPO/../shared}"
SETUP="$SHARED/cuda/setup-cuda-build.sh"
[ -f "$SETUP" ] || die "cannot find $SETUP.
  The CUDA build toolchain script lives in the shared folder next to the repository (../shared/cuda).
  Set DIFFPREF_SHARED=/path/to/shared if it is elsewhere."

export CUDA_COMPUTE_CAP="${CUDA_COMPUTE_CAP:-90}"
CAP="$CUDA_COMPUTE_CAP"
PREFIX="${DIFFPREF_CUDA_PREFIX:-$HOME/.cache/diffpref-cuda}"
export DIFFPREF_CUDA_PREFIX="$PREFIX"
TARGET_DIR="${CARGO_TARGET_DIR:-$REPO/target/cuda}"
DIST_DIR="${DIST_DIR:-$REPO/dist}"

fmt_time() { printf '%dm%02ds' $(( $1 / 60 )) $(( $1 % 60 )); }
size() { du -h "$1" | cut -f1; }

# ------------------------------------------------------------------ 1. toolchain
t0=$(date +%s)
log "CUDA toolchain: $SETUP (prefix $PREFIX, compute capability $CAP)"
bash "$SETUP"
t1=$(date +%s)
log "toolchain ready in $(fmt_time $((t1 - t0)))"

# ------------------------------------------------------------------ 2. build
log "cargo build --release --features cuda --bin diffpref (CARGO_TARGET_DIR=$TARGET_DIR)"
(
  # shellcheck disable=SC1091
  . "$PREFIX/env.sh"
  export CARGO_TARGET_DIR="$TARGET_DIR"
  cargo build --release --features cuda --bin diffpref
)
t2=$(date +%s)
BIN="$TARGET_DIR/release/diffpref"
[ -x "$BIN" ] || die "no binary at $BIN"
log "built $BIN ($(size "$BIN")) in $(fmt_time $((t2 - t1)))"

# Sanity checks: linked against the CUDA libraries, and it starts here (env.sh puts the stub libcuda in
# front when there is no driver, so `--device cuda` must fail cleanly instead of the loader refusing).
needed="$(readelf -d "$BIN" 2>/dev/null | sed -n 's/.*(NEEDED).*\[\(.*\)\]/\1/p' | paste -sd' ' -)"
log "NEEDED: $needed"
case " $needed " in *" libcuda.so.1 "*) ;; *) die "the binary does not link libcuda.so.1: was it built with --features cuda?" ;; esac
(
  . "$PREFIX/env.sh"
  "$BIN" --version >/dev/null || die "the CUDA binary does not start on this machine"
  if [ ! -e /proc/driver/nvidia/version ] && [ ! -e /dev/nvidiactl ]; then
    if "$BIN" verify --device cuda tests/fixtures/golden/scheduler_common.safetensors >/dev/null 2>&1; then
      log "note: --device cuda worked here?!"
    else
      log "ok: starts here, and --device cuda fails cleanly (no GPU on this machine)"
    fi
  fi
)

if [ "$PACKAGE" = 0 ]; then
  log "done (build only): $BIN"
  exit 0
fi

# ------------------------------------------------------------------ 3. package
NAME="diffpref-cuda-sm$CAP"
STAGE="$(mktemp -d)"
trap 'rm -rf "$STAGE"' EXIT
ROOT="$STAGE/$NAME"
mkdir -p "$ROOT/scripts" "$ROOT/tests/fixtures" "$ROOT/docs"
cp "$BIN" "$ROOT/diffpref"
cp scripts/gpu-check.sh scripts/torch_reference.py "$ROOT/scripts/"
[ -f docs/perf.md ] && cp docs/perf.md "$ROOT/docs/"
# The fixtures gpu-check.sh reads (goldens, the tiny models they need, reward fixtures). Files over 64 MB
# are left out (none today); generator scripts are not needed there.
if [ "$FIXTURES" = 1 ]; then
  for d in golden parity tiny-sd tiny-sd2 tiny-sdxl clip-tokenizer tiny-clip-hf tiny-open-clip \
           tiny-aesthetic tiny-imagereward; do
    [ -d "tests/fixtures/$d" ] || die "missing tests/fixtures/$d"
    (cd tests/fixtures && find "$d" -type f -size -64M ! -name '*.py' ! -name '*.pyc' -print0) \
      | (cd tests/fixtures && xargs -0 cp --parents -t "$ROOT/tests/fixtures")
  done
  [ -f tests/fixtures/MANIFEST.txt ] && cp tests/fixtures/MANIFEST.txt "$ROOT/tests/fixtures/"
else
  rmdir "$ROOT/tests/fixtures" "$ROOT/tests"
  NAME="$NAME-bin"
  mv "$ROOT" "$STAGE/$NAME"
  ROOT="$STAGE/$NAME"
fi
if [ "$WITH_CURAND" = 1 ]; then
  cp -L "$PREFIX/site/nvidia/cu13/lib/libcurand.so.10" "$ROOT/" \
    || die "no libcurand.so.10 in $PREFIX/site/nvidia/cu13/lib"
fi
{
  echo "diffpref CUDA build"
  echo "commit:        $(git rev-parse HEAD 2>/dev/null || echo unknown)$(git diff --quiet HEAD -- 2>/dev/null || echo ' (+ uncommitted changes)')"
  echo "built:         $(date -u +%Y-%m-%dT%H:%M:%SZ) on $(uname -n) ($(nproc) cores)"
  echo "compute cap:   $CAP (candle kernels for this GPU generation only, e.g. sm_90a for 90; rebuild with CUDA_COMPUTE_CAP=<cap> for another GPU)"
  echo "toolchain:     CUDA 13.0 wheels ($(cat "$PREFIX/.wheels" 2>/dev/null | paste -sd' ' -))"
  echo "needs:         NVIDIA driver >= 580, libcudart.so.13 libcublas.so.13 libcublasLt.so.13 libcurand.so.10"
  echo "curand bundled: $([ "$WITH_CURAND" = 1 ] && echo yes || echo no)"
  if [ "$FIXTURES" = 1 ]; then
    echo "run:           bash scripts/gpu-check.sh   (see docs/perf.md)"
  else
    echo "run:           bash $NAME/scripts/gpu-check.sh --fixtures <repo>/tests/fixtures   (no fixtures bundled; see docs/perf.md)"
  fi
} > "$ROOT/BUILD-INFO.txt"

mkdir -p "$DIST_DIR"
# dist/ holds build outputs only: keep it out of git without touching the repository's .gitignore.
[ -f "$DIST_DIR/.gitignore" ] || printf '*\n' > "$DIST_DIR/.gitignore"
TARBALL="$DIST_DIR/$NAME.tar.xz"
log "packaging $TARBALL (xz -${XZ_LEVEL:-9})"
tar -C "$STAGE" -cf - "$NAME" | xz -T0 "-${XZ_LEVEL:-9}" > "$TARBALL.tmp"
mv -f "$TARBALL.tmp" "$TARBALL"
t3=$(date +%s)

unpacked="$(du -sh "$ROOT" | cut -f1)"
log "binary $(size "$ROOT/diffpref"), fixtures $([ -d "$ROOT/tests/fixtures" ] && du -sh "$ROOT/tests/fixtures" | cut -f1 || echo none), unpacked $unpacked"
log "tarball $TARBALL: $(size "$TARBALL") ($(stat -c %s "$TARBALL") bytes)"
log "times: toolchain $(fmt_time $((t1 - t0))), cargo build $(fmt_time $((t2 - t1))), package $(fmt_time $((t3 - t2))), total $(fmt_time $((t3 - t0)))"
if [ "$FIXTURES" = 1 ]; then
  log "on the GPU machine: tar -xJf $NAME.tar.xz && cd $NAME && bash scripts/gpu-check.sh"
else
  log "on the GPU machine, in the repository root: tar -xJf $NAME.tar.xz && bash $NAME/scripts/gpu-check.sh --fixtures tests/fixtures"
fi
exit 0
}
