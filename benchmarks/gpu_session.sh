#!/usr/bin/env bash
# One device call: install detaudit (+ the wheels carried in .whl/ for what the GPU image lacks; fill it here first
# with benchmarks/gpu_wheels.sh and name .whl in the call's carry), then run the
# steps named in $STEPS (default: all) with their output under $OUT. Each step has its own time limit so one slow
# step cannot take the others' logs with it.
#
#   STEPS="probe rescore engine" bash benchmarks/gpu_session.sh
#
# probe:   detaudit probe kernels on cuda in bf16 and fp32 (stock torch vs ours, every op)
# rescore: detaudit local (batch-invariant) on a Qwen3-1.7B-shaped random model, rescored with bi and stock kernels
# engine:  benchmarks/engine.py: N target requests stock vs batch-invariant under `single` load (CUDA graphs on, as
#          users run it, and eager), N prompts at once (offline, as the vLLM/SGLang anchors), engine vs HF generate()
#          (add --rounds R to $ENGINE_ARGS to repeat the phases in alternating order within one process)
# enginegpu: tests/gpu/test_engine_gpu.py (graph replay == eager bitwise with bi kernels, stock split attention,
#          the prefix cache bitwise invariant with graphs on the tiny and the $PRESET-shaped model)
# gputests: all of tests/gpu (the log becomes tests/gpu/LOG.txt)
# prefix:  benchmarks/engine.py, the prefix cache's cost and gain: the 1000 x 100 `single` run with the cache on and
#          off (-nocache phases), and again with a $PREFIX_SHARED-token system prompt shared by every request
#          (default 2048; prefill saved), JSON per shared length and run under $OUT/prefix_bench_sharedK_runN.json;
#          $PREFIX_PHASES reorders the phases (e.g. the -nocache ones first, to pair the order)
# local:   detaudit local N = 1000 with stock and batch-invariant kernels, each analysed (the issue's must-show)
# kernels: benchmarks/kernel_bench.py (matmul vs cuBLAS and TML's matmul_persistent from .third_party/tml, row-wise
#          bandwidth, attention decode vs flash), JSON under $OUT/kernels
# tune:    benchmarks/kernel_tuning_h200.py (TUNE_ONLY sections), its candidates compiled first by $WARM processes
# moekernels: tests/gpu/test_moe_gpu.py, then benchmarks/kernel_bench.py --only moe (one Qwen3-30B-A3B layer's experts:
#          bi vs the stock grouped GEMMs)
# moe:     benchmarks/engine.py on a Qwen3-30B-A3B-shaped random model (PRESET=qwen3-30b-a3b: weights drawn on the
#          device at load): N target requests, batch-invariant then stock, under `single` load ($MOE_ARGS)
# cacheserve: `detaudit serve` on cuda (stock, then batch-invariant) audited by `detaudit run --cache cold,warm`
#          on the standard suite (serial, so only the cache differs), gated with require-cache-invariant; logs and
#          summaries under $OUT/cache_* ($CACHE_KERNELS, $CACHE_ARGS)
# profile: benchmarks/engine_profile.py: a decode step's time and kernels, stock vs batch-invariant ($PROFILE_ARGS,
#          e.g. "--batches '' --mixed 32,96,128" for the steps that mix decode and prefill)
set -u
: "${OUT:?OUT must name the output folder}"
STEPS=${STEPS:-"probe rescore engine"}
ENGINE_ARGS=${ENGINE_ARGS:-"-n 1000 --max-tokens 100 --scenario single --max-batch 128 --max-batched-tokens 2048 \
--phases batch-invariant,stock,offline-batch-invariant,offline-stock"}
LOCAL_N=${LOCAL_N:-1000}
MOE_ARGS=${MOE_ARGS:-"-n 1000 --max-tokens 100 --scenario single --max-batch 128 --max-batched-tokens 2048 \
--phases batch-invariant,stock"}
PRESET=${PRESET:-qwen3-8b}
export PYTHONUNBUFFERED=1
t0=$(date +%s)
# The *_ARGS variables are shell words, read as a command line reads them: quotes group, so
# ENGINEGPU_ARGS="-k 'held or single'" passes one -k expression (unquoted expansion split it into three words).
words() { eval "WORDS=($1)"; }
left() { echo $(( ${BUDGET:-560} - ($(date +%s) - t0) )); }

python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    || exit 1
# The package as installed (kernels/, probes/, reports/ under detaudit/), without a build step: the image's
# setuptools may be too old for pyproject.toml's license field.
rm -rf /tmp/pkg && mkdir -p /tmp/pkg && cp -r detaudit /tmp/pkg/ && for d in kernels probes reports; do
    cp -r $d /tmp/pkg/detaudit/$d; done
