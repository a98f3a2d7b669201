#!/usr/bin/env bash
# Diagnose TP=2 decode with NCCL_P2P_DISABLE=1 (host-path all-reduce): a small model under several settings,
# then the 20B shape under the first setting that finished. Logs under $OUT.
export PYTHONUNBUFFERED=1 NCCL_NVLS_ENABLE=0 TORCH_CUDA_ARCH_LIST=9.0 MAX_JOBS=16 OMP_NUM_THREADS=1
OUT=${OUT:-/tmp/neox_out}; mkdir -p "$OUT"
python3 -m pip install -q --no-build-isolation --no-deps -e . > "$OUT/build.log" 2>&1; echo "build rc=$?"
S="--layers 2 --hidden 1024 --heads 8 --vocab 1024 --new 16 --prompt 8 --skip-memory --skip-no-allreduce"
TR="torchrun --nproc-per-node 2 bench/tp_latency.py --tp 2"
declare -A CFG=([default]="" [nopdl]="NEOX_RT_PDL=0" [nographs]="ARG=--no-graphs")
chosen=""
for tag in default nopdl nographs; do
  e=${CFG[$tag]}; arg=""; [[ $e == ARG=* ]] && { arg=${e#ARG=}; e=""; }
  t0=$(date +%s)
  timeout ${PROBE_LIMIT:-60} env NCCL_P2P_DISABLE=1 $e $TR $S $arg --out "$OUT/probe_$tag.json" > "$OUT/probe_$tag.log" 2>&1
  rc=$?
  echo "probe $tag rc=$rc $(( $(date +%s) - t0 ))s: $(grep -v '^W11\|^\*' "$OUT/probe_$tag.log" | tail -n 1 | cut -c1-100)"
  [ $rc -eq 0 ] && [ -z "$chosen" ] && chosen=$tag
done
[ -z "$chosen" ] && { echo "no setting finished"; exit 1; }
e=${CFG[$chosen]}; arg=""; [[ $e == ARG=* ]] && { arg=${e#ARG=}; e=""; }
echo "20B with NCCL_P2P_DISABLE=1, setting $chosen"
timeout ${BIG_LIMIT:-200} env NCCL_P2P_DISABLE=1 $e $TR --skip-memory --skip-no-allreduce $arg --out "$OUT/tp2_nop2p.json" 2>&1 | grep -v '^W11\|^\*'
if [ "$chosen" != default ]; then
  echo "20B with P2P, setting $chosen"
  timeout ${BIG_LIMIT:-200} env $e $TR --skip-memory $arg --out "$OUT/tp2_p2p_$chosen.json" 2>&1 | grep -v '^W11\|^\*'
fi
