#!/usr/bin/env bash
# One device call (written in session 13, not run yet): profile the skinny GEMM's tiles on this
# GPU (`valora tune-kernels --skinny`: cuBLAS and every fitting tile, token buckets 1-32, the 7B
# projections) into the shipped table, then the decode benchmark with that table, skinny GEMM
# (`fused`) vs cuBLAS (`cublas_base`) in one process. Afterwards:
#   cp $files_at/r/NVIDIA_H200.json valora/ops/tables/     (after reading the results)
#   SHA=<tree> OUT=... bash bench/ops/skinny_tune_gpu.sh
set -u
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD
SHA=${SHA:-unknown}
R=$OUT/r && mkdir -p "$R"/decode
TABLE=valora/ops/tables/$(python3 -c "import torch; from valora.ops.tile_table import table_file_name; print(table_file_name(torch.cuda.get_device_name()))")
timeout 300 python3 -m valora.ops.tuning --skinny --tokens 1,2,4,8,16,32 \
  --layers q,qkv,gate_up,down --time-budget 280 2>&1 | tr '\r' '\n' | tail -n 3 > "$R/tune_log.txt"
cp "$TABLE" "$R/"
timeout 240 python3 bench/model/bench_decode.py --out "$R/decode" --skip-hf \
  --layers fused,cublas_base --batches 1,8,16,32 --sha "$SHA" > "$R/decode/log.txt" 2>&1
cat "$R/tune_log.txt"
python3 - "$R/$(basename "$TABLE")" <<'PY'
import json, sys
entries = json.load(open(sys.argv[1]))["entries"]
for key, record in sorted(entries.items()):
    if key.startswith("skinny:"):
        print(key, record["use"], record["time_us"], record.get("tile"))
PY
grep -E "^\| (fused|cublas_base) \|" "$R/decode/summary.md" || tail -n 8 "$R/decode/log.txt"
