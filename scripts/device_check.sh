#!/usr/bin/env bash
# One call on the GPU device: build, GPU tests and benchmarks, logs and JSON under $OUT, a short table last.
# Usage: bash scripts/device_check.sh [stages]   stages: comma list of
#   info,build,cxx,probe,qprobe,train,test,test_pdl,kernels,ncu,quant,ab,profile,tpsim,latency,serving,tp,tp_nop2p,tpab,tp4,load
#   (default: info,build,test,kernels,latency,tp; build_baseline runs whenever .baseline/ is there; tp brings
#   tp_nop2p unless TP_NOP2P=0)
# Env per stage: TEST_PATHS/TEST_ARGS/TEST_LIMIT, KERNELS_ARGS/KERNELS_BASE_ARGS/KERNELS_LIMIT,
# AB_MODELS/AB_ENVS/AB_ROUNDS/AB_TOKENS/AB_BATCH/AB_ARGS (more bench/latency.py flags, e.g. --quantize int4)/AB_LIMIT, PROFILE_MODELS/PROFILE_ENVS/PROFILE_ARGS/PROFILE_LIMIT,
# TPSIM_SIZES/TPSIM_ENVS/TPSIM_ARGS/TPSIM_BASE_ARGS/TPSIM_LIMIT (ENVS entries: A=1+B=2
# sets two; a '+' not followed by NAME= stays in the value, as in NEOX_RT_OP_BACKENDS=linear=cuda+triton),
# QPROBE_ARGS/QPROBE_LIMIT, NCU_ARGS/NCU_PROBE_ARGS/NCU_LIMIT, QUANT_ARGS/QUANT_LIMIT, LATENCY_ARGS, SERVING_ARGS/SERVING_LIMIT, TP_ARGS/TP1_ARGS/TP_LIMIT/TP_NOP2P_LIMIT, TPAB_ENVS/TPAB_ROUNDS/TPAB_ARGS/TPAB_LIMIT,
# LOAD_LAYERS/LOAD_LIMIT, BASELINE= (skip .baseline), BASELINE_COMMIT (its commit).
# Each stage runs under its own time limit; a failing stage is recorded and the next one runs.
set -u
STAGES=",${1:-info,build,test,kernels,latency,tp},"
OUT=${OUT:-/tmp/neox_out}; mkdir -p "$OUT"
export NEOX_RT_COMMIT=${NEOX_RT_COMMIT:-$(git rev-parse HEAD 2>/dev/null || echo unknown)}
export PYTHONUNBUFFERED=1 NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0} MAX_JOBS=${MAX_JOBS:-16}
SUMMARY="$OUT/summary.txt"; : > "$SUMMARY"

NGPU=$(nvidia-smi -L 2>/dev/null | wc -l)
# packages the device image lacks (FastAPI, uvicorn, pydantic for the server: bench/serving.py --http) travel as
# wheels in .whl (the device tool's README says how to fetch them): installed whenever carried
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site
fi

stage() {  # stage NAME LIMIT_S COMMAND...
  local name=$1 limit=$2; shift 2
  case "$STAGES" in *",$name,"*) ;; *) return 0 ;; esac
  local t0=$(date +%s)
  echo "===== $name (limit ${limit}s): $*"
  timeout "$limit" bash -c "$*" > "$OUT/$name.log" 2>&1
  local rc=$? t1=$(date +%s)
  tail -n 25 "$OUT/$name.log"
  printf '%-10s rc=%-4s %5ss  %s\n' "$name" "$rc" "$((t1 - t0))" "$(tail -n 1 "$OUT/$name.log" | cut -c1-100)" >> "$SUMMARY"
}

