#!/usr/bin/env bash
# Builds every fuzz target on stable Rust and runs each one briefly (for CI).
# Exits non-zero if a build fails or a target finds a crash, a failed
# assertion, a timeout or an out-of-memory input.
#
#   fuzz/smoke.sh              # every target, 45 s each
#   fuzz/smoke.sh 60 nick      # 60 s, only `nick`
#
# Each run starts from fuzz/seeds/<target> and keeps what it finds in
# fuzz/corpus/<target> (git-ignored). A failing input is saved in
# fuzz/artifacts/<target>/ and its path is printed; reproduce it with
#   cargo fuzz run -s none <target> fuzz/artifacts/<target>/<file>
# See fuzz/README.md.
set -euo pipefail

cd "$(dirname "$0")"
seconds="${1:-45}"
shift || true
if [ "$#" -gt 0 ]; then
  targets=("$@")
else
  mapfile -t targets < <(cargo fuzz list)
fi

# `-s none`: no sanitizer. AddressSanitizer needs `-Zsanitizer`, which stable
# rustc refuses; the coverage instrumentation libFuzzer needs is stable.
if [ "${#targets[@]}" -eq 1 ]; then
  cargo fuzz build -s none "${targets[0]}"
else
  cargo fuzz build -s none
fi

dict_for() {
  case "$1" in
    client_frame) echo "-dict=dicts/json.dict" ;;
    config_parse) echo "-dict=dicts/toml.dict" ;;
    ws_reader) echo "-dict=dicts/ws.dict" ;;
  esac
}

failed=()
for target in "${targets[@]}"; do
  echo "=== $target: ${seconds}s"
  mkdir -p "corpus/$target"
  # shellcheck disable=SC2046 # the dict option is one word or none
  if ! cargo fuzz run -s none "$target" "corpus/$target" "seeds/$target" -- \
      -max_total_time="$seconds" -timeout=10 -rss_limit_mb=2048 -print_final_stats=1 $(dict_for "$target"); then
    failed+=("$target")
  fi
done

if [ "${#failed[@]}" -gt 0 ]; then
  echo "fuzz smoke FAILED: ${failed[*]} (inputs in fuzz/artifacts/)" >&2
  exit 1
fi
echo "fuzz smoke passed: ${targets[*]}"
