#!/usr/bin/env bash
# GPU benchmark (see scripts/bench_gpu.py): one table of diffalign DPO / MaPO / AlignProp on full-size random
# SD 1.5 (512 px) and SDXL (1024 px), LoRA, bf16, beside the diffusers SDXL DPO example's step, transcribed.
#
#   bash scripts/bench_gpu.sh                 # BUDGET_S=420 by default; the hard limit is BUDGET_S + 60 s
#   BUDGET_S=300 PYTHON=.venv/bin/python bash scripts/bench_gpu.sh --cases sdxl-dpo-ckpt,diffusers-sdxl-dpo-ckpt
#   bash scripts/bench_gpu.sh --families sd35m,flux     # a second run: SD3.5 Medium and FLUX.1-dev at 1024 px
#
# Needs a CUDA machine with torch; nothing is downloaded by the benchmark itself. diffalign is imported from this
# checkout. If its dependencies do not import, the wheels in .whl/ (fetched beforehand by scripts/gpu_wheels.sh, on
# a machine with a package index) are installed into a temporary folder; without .whl/, `pip install -e .` is
# tried once (short timeout; it needs a package index). The table goes to
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
# diffalign itself is imported from this checkout; no install is needed for it
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
if ! "$PYTHON" -c "$CHECK" 2>/dev/null; then
  if ls .whl/*.whl >/dev/null 2>&1; then
    # wheels fetched beforehand by scripts/gpu_wheels.sh (a GPU image without a package index)
    SITE="${TMPDIR:-/tmp}/diffalign-site"
    echo "some imports fail: installing $(ls .whl/*.whl | wc -l) wheels from .whl/ into $SITE"
    "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" .whl/*.whl \
      || echo "installing the wheels from .whl/ failed"
    export PYTHONPATH="$SITE:$PYTHONPATH"
  else
    echo "some imports fail and there is no .whl/ (scripts/gpu_wheels.sh): trying 'pip install' (timeout 240 s)"
    timeout 240 "$PYTHON" -m pip install -q -e . || echo "pip install -e . failed (no package index reachable?)"
  fi
  if ! "$PYTHON" -c "$CHECK"; then
    echo "ERROR: cannot import torch/diffusers/peft/accelerate/transformers/open_clip/diffalign with $PYTHON;"
    echo "       fetch the missing wheels with scripts/gpu_wheels.sh on a machine with a package index, carry .whl/,"
    echo "       or set PYTHON to an interpreter that has them."
    exit 2
  fi
  "$PYTHON" -c 'import diffusers, peft, transformers, open_clip; [print(f"  now {m.__name__:12s} {m.__version__}") for m in (diffusers, peft, transformers, open_clip)]'
fi
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false PYTHONUNBUFFERED=1
timeout -k 10 "$HARD_S" "$PYTHON" scripts/bench_gpu.py --budget-s "$BUDGET_S" --out "$DEST" "$@" \
  2> >(tee "$DEST/stderr.log" | grep -v -i "warn" >&2) | tee "$DEST/stdout.log"
rc=${PIPESTATUS[0]}
[ "$rc" = 124 ] && echo "bench_gpu.py hit the hard limit of ${HARD_S} s; the rows above are what finished"
echo "table: $DEST/table.md (exit $rc)"
exit "$rc"