# Training needs the GPU but not the extension: it runs beside the (CPU-bound) build.
( stage train 330 "python3 tools/train_default_model.py --out $OUT/default_model --minutes ${TRAIN_MINUTES:-3} --device cuda --seed 0 ${TRAIN_ARGS:-}" ) &
TRAIN_PID=$!
stage info 60 "nvidia-smi; python3 -c 'import torch, triton, transformers; print(torch.__version__, torch.version.cuda, triton.__version__, transformers.__version__, torch.cuda.get_device_name())'; git log --oneline -1 || true"
# .baseline/ (ignored; `git archive <commit> | tar -x -C .baseline`, carried with the call) is the version to
# compare against in the same run: its extension is built in place beside the main build.
HAVE_BASE=; [ -d .baseline ] && [ -n "${BASELINE-1}" ] && HAVE_BASE=1
# its benches must not run against an unbuilt tree (they then measured this tree's kernels): always build it
[ -n "$HAVE_BASE" ] && STAGES="${STAGES}build_baseline,"
BASE_PY="cd .baseline && NEOX_RT_COMMIT=${BASELINE_COMMIT:-baseline} python3"  # a bench of the baseline tree
# BASELINE_EXT=reuse: the baseline's csrc/ builds the same extension (checked: the two csrc/ trees differ in comments
# at most), so it gets a copy of this tree's build instead of its own (a Python-only change measured beside its parent).
if [ -n "$HAVE_BASE" ] && [ "${BASELINE_EXT:-build}" != reuse ]; then
  ( stage build_baseline 420 "cd .baseline && MAX_JOBS=6 python3 setup.py -q build_ext --inplace" ) &
  BASE_PID=$!
fi
# The framework-free kernel tests (csrc/standalone/test_kernels.cu, as CMakeLists.txt builds them) beside the build.
PROBE_ARCH="-arch=sm_$(echo ${TORCH_CUDA_ARCH_LIST%%;*} | tr -d .+PTX)"
QPROBE_ARCH=$PROBE_ARCH; [ "$PROBE_ARCH" = -arch=sm_90 ] && QPROBE_ARCH=-arch=sm_90a
# Then decode-attention options and plans side by side, timed and traced (csrc/standalone/decode_probe.cu, no torch).
# qprobe: the quantized kernels' configurations against pure reads of their weights (csrc/standalone/quant_probe.cu,
# QPROBE_ARGS, default --fused: the fused pair and sum at tiles x warps x blocks a SM, empty: the single kernels;
# sm_90a on an H100).
( stage cxx 300 "nvcc -std=c++17 -O3 --use_fast_math -Icsrc -arch=sm_\$(echo \${TORCH_CUDA_ARCH_LIST%%;*} | tr -d .+PTX) -o /tmp/neox_rt_kernel_test csrc/standalone/test_kernels.cu && /tmp/neox_rt_kernel_test" ; stage probe ${PROBE_LIMIT:-240} "nvcc -std=c++17 -O3 --use_fast_math -Icsrc $PROBE_ARCH -o /tmp/decode_probe csrc/standalone/decode_probe.cu & nvcc -std=c++17 -O3 --use_fast_math -Icsrc $PROBE_ARCH -DNEOX_RT_DECODE_TRACE -o /tmp/decode_probe_trace csrc/standalone/decode_probe.cu & wait; /tmp/decode_probe $OUT/decode_probe.json && /tmp/decode_probe_trace $OUT/decode_probe_trace.json" ; stage qprobe ${QPROBE_LIMIT:-240} "nvcc -std=c++17 -O3 --use_fast_math -Icsrc $QPROBE_ARCH -o /tmp/quant_probe csrc/standalone/quant_probe.cu && /tmp/quant_probe ${QPROBE_ARGS---fused} $OUT/quant_probe.json" ) &
CXX_PID=$!
# A prebuilt extension (scripts/prebuild_extension.sh on the CPU machine, carried as .prebuilt/) replaces the build
# when it was made from the same csrc/ and setup.py, for this torch and this card's arch: the package is installed
# without the extension and the prebuilt module copied in (saves ~100 s of device time a call).
EXT_CHECK="python3 -c 'import neox_rt._C, torch; print(\"extension ok\", [o for o in dir(torch.ops.neox_rt) if not o.startswith(\"_\")])'"
ARCH_NOW=$(python3 -c "import torch; print('%d.%d' % torch.cuda.get_device_capability())" 2>/dev/null)
# PREBUILT_DIR (default .prebuilt): another prebuilt, e.g. one for TORCH_CUDA_ARCH_LIST="7.5+PTX", whose PTX the driver
# compiles for this card: the T4 code path (__CUDA_ARCH__ 750) running on an H100 (#24).
PB=${PREBUILT_DIR:-.prebuilt}
PREBUILT=$(ls $PB/_C*.so 2>/dev/null | head -n 1)
if [ -n "$PREBUILT" ] && [ "$(cat $PB/csrc.sha256)" = "$(bash scripts/csrc_hash.sh)" ] \
   && [ "$(cat $PB/torch_version)" = "$(python3 -c 'import torch; print(torch.__version__)')" ] \
   && grep -q -e "$ARCH_NOW" -e "+PTX" $PB/archs; then
  stage build 420 "rm -f neox_rt/_C*.so && NEOX_RT_SKIP_CUDA=1 python3 -m pip install -q --no-build-isolation --no-deps -e . && cp $PREBUILT neox_rt/ && echo 'prebuilt extension: $PREBUILT' && $EXT_CHECK"
