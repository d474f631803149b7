#!/usr/bin/env bash
# GPU benchmark (see scripts/bench_gpu.py): one table of diffalign DPO / MaPO / AlignProp on full-size random
# SD 1.5 (512 px) and SDXL (1024 px), LoRA, bf16, beside the diffusers SDXL DPO example's step, transcribed.
#
#   bash scripts/bench_gpu.sh                 # BUDGET_S=420 by default; the hard limit is BUDGET_S + 60 s
#   BUDGET_S=300 PYTHON=.venv/bin/python bash scripts/bench_gpu.sh --cases sdxl-dpo-ckpt,diffusers-sdxl-dpo-ckpt
#
# Needs a CUDA machine with torch; nothing is downloaded by the benchmark itself. If diffalign or its dependencies
# do not import, `pip install -e .` is tried once (short timeout; it needs a package index). The table goes to
# stdout and to $OUT/bench_gpu/table.md (or ./bench_gpu_out/table.md when OUT is unset).
set -u
cd "$(dirname "$0")/.."
BUDGET_S="${BUDGET_S:-420}"
HARD_S=$(( ${BUDGET_S%.*} + 60 ))
if [ -n "${OUT:-}" ]; then DEST="$OUT/bench_gpu"; else DEST="bench_gpu_out"; fi
mkdir -p "$DEST"
if [ -z "${PYTHON:-}" ]; then
  if [ -x .venv/bin/python ] && .venv/bin/python -c 'import torch' 2>/dev/null; then PYTHON=.venv/bin/python
  else PYTHON=$(command -v python3 || command -v python); fi
fi
echo "python: $PYTHON"
"$PYTHON" - <<'PY'
import importlib, platform
print("python", platform.python_version())
for name in ("torch", "diffusers", "transformers", "peft", "accelerate", "open_clip", "diffalign"):
    try:
        m = importlib.import_module(name)
        print(f"  {name:12s} {getattr(m, '__version__', 'ok')}")
    except Exception as err:  # noqa: BLE001
        print(f"  {name:12s} MISSING ({type(err).__name__}: {err})")
try:
    import torch
    print("  cuda", torch.cuda.is_available(), torch.version.cuda,
          torch.cuda.get_device_name() if torch.cuda.is_available() else "")
except Exception:
    pass
PY
CHECK='import torch, diffusers, peft, accelerate, transformers, open_clip, diffalign'
if ! "$PYTHON" -c "$CHECK" 2>/dev/null; then
  echo "some imports fail: trying 'pip install -e .' (timeout 240 s)"
  if "$PYTHON" -c 'import torch, diffusers, peft, accelerate, transformers, open_clip' 2>/dev/null; then
    timeout 240 "$PYTHON" -m pip install -q --no-deps -e . || echo "pip install --no-deps -e . failed"
  else
    timeout 240 "$PYTHON" -m pip install -q -e . || echo "pip install -e . failed (no package index reachable?)"
  fi
  if ! "$PYTHON" -c "$CHECK"; then
    echo "ERROR: cannot import torch/diffusers/peft/accelerate/transformers/open_clip/diffalign with $PYTHON;"
    echo "       install the project (pip install -e .) or set PYTHON to an interpreter that has them."
    exit 2
  fi
fi
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false PYTHONUNBUFFERED=1
timeout -k 10 "$HARD_S" "$PYTHON" scripts/bench_gpu.py --budget-s "$BUDGET_S" --out "$DEST" "$@" \
  2> >(tee "$DEST/stderr.log" | grep -v -i "warn" >&2) | tee "$DEST/stdout.log"
rc=${PIPESTATUS[0]}
[ "$rc" = 124 ] && echo "bench_gpu.py hit the hard limit of ${HARD_S} s; the rows above are what finished"
echo "table: $DEST/table.md (exit $rc)"
exit "$rc"
