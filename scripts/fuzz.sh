#!/usr/bin/env bash
# Runs every cargo-fuzz target in fuzz/ for SECONDS each (default 60), one after another,
# prints one result line per target and exits non-zero if any target crashed.
#
#   scripts/fuzz.sh SECONDS [TARGET...]
#
# Environment: FUZZ_JOBS=N runs N targets at a time (default 1); FUZZ_NICE (default 10) is
# the niceness; FUZZ_MAX_LEN (default 4096) is libFuzzer's -max_len. The dictionaries
# fuzz/http.dict and fuzz/snapshot.dict seed the mutator with the formats' keywords.
# The seed corpus fuzz/corpus/<target> is only read; what the fuzzer finds goes to
# fuzz/generated/<target> (git-ignored), crashes to fuzz/artifacts/<target>, and the full
# libFuzzer output to fuzz/generated/<target>.log. On the stable toolchain the fuzz build
# needs nightly flags (-Zsanitizer), which RUSTC_BOOTSTRAP=1 allows.
set -euo pipefail
cd "$(dirname "$0")/.."

seconds=${1:-60}
shift || true
case $seconds in '' | *[!0-9]*) echo "usage: $0 SECONDS [TARGET...]" >&2; exit 2 ;; esac
jobs=${FUZZ_JOBS:-1}
niceness=${FUZZ_NICE:-10}
max_len=${FUZZ_MAX_LEN:-4096}
export RUSTC_BOOTSTRAP=1

if ! cargo fuzz --version >/dev/null 2>&1; then
  echo "installing cargo-fuzz"
  cargo install cargo-fuzz --locked
fi

targets=("$@")
if [ ${#targets[@]} -eq 0 ]; then
  mapfile -t targets < <(cd fuzz && cargo fuzz list)
fi

triple=$(rustc -vV | sed -n 's/^host: //p')
bin_dir=fuzz/target/$triple/release
echo "building ${#targets[@]} fuzz targets"
(cd fuzz && nice -n "$niceness" cargo fuzz build -O)
for target in "${targets[@]}"; do
  [ -x "fuzz/target/$triple/release/$target" ] || { echo "no fuzz target $target" >&2; exit 2; }
done

run_one() {
  local target=$1 log=fuzz/generated/$1.log dict=fuzz/http.dict status
  [ "$target" = snapshot ] && dict=fuzz/snapshot.dict
  mkdir -p "fuzz/generated/$target" "fuzz/artifacts/$target" "fuzz/corpus/$target"
  # The binary built above runs directly, so an edit made meanwhile cannot trigger a rebuild
  # inside the timed run. -max_total_time bounds the run; timeout is only a backstop.
  if timeout --kill-after=30 $((seconds + 120)) nice -n "$niceness" "$bin_dir/$target" \
    "fuzz/generated/$target" "fuzz/corpus/$target" \
    -artifact_prefix="fuzz/artifacts/$target/" -max_total_time="$seconds" \
    -max_len="$max_len" -dict="$dict" -timeout=10 -rss_limit_mb=2048 \
    -print_final_stats=1 >"$log" 2>&1; then
    status=ok
  elif grep -q 'Test unit written to' "$log"; then
    status=CRASH
  else
    status=ERROR # killed by the backstop, or libFuzzer could not start
  fi
  local execs cov
  execs=$(grep -o 'stat::number_of_executed_units: *[0-9]*' "$log" | grep -o '[0-9]*$' || true)
  cov=$(grep -o 'cov: [0-9]*' "$log" | tail -1 | grep -o '[0-9]*' || true)
  printf '%-14s %-5s execs=%-11s cov=%-6s corpus=%s log=%s\n' "$target" "$status" \
    "${execs:-?}" "${cov:-?}" "$(ls "fuzz/generated/$target" | wc -l)" "$log"
  if [ "$status" != ok ]; then
    grep -m 5 -E 'panicked|ERROR: libFuzzer|SUMMARY|Test unit written' "$log" | sed 's/^/    /'
    tail -n 3 "$log" | sed 's/^/    /'
    return 1
  fi
}

failed=0
running=0
for target in "${targets[@]}"; do
  run_one "$target" &
  running=$((running + 1))
  if [ "$running" -ge "$jobs" ]; then
    wait -n || failed=1
    running=$((running - 1))
  fi
done
while [ "$running" -gt 0 ]; do
  wait -n || failed=1
  running=$((running - 1))
done

if [ "$failed" -ne 0 ]; then
  echo "fuzzing found a crash: see the logs and fuzz/artifacts/" >&2
  exit 1
fi
echo "all targets ran ${seconds}s without a crash"
