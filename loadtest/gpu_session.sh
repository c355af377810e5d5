#!/usr/bin/env bash
# One call on a lent GPU machine (no package registry there): the CUDA checks and the GPU benchmarks.
#
#   On the dev machine, once (wheels for what the GPU image lacks or has in another version, and
#   redis-server for the Redis-tier tests), into paths that .git/info/exclude ignores:
#     pip download --no-deps --only-binary=:all: --python-version 3.12 --platform manylinux_2_28_x86_64 \
#         --platform manylinux_2_17_x86_64 -d .whl transformers==5.23.0 peft==0.21.2 redis==8.1.0 hiredis
#     mkdir -p .gpu/lib && cp /usr/bin/redis-server .gpu/ && cp /lib/x86_64-linux-gnu/{liblzf.so.1,libjemalloc.so.2} .gpu/lib/
#   Then run, carrying .whl and .gpu:   bash loadtest/gpu_session.sh [tests] [kernel] [batching] [paged] [gpu]
#
#   The paged-attention session (issue 20): one call (timeout_s 600) within the 15-minute device budget;
#   the benchmark first (<= 330 s, it checkpoints its JSON after each part), then the kernel tests on
#   CUDA (<= 210 s); the core suite on CUDA, `tests`, needs a later call or session:
#       bash loadtest/gpu_session.sh gpu paged
#   then copy $OUT/bench_gpu.json to loadtest/results/gpu/bench_gpu.json and commit it.
#
#   The CUDA-graph decode session (issue 21): the same one call, the benchmark (graphed and eager decode
#   rows, capture_s) then the graph, sync-guard and sampler tests on CUDA (<= 210 s):
#       bash loadtest/gpu_session.sh gpu decode
#
# Results land in $OUT (or loadtest/results/gpu when OUT is unset).
set -uo pipefail
OUT=${OUT:-loadtest/results/gpu}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
if [ -d .whl ]; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
    export PYTHONPATH=/tmp/site:$PWD
fi
[ -d .gpu ] && export PATH=$PWD/.gpu:$PATH LD_LIBRARY_PATH=$PWD/.gpu/lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
python3 -c "import torch, transformers, peft, triton; print('torch', torch.__version__, 'transformers', transformers.__version__, 'peft', peft.__version__, 'triton', triton.__version__, torch.cuda.get_device_name())"
steps=${*:-tests kernel batching}
status=0
for step in $steps; do
    start=$(date +%s)
    case $step in
    tests) # the core suite with every engine on CUDA (float32), checked against the CPU PEFT oracle
        ALORA_TEST_DEVICE=cuda python3 -m pytest tests/alora_core -q --maxfail=20 -p no:cacheprovider --timeout 300 \
            2>&1 | tee "$OUT/pytest_cuda.log" | tail -40 ;;
    kernel)
        python3 -m loadtest.bench_lora_kernel --out "$OUT/bench_lora_kernel.json" 2>&1 | tee "$OUT/bench_lora_kernel.log" ;;
    batching)
        python3 -m loadtest.bench_batching --device cuda --threads 8 --out "$OUT/bench_batching.json" \
            2>&1 | tee "$OUT/bench_batching.log" ;;
    paged) # the paged-attention kernel compiled on CUDA: against its reference, the engine on it against
        # PEFT (float32), bf16 closeness against PEFT's bf16 run, the step buffers (pinned, one copy);
        # the ahead-of-time compile check is for machines without a GPU
        ALORA_TEST_DEVICE=cuda timeout 210 python3 -m pytest -q -p no:cacheprovider --timeout 150 \
            -k "not compile_for_sm80" tests/alora_core/test_paged_attention_triton.py \
            tests/alora_core/test_step_buffers.py 2>&1 | tee "$OUT/pytest_paged.log" | tail -30 ;;
    decode) # CUDA graphs: replay equals eager (float32 against PEFT), no host sync in a step
        # (torch.cuda.set_sync_debug_mode("error")), the device sampler against the definition
        ALORA_TEST_DEVICE=cuda timeout 210 python3 -m pytest -q -p no:cacheprovider --timeout 150 \
            tests/alora_core/test_cuda_graphs.py tests/alora_core/test_sync_guard.py \
            tests/alora_core/test_sampling_paths.py 2>&1 | tee "$OUT/pytest_decode.log" | tail -30 ;;
    gpu) # kernel vs gather+SDPA, then the 8B-shaped engine end to end (skips its later parts past 270 s)
        timeout 330 python3 -m loadtest.bench_gpu --budget-s 270 --out "$OUT/bench_gpu.json" \
            2>&1 | tee "$OUT/bench_gpu.log" ;;
    *) echo "unknown step $step"; exit 2 ;;
    esac
    rc=$?
    echo "== $step: exit $rc in $(($(date +%s) - start)) s"
    [ $rc -ne 0 ] && status=$rc
done
exit $status
