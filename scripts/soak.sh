#!/usr/bin/env bash
# Soak test (not part of CI): runs the producer's load test against the worker for
# SOAK_MINUTES while sampling the worker's resident memory and open file descriptors,
# and fails if either keeps growing after the warm-up (the trend: the last quarter of the
# samples against the first; short spikes such as a snapshot compaction are reported).
#
#   scripts/soak.sh                       # 10 minutes on data/data.json
#   SOAK_MINUTES=60 scripts/soak.sh       # longer
#   SOAK_DATA=/data/many-phones.json SOAK_PHONE_BASE=79000000000 SOAK_PHONE_MAX=10000000 \
#       CACHE_MAX_ENTRIES=100000 scripts/soak.sh   # a phone book: almost every phone a miss
#
# Needs RabbitMQ on 127.0.0.1:5672 and the data (data/data.json by default:
# cargo run --release --bin datagen). The worker's other settings come from the
# environment (CACHE_MAX_ENTRIES, PREFETCH, ...).
# Samples go to target/soak/samples.csv (seconds, rss_kib, anon_kib, fds, answered):
# RSS includes the mapped data.json pages; RssAnon is the heap, where a leak would show.
set -euo pipefail
cd "$(dirname "$0")/.."

MINUTES=${SOAK_MINUTES:-10}
SAMPLE_SECS=${SAMPLE_SECS:-5}
WARMUP_SECS=${WARMUP_SECS:-60}
RSS_GROWTH_KIB=${RSS_GROWTH_KIB:-65536}   # allowed RssAnon growth after warm-up
FD_GROWTH=${FD_GROWTH:-8}
export TASK_QUEUE=soak_tasks REPORT_QUEUE=soak_reports DEAD_LETTER_QUEUE=soak_dlq
OUT=target/soak
mkdir -p "$OUT"

DATA=${SOAK_DATA:-data/data.json}
PHONE_MAX=${SOAK_PHONE_MAX:-250}
PHONE_BASE=${SOAK_PHONE_BASE:-0}

cargo build --release --bins
[ -f "$DATA" ] || ./target/release/datagen --out "$DATA"
rm -f "$OUT"/cache.snapshot*

DATA_PATH="$DATA" SNAPSHOT_PATH="$OUT/cache.snapshot" HTTP_ADDR=127.0.0.1:9393 RUST_LOG=warn \
    ./target/release/report-service > "$OUT/worker.log" 2>&1 &
WORKER=$!
trap 'kill $WORKER 2>/dev/null || true; kill $LOAD 2>/dev/null || true' EXIT
until curl -sf http://127.0.0.1:9393/health > /dev/null; do sleep 0.2; done

# Load: back-to-back runs of 20,000 tasks at concurrency 64 over PHONE_MAX phones from
# PHONE_BASE (by default 250: the reference's 200 and 50 unknown), until the deadline.
# Each run must pass (every task answered, no errors).
(
    end=$(( $(date +%s) + MINUTES * 60 ))
    run=0
    while [ "$(date +%s)" -lt "$end" ]; do
        run=$((run + 1))
        ./target/release/producer load --tasks 20000 --concurrency 64 --phone-max "$PHONE_MAX" \
            --phone-base "$PHONE_BASE" --seed "$run" --json \
            >> "$OUT/load.jsonl" 2>/dev/null || { echo "load run $run failed" >&2; exit 1; }
    done
) &
LOAD=$!

rm -f "$OUT/load.jsonl"
echo "seconds,rss_kib,anon_kib,fds,answered,cache_entries" > "$OUT/samples.csv"
start=$(date +%s)
while kill -0 $LOAD 2>/dev/null; do
    now=$(( $(date +%s) - start ))
    rss=$(awk '/VmRSS/ {print $2}' /proc/$WORKER/status)
    anon=$(awk '/RssAnon/ {print $2}' /proc/$WORKER/status)
    fds=$(ls /proc/$WORKER/fd | wc -l)
    metrics=$(curl -s http://127.0.0.1:9393/metrics)
    answered=$(awk '/^report_service_tasks_total\{outcome="answered"\}/ {print $2}' <<< "$metrics")
    cached=$(awk '/^report_service_cache_entries / {print $2}' <<< "$metrics")
    echo "$now,$rss,$anon,$fds,${answered:-0},${cached:-0}" >> "$OUT/samples.csv"
    sleep "$SAMPLE_SECS"
done
wait $LOAD

python3 - "$OUT/samples.csv" "$WARMUP_SECS" "$RSS_GROWTH_KIB" "$FD_GROWTH" <<'PY'
import csv, statistics, sys
rows = [r for r in csv.DictReader(open(sys.argv[1]))]
warm = [r for r in rows if int(r["seconds"]) >= int(sys.argv[2])] or rows
quarter = max(1, len(warm) // 4)
anon = [int(r["anon_kib"]) for r in warm]
# Growth is the trend: the last quarter's median against the first quarter's. Short
# spikes (a snapshot compaction) are reported, not counted.
early, late = statistics.median(anon[:quarter]), statistics.median(anon[-quarter:])
rss_growth = late - early
fd_growth = max(int(r["fds"]) for r in warm) - int(warm[0]["fds"])
last = warm[-1]
print(f"{len(rows)} samples over {rows[-1]['seconds']} s; answered {last['answered']} tasks")
print(f"RssAnon after warm-up: first-quarter median {early:.0f} KiB, last-quarter median {late:.0f} KiB ({rss_growth:+.0f} KiB); highest sample {max(anon)} KiB")
print(f"RSS (with mapped data.json pages) after warm-up {warm[0]['rss_kib']} KiB, end {last['rss_kib']} KiB")
print(f"fds after warm-up {warm[0]['fds']}, max {max(int(r['fds']) for r in warm)} (+{fd_growth})")
print(f"cache entries after warm-up {warm[0]['cache_entries']}, end {last['cache_entries']}")
if rss_growth > int(sys.argv[3]) or fd_growth > int(sys.argv[4]):
    sys.exit("FAIL: resource growth beyond the allowance")
print("PASS")
PY
