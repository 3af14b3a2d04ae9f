#!/usr/bin/env bash
# Everything a GPU run is for, in one command: build the ops' extensions, run the tests (all
# but CI's CPU stand-ins: besides the gpu-marked ones, many tests take CUDA tensors when a GPU is present), time
# the GPU benchmarks, profile them (the kernels taking the most time in each row). Each stage has its own time
# limit, so one call fits a fixed time budget and a stage cut short still leaves its log (and the
# benchmarks their finished cases).
#
#   benchmarks/gpu_session.sh build:60 test:300 bench:230            # stage:seconds, in order
#   benchmarks/gpu_session.sh bench:500 -- --op gru_patch_loss       # arguments after -- go to benchmarks.run
#   benchmarks/gpu_session.sh build:60 profile:120 -- --op gru_patch_decode --case M8192   # top 12 kernels
#   benchmarks/gpu_session.sh tune:300                                # GRU Triton block sizes (benchmarks/tune_gru.py)
#   PYTEST_ARGS="-m gpu" benchmarks/gpu_session.sh test:300           # a subset of the tests
#
# Logs and the benchmark JSONs (cuda-bench.json, cuda-profile.json, gru-tune.json) land in $OUT (default
# /tmp/agiformer-gpu). Wheels under .whl/ (flash-linear-attention, for its baseline) are installed first when
# present.
set -uo pipefail
OUT=${OUT:-/tmp/agiformer-gpu}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 MAX_JOBS=${MAX_JOBS:-16} TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0}
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
if compgen -G ".whl/*.whl" >/dev/null; then
    python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/agiformer-site .whl/*.whl &&
        export PYTHONPATH=$PYTHONPATH:/tmp/agiformer-site
fi

stages=()
bench_args=()
while [ $# -gt 0 ]; do
    if [ "$1" = "--" ]; then shift; bench_args=("$@"); break; fi
    stages+=("$1"); shift
done

nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.max.sm --format=csv
python3 -c "import torch, triton; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__, torch.cuda.get_device_name())"
git rev-parse --short HEAD 2>/dev/null

status=0
for stage in "${stages[@]}"; do
    name=${stage%%:*}
    limit=${stage#*:}
    start=$SECONDS
    case $name in
    build)
        # the ops' libraries compile side by side; a failing one prints the compiler's output
        ops=$(python3 -c "from agiformer_kernels.extension import ops_with_sources; print(*ops_with_sources())")
        for op in $ops; do
            AGIFORMER_KERNELS_VERBOSE_BUILD=1 timeout "$limit" python3 -c \
                "from agiformer_kernels import extension; extension.load('$op'); print('built $op')" \
                >"$OUT/build-$op.log" 2>&1 &
        done
        wait
        for op in $ops; do
            grep -q "^built $op" "$OUT/build-$op.log" || { status=1; echo "BUILD FAILED: $op"; tail -40 "$OUT/build-$op.log"; }
            cat "$OUT/build-$op.log" >>"$OUT/build.log" && rm "$OUT/build-$op.log"
        done
        ;;
    test)
        # failures are written to their log as they happen (tests/conftest.py), not only at the end
        # CI's CPU stand-ins for a GPU (the CUDA emulation, the nvcc syntax checks) are left to CI: on a GPU
        # they only cost time (the whole suite did not fit a 280 s stage with them)
        AGIFORMER_TEST_FAILURE_LOG="$OUT/gpu-test-failures.log" timeout "$limit" python3 -m pytest tests \
            --ignore-glob="*_emulated.py" --ignore=tests/test_cuda_sources.py \
            -v -rfE --tb=short --durations=15 -p no:cacheprovider -n "${TEST_WORKERS:-12}" ${PYTEST_ARGS:-} 2>&1 |
            grep -v -e PytestBenchmarkWarning -e "warner(" | tee "$OUT/gpu-tests.log" | grep -v PASSED | tail -60 || status=1
        ;;
    bench)
        timeout "$limit" python3 -m benchmarks.run --device cuda --out "$OUT/cuda-bench.json" "${bench_args[@]}" \
            2>&1 | tee "$OUT/cuda-bench.log" | tail -80 || status=1
        ;;
    profile)
        timeout "$limit" python3 -m benchmarks.run --device cuda --profile 12 --no-memory \
            --out "$OUT/cuda-profile.json" "${bench_args[@]}" 2>&1 | tee "$OUT/cuda-profile.log" | tail -80 || status=1
        ;;
    tune)
        timeout "$limit" python3 -m benchmarks.tune_gru --out "$OUT/gru-tune.json" 2>&1 | tee "$OUT/gru-tune.log" |
            tail -60 || status=1
        ;;
    *) echo "unknown stage $name"; exit 2 ;;
    esac
    echo "== $name: $((SECONDS - start)) s"
done
exit $status
