#!/usr/bin/env bash
# Soak: mixed traffic with injected faults against a real idem and a fault-injecting backend,
# both on loopback ports chosen at run time. Bounded: IDEM_SOAK_SECS (default 180) seconds
# of traffic, then a quiesce check. Not part of CI (the test is #[ignore]).
#
#   scripts/soak.sh                      # 3 minutes, 24 clients, debug build
#   IDEM_SOAK_SECS=60 scripts/soak.sh    # shorter
#   IDEM_SOAK_CLIENTS=48 scripts/soak.sh # more concurrency
#   IDEM_SOAK_RELEASE=1 scripts/soak.sh  # optimised build (longer first compile)
#
# Prints: requests sent, keys made, backend executions vs idem's upstream calls (must be
# equal), keys whose first execution was stored and that ran again (must be 0), outcome
# counts, store figures, RSS samples (must plateau), in-flight and waiters at the end
# (must be 0). Exits non-zero when a check fails.
set -euo pipefail
cd "$(dirname "$0")/.."
profile=()
if [ "${IDEM_SOAK_RELEASE:-0}" = "1" ]; then
  profile=(--release)
fi
export IDEM_SOAK_SECS="${IDEM_SOAK_SECS:-180}"
exec cargo test "${profile[@]}" --test it reliability::soak_mixed_traffic_with_faults \
  -- --ignored --nocapture --test-threads=1