else
  [ -n "$PREBUILT" ] && echo "device_check: $PB/ does not match this tree, torch or arch $ARCH_NOW: building"
  stage build 420 "python3 -m pip install -v --no-build-isolation --no-deps -e . && $EXT_CHECK"
fi
[ -n "${BASE_PID:-}" ] && wait "$BASE_PID"
if [ -n "$HAVE_BASE" ] && [ "${BASELINE_EXT:-build}" = reuse ]; then
  code_diff() { diff -r -q -I '^ *//' -I '^ *\*' "$1" "$2" >/dev/null; }  # differences in comment lines only
  if code_diff csrc .baseline/csrc && cmp -s setup.py .baseline/setup.py; then
    cp neox_rt/_C*.so .baseline/neox_rt/ && echo "device_check: the baseline uses this tree's extension" | tee -a "$SUMMARY"
  else
    echo "device_check: BASELINE_EXT=reuse refused: csrc/ or setup.py differ beyond comments" | tee -a "$SUMMARY"
  fi
fi
wait "$CXX_PID"
wait "$TRAIN_PID"
stage test ${TEST_LIMIT:-420} "python3 -m pytest -q -rf -m 'gpu or multigpu' ${TEST_PATHS:-tests} ${TEST_ARGS:-}"
# the decode-path tests again with programmatic dependent launch of the GEMV turned off (on is the default)
stage test_pdl ${TEST_LIMIT:-420} "NEOX_RT_PDL=0 python3 -m pytest -q -rf -m gpu tests/test_graphs.py tests/test_kernels_cuda.py tests/test_default_model.py -k 'model or graph or gemv or fused'"
# KERNELS_BASE_ARGS: the baseline tree's bench/kernels.py with these arguments first, in the same stage (same card)
KB_CMD=""
[ -n "$HAVE_BASE" ] && [ -n "${KERNELS_BASE_ARGS:-}" ] && KB_CMD="($BASE_PY bench/kernels.py --out $OUT/kernels_baseline.json $KERNELS_BASE_ARGS) ; "
stage kernels ${KERNELS_LIMIT:-300} "$KB_CMD python3 bench/kernels.py --out $OUT/kernels.json ${KERNELS_ARGS:-}"
# Nsight Compute on the kernels that miss their targets (bench/ncu_probe.py), caches flushed per replay.
stage ncu ${NCU_LIMIT:-240} "ncu --profile-from-start off --clock-control none --section SpeedOfLight --section MemoryWorkloadAnalysis --section Occupancy --section LaunchStats --section WarpStateStats --section SchedulerStats ${NCU_ARGS:-} python3 bench/ncu_probe.py ${NCU_PROBE_ARGS:-}"
# The W8A16 / W4A16 kernels on the decode shapes, every variant, against fp16 and the floor (bench/quant_kernels.py).
stage quant ${QUANT_LIMIT:-300} "python3 bench/quant_kernels.py --out $OUT/quant_kernels.json ${QUANT_ARGS:-}"
# A/B decode latency in one run on one card: the baseline tree, then this tree with each NEOX_RT_* setting in
# AB_ENVS (space-separated; '-' = defaults), same shapes and flags.
AB_FLAGS="--models ${AB_MODELS:-gpt-neox-20b,pythia-1.4b} --skip-hf --tokens ${AB_TOKENS:-100,200} --batch ${AB_BATCH:-1} ${AB_ARGS:-}"
AB_CMD=""
[ -n "$HAVE_BASE" ] && AB_CMD="($BASE_PY bench/latency.py $AB_FLAGS --out $OUT/ab_baseline.json) ; "
envs_of() {  # "A=1+B=x+y" -> "A=1 B=x+y": split on '+' only where a NAME= follows
  echo "${1/#-/}" | sed -E 's/\+([A-Z_][A-Z0-9_]*=)/ \1/g'
}
# AB_ROUNDS rounds (default 1), the arms interleaved in each; every run its own JSON (round r > 1: ab_<tag>_r<r>.json)
for r in $(seq 1 "${AB_ROUNDS:-1}"); do
  for e in ${AB_ENVS:--}; do  # an entry may set several variables joined by '+': A=1+B=2
    tag=$(echo "$e" | tr -c 'A-Za-z0-9\n' '_')$([ "$r" = 1 ] || echo "_r$r")
    AB_CMD+="echo '## round $r arm $e' ; env $(envs_of "$e") python3 bench/latency.py $AB_FLAGS --out $OUT/ab_$tag.json ; "
  done
