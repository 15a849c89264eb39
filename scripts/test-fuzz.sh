#!/usr/bin/env bash
# Coverage-guided fuzzing (libFuzzer) of every parser of outside input: fuzz/fuzz_targets/*.rs.
# Built with the stable toolchain: the sanitizer-coverage instrumentation libFuzzer needs is
# plain `-C passes` / `-C llvm-args`, and libfuzzer-sys compiles libFuzzer itself with the
# system's C++ compiler (installed here when missing). No nightly, no cargo-fuzz.
#
# Each target runs FUZZ_SECONDS (default 30) in one process, one after the other (one core),
# from its committed seeds (fuzz/seeds/<target>, which include every crash found so far) plus
# the local corpus fuzz/corpus/<target> that earlier runs grew. Any crash, panic, timeout or
# out-of-memory fails the run; the input is saved under fuzz/artifacts/<target>/ and replayed
# once so the panic message shows. Prints one line per target: inputs tried, corpus size.
# A cold build takes ~3 CPU-minutes (docs/fuzzing.md); the default run, 5 targets × 30 s.
#
#   scripts/test-fuzz.sh                                   the short run (scripts/test)
#   FUZZ_SECONDS=300 nice -n 19 scripts/test-fuzz.sh       a long run (docs/fuzzing.md)
#   FUZZ_TARGETS="token_request retry_after" scripts/test-fuzz.sh
#   scripts/test-fuzz.sh replay fuzz/artifacts/token_request/crash-…   run one input
set -euo pipefail
cd "$(dirname "$0")/.."

SECONDS_PER_TARGET="${FUZZ_SECONDS:-30}"
ALL_TARGETS="token_request retry_after token_claims admission_review inject_manifest"
TARGETS="${FUZZ_TARGETS:-$ALL_TARGETS}"
HOST="$(rustc -vV | sed -n 's/^host: //p')"
BIN="fuzz/target/$HOST/release"

log() { echo "test-fuzz: $*"; }

# libfuzzer-sys builds libFuzzer's C++ sources.
if ! command -v c++ >/dev/null; then
  log "no C++ compiler: installing g++"
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq g++ >/dev/null
fi

build() {
  # What `cargo fuzz build -s none` passes, all stable flags, given by fuzz/rustc-wrapper.sh to
  # the crates under test only. `--target` keeps build scripts and proc macros (host
  # artifacts) apart from the instrumented build.
  local flags=(
    --cfg fuzzing
    -Cpasses=sancov-module
    -Cllvm-args=-sanitizer-coverage-level=4
    -Cllvm-args=-sanitizer-coverage-inline-8bit-counters
    -Cllvm-args=-sanitizer-coverage-pc-table
    -Cllvm-args=-sanitizer-coverage-trace-compares
  )
  local start=$SECONDS
  FUZZ_INSTRUMENT_FLAGS="${flags[*]}" RUSTC_WRAPPER="$PWD/fuzz/rustc-wrapper.sh" \
    CARGO_INCREMENTAL=0 cargo build --manifest-path fuzz/Cargo.toml --locked --release \
    --target "$HOST" --bins "$@"
  log "built in $((SECONDS - start))s"
}

# libFuzzer flags shared by every run: one process, 10 s per input at most, 2 GiB of memory.
common=(-timeout=10 -rss_limit_mb=2048 -max_len=65536 -print_final_stats=1)

replay() {
  local input="$1" target
  target="$(basename "$(dirname "$input")")"
  "$BIN/$target" "${common[@]}" "$input"
}

if [[ "${1:-}" == replay ]]; then
  build
  replay "$2"
  exit
fi

build
failed=()
total_execs=0
for target in $TARGETS; do
  corpus="fuzz/corpus/$target" artifacts="fuzz/artifacts/$target"
  mkdir -p "$corpus" "$artifacts"
  extra=()
  # inject prints each object's outcome to stderr, as the CLI does: keep libFuzzer's output
  # readable (a crash is replayed below with stderr open).
  [[ "$target" == inject_manifest ]] && extra+=(-close_fd_mask=2)
  out="$(mktemp)"
  if "$BIN/$target" "${common[@]}" "${extra[@]}" -max_total_time="$SECONDS_PER_TARGET" \
    -artifact_prefix="$artifacts/" "$corpus" "fuzz/seeds/$target" >"$out" 2>&1; then
    status=ok
  else
    status=FAILED
    failed+=("$target")
  fi
  execs="$(sed -n 's/^stat::number_of_executed_units: *//p' "$out" | tail -n1)"
  total_execs=$((total_execs + ${execs:-0}))
  log "$target: $status, ${execs:-?} inputs tried, corpus $(find "$corpus" -type f | wc -l) files"
  if [[ "$status" == FAILED ]]; then
    tail -n 40 "$out"
    crash="$(sed -n 's/.*Test unit written to \(.*\)$/\1/p' "$out" | tail -n1)"
    if [[ -n "$crash" ]]; then
      log "$target: replaying $crash"
      replay "$crash" 2>&1 | grep -v -e '^INFO' -e '^WARNING: Failed to find function' | head -n 40 || true
    fi
  fi
  rm -f "$out"
done
log "$total_execs inputs in all"
if ((${#failed[@]})); then
  log "failed: ${failed[*]}"
  exit 1
fi