export PYTHONPATH=/tmp/pkg:/tmp/site
mkdir -p /tmp/bin && cat > /tmp/bin/detaudit <<'SH' && chmod +x /tmp/bin/detaudit && export PATH=/tmp/bin:$PATH
#!/usr/bin/env python3
from detaudit.cli.app import main
main()
SH
{
    nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
    python3 -c 'import torch, triton, transformers; print("torch", torch.__version__, "triton", triton.__version__,
"transformers", transformers.__version__)'
} 2>&1 | tee "$OUT/machine.txt"

MODEL=/tmp/model-$PRESET
build_model() {
    [ -d "$MODEL" ] && return 0
    local arch=qwen3 extra=""
    # The MoE preset is 61 GB in bf16: written as config + tokenizer, its weights drawn by the engine as it loads.
    [ "$PRESET" = qwen3-30b-a3b ] && arch=qwen3-moe extra=--weights-at-load
    # shellcheck disable=SC2086
    timeout 240 detaudit tiny-model "$MODEL" --arch $arch --preset "$PRESET" --dtype bfloat16 --device cuda $extra \
        2>&1 | tee -a "$OUT/model.log"
}

for step in $STEPS; do
    echo "== $step ($(left) s left)"
    case $step in
    probe)
        for dt in bf16 fp32; do
            timeout 150 detaudit probe kernels --device cuda --dtype $dt 2>&1 | tee "$OUT/probe_kernels_$dt.txt"
        done ;;
    rescore)
        build_model
        r=/tmp/r-bi
        {
            timeout 150 detaudit local --model "$MODEL" --prompt "Tell me about Richard Feynman" --device cuda \
                --kernels batch-invariant -n 64 --max-tokens 64 \
                --scenario mixed --max-batch 32 --out $r --force
            echo "-- rescore with batch-invariant kernels"
            timeout 90 detaudit rescore $r --model "$MODEL" --device cuda --kernels batch-invariant
            echo "-- rescore with stock kernels"
            timeout 90 detaudit rescore $r --model "$MODEL" --device cuda --kernels stock
            detaudit analyze $r --json > "$OUT/rescore_summary.json"
        } 2>&1 | tee "$OUT/rescore.log" ;;
    engine)
        build_model
        mkdir -p /tmp/eb && ln -sfn "$MODEL" /tmp/eb/model
        # A step named twice runs twice: run N's JSON is engine_bench_runN.json (its log stays in /tmp).
        n=$(( $(find "$OUT" -maxdepth 1 -name 'engine_bench_run*.json' | wc -l) + 1 ))
        words "$ENGINE_ARGS"
        timeout "$(left)" python3 benchmarks/engine.py --out /tmp/eb --model "$MODEL" "${WORDS[@]}" 2>&1 \
            | tee "/tmp/engine_bench_run$n.log" | grep -v '^{'
        cp /tmp/eb/engine_bench.json "$OUT/engine_bench_run$n.json" ;;
    enginegpu)
        # From /tmp: run from the repository root, python -m would import ./detaudit, which lacks kernels/.
        # tests/ on the path for its helper modules; the 8B-shaped model of the prefix-cache test built once.
        build_model
        repo=$(pwd)
        words "${ENGINEGPU_ARGS:-}"
        (cd /tmp && DETAUDIT_GPU_MODEL_8B=$MODEL PYTHONPATH=$PYTHONPATH:$repo/tests timeout "$(( $(left) < 400 ? $(left) : 400 ))" python3 -m pytest -n 0 \
            -q -s -p no:cacheprovider --noconftest "${WORDS[@]}" "$repo/tests/gpu/test_engine_gpu.py") 2>&1 \
            | tee "$OUT/engine_gpu_tests.log" ;;
    gputests)
        # Every GPU test (kernels and engine), 4 workers; tests/ on the path for its helper modules; the 8B-shaped
        # model of the prefix-cache test built once (shared with the engine and prefix steps).
        build_model
        repo=$(pwd)
        (cd /tmp && DETAUDIT_GPU_MODEL_8B=$MODEL PYTHONPATH=$PYTHONPATH:$repo/tests timeout "$(( $(left) < 420 ? $(left) : 420 ))" python3 -m pytest -q \
            -n 4 --dist load -p no:cacheprovider --noconftest -rfE "$repo/tests/gpu") 2>&1 | tee "$OUT/gpu_tests.log" ;;
    prefix)
        build_model
        for k in ${PREFIX_SHARED:-0 2048}; do
            timeout "$(left)" python3 benchmarks/engine.py --out "/tmp/pb$k" --model "$MODEL" -n 1000 --max-tokens 100 \
                --scenario single --max-batch 128 --max-batched-tokens 2048 --shared-prefix-tokens "$k" \
                --phases "${PREFIX_PHASES:-batch-invariant,batch-invariant-nocache,stock,stock-nocache}" 2>&1 \
                | tee "/tmp/prefix_bench$k.log" | grep -v '^{'
            # A step named twice runs twice: run N's JSON is prefix_bench_sharedK_runN.json.
            n=$(( $(find "$OUT" -maxdepth 1 -name "prefix_bench_shared${k}_run*.json" | wc -l) + 1 ))
            cp "/tmp/pb$k/engine_bench.json" "$OUT/prefix_bench_shared${k}_run$n.json"
        done ;;
    local)
        build_model
        for k in stock batch-invariant; do
            timeout "$(( $(left) / 2 ))" detaudit local --model "$MODEL" --prompt "Tell me about Richard Feynman" \
                --device cuda --kernels $k -n "$LOCAL_N" \
                --max-tokens 100 --scenario single --max-batch 128 --max-batched-tokens 2048 \
                --out /tmp/local-$k --force 2>&1 | tee "$OUT/local_$k.log"
            detaudit analyze /tmp/local-$k 2>&1 | tee -a "$OUT/local_$k.log"
        done ;;
    kernels)
        n=$(( $(find "$OUT" -maxdepth 1 -name 'kernels_run*.json' | wc -l) + 1 ))
        timeout "$(left)" python3 benchmarks/kernel_bench.py --out "/tmp/kernels$n" --tml .third_party/tml/tml_bio.py \
            --only "${KERNELS_ONLY:-matmul,rowwise,attention}" 2>&1 | tee "/tmp/kernels_bench$n.txt" | grep -v '^{'
        cp "/tmp/kernels$n/kernels.json" "$OUT/kernels_run$n.json" ;;
    tune)
        words "${TUNE_ARGS:-}"
        for i in $(seq 0 $(( ${WARM:-12} - 1 ))); do
            timeout 150 python3 benchmarks/kernel_tuning_h200.py --warm "$i/${WARM:-12}" "${WORDS[@]}" \
                --only "${TUNE_ONLY:-matmul,attention,softmax}" > "/tmp/warm$i.log" 2>&1 &
        done
        wait
        echo "compiled in $(( $(date +%s) - t0 )) s"
        timeout "${TUNE_S:-$(left)}" python3 benchmarks/kernel_tuning_h200.py --out "$OUT" "${WORDS[@]}" \
            --only "${TUNE_ONLY:-matmul,attention,softmax}" \
            2>&1 | tee "$OUT/tuning.log" ;;
    moekernels)
        repo=$(pwd)
        (cd /tmp && PYTHONPATH=$PYTHONPATH:$repo/tests timeout 240 python3 -m pytest -q -s -n 0 -p no:cacheprovider \
            --noconftest -rfE "$repo/tests/gpu/test_moe_gpu.py") 2>&1 | tee "$OUT/moe_gpu_tests.log"
        timeout "$(left)" python3 benchmarks/kernel_bench.py --out /tmp/kmoe --only moe 2>&1 \
            | tee "$OUT/moe_kernels.txt" | grep -v '^{'
        cp /tmp/kmoe/kernels.json "$OUT/moe_kernels.json" ;;
    moe)
        build_model
        words "$MOE_ARGS"
        timeout "$(left)" python3 benchmarks/engine.py --out /tmp/ebmoe --model "$MODEL" "${WORDS[@]}" 2>&1 \
            | tee /tmp/moe_engine_bench.log | grep -v '^{'
        cp /tmp/ebmoe/engine_bench.json "$OUT/moe_engine_bench.json" ;;
    cacheserve)
        build_model
        for k in ${CACHE_KERNELS:-stock batch-invariant}; do
            detaudit serve --model "$MODEL" --device cuda --kernels "$k" --port 8011 --max-model-len 1024 \
                > "$OUT/cache_serve_$k.log" 2>&1 &
            pid=$!
            python3 - <<'PY' || { echo "serve did not come up"; kill $pid; continue; }