done
stage ab ${AB_LIMIT:-420} "$AB_CMD true"
PROFILE_CMD=""
for e in ${PROFILE_ENVS:-${AB_ENVS:--}}; do
  for m in ${PROFILE_MODELS:-gpt-neox-20b pythia-1.4b}; do
    PROFILE_CMD+="env $(envs_of "$e") python3 bench/profile_decode.py --model $m ${PROFILE_ARGS:-} --out $OUT/profile_${m}_$(echo "$e" | tr -c 'A-Za-z0-9\n' '_').json ; "
  done
done
stage profile ${PROFILE_LIMIT:-240} "$PROFILE_CMD true"
# The per-rank compute of 20B at TP=N on this one card (bench/tp_latency.py --simulate-tp: rank 0's shard, the
# collectives replaced by local stand-ins), beside TP=1, for each NEOX_RT_* setting in TPSIM_ENVS; the baseline first.
TPSIM_CMD=""
for n in ${TPSIM_SIZES:-1 2}; do
  a=$([ "$n" = 1 ] && echo "--tp 1" || echo "--simulate-tp $n")
  [ -n "$HAVE_BASE" ] && TPSIM_CMD+="($BASE_PY bench/tp_latency.py $a --skip-memory ${TPSIM_BASE_ARGS:-} \
--out $OUT/tpsim${n}_baseline.json) ; "
  for e in ${TPSIM_ENVS:--}; do
    tag=$(echo "$e" | tr -c 'A-Za-z0-9\n' '_')
    TPSIM_CMD+="env $(envs_of "$e") python3 bench/tp_latency.py $a --skip-memory ${TPSIM_ARGS:-} \
--out $OUT/tpsim${n}_$tag.json ; "
  done
