#!/usr/bin/env bash
# RUSTC_WRAPPER of the fuzz build (scripts/test-fuzz.sh): adds libFuzzer's coverage
# instrumentation to this project's crates and to the parsers the targets drive, and compiles
# the rest of the dependency tree (TLS, HTTP client, Kubernetes types, runtime) as usual.
# `cargo fuzz` instruments everything; here coverage feedback comes only from the code under
# test, so a new corpus entry means a new path through a parser, not through tokio's
# internals. (Build time is the same either way: docs/fuzzing.md.)
rustc="$1"
shift
name=""
prev=""
for arg in "$@"; do
  [[ "$prev" == --crate-name ]] && name="$arg"
  prev="$arg"
done
case "$name" in
  # This project (the library and every target) and the parsers of outside input it calls.
  imds_broker | imds_broker_fuzz | token_request | retry_after | token_claims | \
    admission_review | inject_manifest | \
    serde_json | serde_yaml_ng | unsafe_libyaml | form_urlencoded | percent_encoding | \
    httparse | httpdate | http | jsonwebtoken | base64 | json_patch | jsonptr)
    # shellcheck disable=SC2086 # the flags are words
    exec "$rustc" "$@" $FUZZ_INSTRUMENT_FLAGS
    ;;
  *) exec "$rustc" "$@" ;;
esac
