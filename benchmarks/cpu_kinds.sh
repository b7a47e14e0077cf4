#!/usr/bin/env bash
# The default `asymlora compare` (the main job of `make demo`) timed on each of three CPU kinds,
# emulated on one CPU by capping the instruction set that oneDNN, MKL and ATen may use, and
# `make test` on the AVX2 kind (README, "Two commands"; docs/compare-protocol.md).
#
#   bash benchmarks/cpu_kinds.sh [RUNS]        # RUNS whole-process runs per kind (default 2)
#
# Run it from the repository root, on an IDLE machine (nothing else running: the figures are wall
# times), with `make install-test` done. A kind needs a CPU that has it: the caps only take
# instructions away, so the AMX kind needs AMX (amx_bf16 in /proc/cpuinfo) and the AVX512-BF16
# kind needs avx512_bf16; a kind the CPU lacks is skipped and said so. Writes, for each kind K,
# docs/results/cpu-kinds/K/run-N/ (the compare output, output.txt, time.txt from /usr/bin/time -v),
# docs/results/cpu-kinds/make-test-avx2.txt, and the table docs/results/cpu-kinds/summary.md.
set -u
RUNS=${1:-2}
OUT=docs/results/cpu-kinds
mkdir -p "$OUT"
export HF_HUB_OFFLINE=1
FLAGS=$(grep -m1 '^flags' /proc/cpuinfo)
has() { [[ " $FLAGS " == *" $1 "* ]]; }

# kind | needs CPU flag | environment
KINDS=(
  "amx|amx_bf16|"
  "avx512-bf16|avx512_bf16|ONEDNN_MAX_CPU_ISA=AVX512_CORE_BF16"
  "avx2|avx2|ONEDNN_MAX_CPU_ISA=AVX2 MKL_ENABLE_INSTRUCTIONS=AVX2 ATEN_CPU_CAPABILITY=avx2"
)
AVX2_ENV="ONEDNN_MAX_CPU_ISA=AVX2 MKL_ENABLE_INSTRUCTIONS=AVX2 ATEN_CPU_CAPABILITY=avx2"

wall() {  # the "Elapsed (wall clock)" of a /usr/bin/time -v report, in seconds
  awk -F': ' '/Elapsed \(wall clock\)/ {n=split($2,t,":"); s=0; for(i=1;i<=n;i++) s=s*60+t[i]; printf "%.1f", s}' "$1"
}
median() { sort -n | awk '{a[NR]=$1} END {if (NR==0) print "-"; else if (NR%2) print a[(NR+1)/2]; else printf "%.1f", (a[NR/2]+a[NR/2+1])/2}'; }

{
  echo "# The default \`asymlora compare\` per CPU kind ($(date -u +%F), $(nproc) cores,"
  echo "$(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs); torch $(python -c 'import torch; print(torch.__version__)'))"
  echo
  echo "| kind | environment | precision auto picked (bf16 speed-up measured) | wall time, median of $RUNS (runs) | verdict |"
  echo "|---|---|---|---:|---|"
} > "$OUT/summary.md"

for spec in "${KINDS[@]}"; do
  IFS='|' read -r kind flag envs <<< "$spec"
  if ! has "$flag"; then
    echo "| $kind | \`${envs:-none}\` | skipped: this CPU has no $flag | | |" >> "$OUT/summary.md"
    echo "skipping $kind: no $flag on this CPU" >&2
    continue
  fi
  times=()
  for n in $(seq 1 "$RUNS"); do
    dir="$OUT/$kind/run-$n"
    rm -rf "$dir" && mkdir -p "$dir"
    echo "== $kind run $n: env ${envs:-none}" >&2
    env $envs /usr/bin/time -v -o "$dir/time.txt" asymlora compare -o "$dir" > "$dir/output.txt" 2>&1
    times+=("$(wall "$dir/time.txt")")
    echo "   $(tail -n 1 "$dir/output.txt" | cut -c1-200)" >&2
  done
  med=$(printf '%s\n' "${times[@]}" | median)
  probe=$(python -c "import json,sys; s=json.load(open(sys.argv[1]))['settings']; p=s.get('precision_probe') or {}; \
print(f\"{s['precision_used']} ({p.get('bf16_speedup', '-')}x)\")" "$OUT/$kind/run-1/results.json")
  verdict=$(grep -m1 ' vs lora ' "$OUT/$kind/run-1/output.txt" | sed 's/^ *//')
  echo "| $kind | \`${envs:-none}\` | $probe | **$med s** (${times[*]}) | $verdict |" >> "$OUT/summary.md"
done

echo "== make test under the AVX2 caps" >&2
env $AVX2_ENV /usr/bin/time -v -o "$OUT/make-test-avx2.time.txt" make test > "$OUT/make-test-avx2.txt" 2>&1
status=$?
{
  echo
  echo "\`make test\` under \`$AVX2_ENV\`: exit $status, wall $(wall "$OUT/make-test-avx2.time.txt") s"
  echo "($(tail -n 1 "$OUT/make-test-avx2.txt"))"
} >> "$OUT/summary.md"
cat "$OUT/summary.md"