done
stage tpsim ${TPSIM_LIMIT:-300} "$TPSIM_CMD true"
stage latency ${LATENCY_LIMIT:-420} "python3 bench/latency.py --quick --out $OUT/latency.json ${LATENCY_ARGS:-}"
# the serving benchmark (#23): continuous vs static batching on one trace, decode step vs floor, TTFT, HTTP cost
stage serving ${SERVING_LIMIT:-420} "python3 bench/serving.py --out $OUT/serving.json ${SERVING_ARGS:-}"
if [ "$NGPU" -ge 2 ]; then
  # TP=1 and the host-path repeat skip the memory measurement (its 2048-token prefill is the slow part; TP=2 keeps
  # it). The host-path repeat (NCCL_P2P_DISABLE=1, as on PCIe-only T4 machines) is its own stage with its own limit:
  # inside `tp` it was cut off once after the memory-measuring TP=2 run had used the time (session 6).
  stage tp ${TP_LIMIT:-420} "python3 bench/tp_latency.py --tp 1 --out $OUT/tp1.json ${TP1_ARGS:---skip-memory} ${TP_ARGS:-} ; torchrun --nproc-per-node 2 bench/tp_latency.py --tp 2 --out $OUT/tp2.json ${TP_ARGS:-}"
  # `tp` implies its host-path repeat unless TP_NOP2P=0
  case "$STAGES" in *",tp,"*) [ "${TP_NOP2P:-1}" != 0 ] && STAGES="${STAGES}tp_nop2p," ;; esac
  stage tp_nop2p ${TP_NOP2P_LIMIT:-240} "NCCL_P2P_DISABLE=1 torchrun --nproc-per-node 2 bench/tp_latency.py --tp 2 --out $OUT/tp2_nop2p.json --skip-memory --skip-no-allreduce ${TP_ARGS:-}"
  # A/B of TP=2 settings on this pair: each entry of TPAB_ENVS (as TPSIM_ENVS) in turn, TPAB_ROUNDS rounds interleaved
  TPAB_CMD=""
  for r in $(seq 1 "${TPAB_ROUNDS:-2}"); do
    for e in ${TPAB_ENVS:--}; do
      tag=$(echo "$e" | tr -c 'A-Za-z0-9\n' '_')
      TPAB_CMD+="env $(envs_of "$e") torchrun --nproc-per-node 2 bench/tp_latency.py --tp 2 --skip-memory \
--skip-no-allreduce ${TPAB_ARGS:-} --out $OUT/tpab_${tag}_r$r.json ; "
    done
  done
  stage tpab ${TPAB_LIMIT:-400} "$TPAB_CMD true"
fi
if [ "$NGPU" -ge 4 ]; then  # TP=4 with its peak memory (2048-token cache), then each rank capped at 15 GiB (a T4's share)
  stage tp4 ${TP4_LIMIT:-300} "torchrun --nproc-per-node 4 bench/tp_latency.py --tp 4 --out $OUT/tp4.json ${TP_ARGS:-} ; torchrun --nproc-per-node 4 bench/tp_latency.py --tp 4 --memory-cap-gib 15 --out $OUT/tp4_cap15.json --skip-no-allreduce ${TP_ARGS:-}"
fi
stage load ${LOAD_LIMIT:-420} "python3 bench/load_20b.py --layers ${LOAD_LAYERS:-44} --keep --dir /tmp/neox_ck && if [ $NGPU -ge 2 ]; then torchrun --nproc-per-node 2 bench/load_20b.py --load-only --dir /tmp/neox_ck; fi; rm -rf /tmp/neox_ck"

# The device returns at most 8 files: pack the logs and JSON into one archive, the trained model into another.
cp "$SUMMARY" /tmp/neox_summary.txt
# A second run in the same call (one command running this script twice) keeps the first archive: logs_2.tgz, ...
ARCHIVE=logs.tgz; i=2
while [ -e "$OUT/$ARCHIVE" ]; do ARCHIVE=logs_$i.tgz; i=$((i + 1)); done
# The markdown tables (one a bench run: each A/B arm and round, the latency table) go into one file beside it
# (logs_tables.md, each under its file's name) and into the archive: ten A/B tables once crowded out the rest.
MDS=$(cd "$OUT" && ls *.md 2>/dev/null | grep -v '_tables\.md$')
[ -n "$MDS" ] && ( cd "$OUT" && for f in $MDS; do echo "## $f"; cat "$f"; echo; done > "${ARCHIVE%.tgz}_tables.tmp" )
( cd "$OUT" && tar czf "$ARCHIVE" --remove-files $(ls *.log *.json summary.txt $MDS 2>/dev/null) 2>/dev/null )
[ -n "$MDS" ] && mv "$OUT/${ARCHIVE%.tgz}_tables.tmp" "$OUT/${ARCHIVE%.tgz}_tables.md"
[ -d "$OUT/default_model" ] && ( cd "$OUT" && tar cf default_model.tar --remove-files default_model )
echo; echo "===== summary"; cat /tmp/neox_summary.txt
