#!/usr/bin/env bash
# Instructions Leash's process executes per gateway request, counted by valgrind's callgrind:
# repeatable on the shared machines where wall time is not (two runs of one build agree within
# 0.1 %; the difference per request, within about 1 %), so it compares two builds' user-space
# cost without a load run's noise. The kernel's share (system calls) is not counted, and
# SHA-256 runs without SHA-NI under valgrind.
#
# Usage: crates/leash-cli/benches/callgrind_gateway.sh [LEASH_BINARY]   (default: target/release/leash)
#
# It runs `gateway_load`'s profile mode (every check on, a fresh proof per request, open loop)
# twice under callgrind, at 30 and at 60 requests/s for 20 s, counting from the first timed
# request to the last, and prints the difference per extra request: what is left when
# everything that does not grow with the load (timers, the log's upkeep) cancels out. At these
# rates every use commits alone, on its caller's thread. Needs valgrind, nginx and wrk
# (apt-get install valgrind nginx-light wrk).
set -euo pipefail

cd "$(dirname "$0")/../../.."
binary=$(realpath "${1:-target/release/leash}")
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

# The bench starts `leash` through this wrapper, which runs it under callgrind (in the
# background, so that the bench's kill of the wrapper leaves valgrind to be stopped cleanly).
cat > "$work/leash" <<EOF
#!/usr/bin/env bash
valgrind --tool=callgrind --callgrind-out-file="$work/out.%p" "$binary" "\$@" 2>>"$work/valgrind.log" &
echo "\$! \$*" >> "$work/pids"
wait \$!
EOF
chmod +x "$work/leash"

count() {
  local rate=$1 log="$work/bench-$1.log"
  rm -f "$work/pids" "$work"/out.*
  GATEWAY_LOAD_PROFILE_RATE=$rate LEASH_BENCH_BIN="$work/leash" \
    cargo bench -q -p leash-cli --bench gateway_load > "$log" 2>&1 &
  local bench=$!
  until grep -q "leash pid" "$log"; do sleep 0.1; done
  local pid
  pid=$(grep " serve " "$work/pids" | tail -1 | cut -d' ' -f1)
  callgrind_control -z "$pid" > /dev/null 2>&1
  until grep -q "p50" "$log"; do sleep 0.1; done
  callgrind_control -d "$pid" > /dev/null 2>&1
  kill "$pid"
  wait "$bench" || true
  grep -h "^summary:" "$work"/out."$pid".* | head -1 | awk '{print $2}'
}

low=$(count 30)
high=$(count 60)
echo "$binary: $low instructions at 30 requests/s, $high at 60 (20 s each)"
echo "per request: $(( (high - low) / 600 ))"