import time, urllib.request
for _ in range(240):
    try:
        urllib.request.urlopen("http://127.0.0.1:8011/v1/models", timeout=2)
        break
    except OSError:
        time.sleep(0.5)
else:
    raise SystemExit(1)
PY
            words "${CACHE_ARGS:-"-n 2 --max-tokens 32"}"
            timeout "$(( $(left) / 2 ))" detaudit run --base-url http://127.0.0.1:8011/v1 --suite standard \
                "${WORDS[@]}" --cache cold,warm --out "/tmp/cache-$k" --force \
                --gate require-cache-invariant 2>&1 | tee "$OUT/cache_run_$k.log"
            echo "gate exit ${PIPESTATUS[0]}" | tee -a "$OUT/cache_run_$k.log"
            detaudit analyze "/tmp/cache-$k" --json > "$OUT/cache_summary_$k.json"
            kill $pid; wait $pid 2>/dev/null
        done ;;
    profile)
        build_model
        words "${PROFILE_ARGS:-}"
        timeout "$(left)" python3 benchmarks/engine_profile.py --model "$MODEL" --out "$OUT" "${WORDS[@]}" 2>&1 \
            | tee "$OUT/profile.log" ;;
    *) echo "unknown step $step"; exit 2 ;;
    esac
done
echo "== done in $(( $(date +%s) - t0 )) s"
