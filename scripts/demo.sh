#!/usr/bin/env bash
# `make demo`: a local broker, the topics, one worker and a synthetic producer; shows
# recommendations arriving and where the metrics are. Leaves the broker running.
set -euo pipefail
cd "$(dirname "$0")/.."
SK=.venv/bin/stream-knn
DEMO_DIR=${DEMO_DIR:-var/demo}
WEB_PORT=${STREAM_KNN_WEB_PORT:-6066}
EVENTS=${DEMO_EVENTS:-3000}
RATE=${DEMO_RATE:-300}
mkdir -p "$DEMO_DIR"

echo "== 1/5 broker (Apache Kafka from Maven Central, KRaft, single node)"
BOOTSTRAP=$($SK broker start)
export STREAM_KNN_BOOTSTRAP_SERVERS=$BOOTSTRAP
echo "broker at $BOOTSTRAP"

echo "== 2/5 topics"
$SK topics apply

echo "== 3/5 worker (logs: $DEMO_DIR/worker.log)"
STREAM_KNN_DATA_DIR="$DEMO_DIR/state" STREAM_KNN_WEB_PORT=$WEB_PORT \
  STREAM_KNN_REBUILD_INTERVAL=${STREAM_KNN_REBUILD_INTERVAL:-5} \
  $SK worker >"$DEMO_DIR/worker.log" 2>&1 &
WORKER=$!
trap 'kill $WORKER 2>/dev/null; wait $WORKER 2>/dev/null || true' EXIT
for _ in $(seq 1 120); do
  if curl -fsS "http://127.0.0.1:$WEB_PORT/ready" >/dev/null 2>&1; then break; fi
  if ! kill -0 $WORKER 2>/dev/null; then echo "worker exited; see $DEMO_DIR/worker.log"; tail -20 "$DEMO_DIR/worker.log"; exit 1; fi
  sleep 1
done
curl -fsS "http://127.0.0.1:$WEB_PORT/ready"; echo

echo "== 4/5 synthetic producer: $EVENTS events at $RATE/s (clustered items, users with tastes)"
$SK produce --synthetic --rate "$RATE" --limit "$EVENTS"

echo "== 5/5 recommendations arriving (last 5 of topic 'recommendations')"
$SK tail recommendations --from-beginning --limit "$EVENTS" --timeout 10 | tail -n 5

echo
echo "Index:    curl http://127.0.0.1:$WEB_PORT/index"
curl -fsS "http://127.0.0.1:$WEB_PORT/index"; echo
echo "Ask:      curl 'http://127.0.0.1:$WEB_PORT/recommendations/u1?k=5'"
curl -fsS "http://127.0.0.1:$WEB_PORT/recommendations/u1?k=5"; echo
echo "Metrics:  http://127.0.0.1:$WEB_PORT/metrics  (Prometheus text format), for example:"
curl -fsS "http://127.0.0.1:$WEB_PORT/metrics" | grep -E '^stream_knn_(events_total|recommendations_total|index_version|index_items) ' | head -8
echo
echo "The broker keeps running: 'stream-knn broker status', 'stream-knn broker stop'."
