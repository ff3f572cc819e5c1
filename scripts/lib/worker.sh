# Shared by the measurement scripts (restart-time, cold-burst, echo-anchor,
# segment-freshness, retry-cost): the release binaries, a worker's queues, its health.
# Source it; it defines functions only.

# The repository's release binaries, or a message saying how to build them.
REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
BIN="$REPO/target/release"
require_release_bins() { # NAME...
    local name
    for name in "$@"; do
        [ -x "$BIN/$name" ] || { echo "build first: cargo build --release --bins" >&2; exit 1; }
    done
}

# Deletes a worker's task queue and every queue it declares beside it (reports, the DLQ,
# the retry queues of the default delays).
delete_service_queues() { # TASK_QUEUE
    local suffix
    for suffix in "" .reports .dlq .retry.1000ms .retry.2000ms .retry.4000ms .retry.8000ms; do
        rabbitmqctl -q delete_queue "$1$suffix" >/dev/null 2>&1 || true
    done
}

# Waits until the worker PID answers /health on PORT with 200; if it exits first, prints
# its LOG and fails.
wait_healthy() { # PID PORT LOG
    until curl -sf "http://127.0.0.1:$2/health" >/dev/null 2>&1; do
        kill -0 "$1" 2>/dev/null || { cat "$3" >&2; echo "the service exited" >&2; exit 1; }
        sleep 0.002
    done
}
