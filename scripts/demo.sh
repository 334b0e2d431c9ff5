#!/usr/bin/env bash
# The main job end to end on the embedded default, on this machine only (127.0.0.1):
#   1. federated PromptFolio training on Flower (5 clients with different image styles)
#   2. the global prompt is published to a prompts store
#   3. the service starts; a client's organisation is registered as a tenant
#   4. the client uploads its private local prompt over REST, exactly as a federated client would
#   5. images are classified for that tenant, before and after the upload
source "$(dirname "$0")/env.sh"
RUN="${PROMPTFOLIO_DEMO_DIR:-$ROOT/runs/demo}"
PORT="${PROMPTFOLIO_DEMO_PORT:-3781}"
rm -rf "$RUN"; mkdir -p "$RUN"
export PROMPTFOLIO_ADMIN_KEY="demo-admin-$RANDOM$RANDOM"

echo "== 1. federated training (Flower simulation, private network namespace)"
promptfolio train --clients 5 --rounds 6 --methods promptfolio-auto --shift own --beta 0.5 \
  --out "$RUN/train" --publish-store "$RUN/store"

echo "== 2. start the service on 127.0.0.1:$PORT"
promptfolio serve --store "$RUN/store" --port "$PORT" > "$RUN/serve.log" 2>&1 &
SERVER=$!
trap 'kill $SERVER 2>/dev/null; wait $SERVER 2>/dev/null' EXIT
for _ in $(seq 1 120); do curl -sf "http://127.0.0.1:$PORT/readyz" >/dev/null && break; sleep 0.5; done
curl -sf "http://127.0.0.1:$PORT/readyz" >/dev/null || { echo "service did not start"; tail -20 "$RUN/serve.log"; exit 1; }

echo "== 3. register client-1's organisation as tenant 'clinic-1' (admin, with the Python client)"
export PROMPTFOLIO_URL="http://127.0.0.1:$PORT"
PROMPTFOLIO_KEY=$(python -c "
from promptfolio import Client
from promptfolio.embedded.world import CLASS_NAMES
print(Client('$PROMPTFOLIO_URL').register('clinic-1', CLASS_NAMES).api_key)")
export PROMPTFOLIO_KEY  # the tenant's key, for classify and upload (kept off the command line)

echo "== 4. classify client-1's test images (up to 60, in its own style) with the global prompt only"
python scripts/demo_images.py export "$RUN/train" 1 "$RUN/images" 60
classify() {
  promptfolio classify "$RUN/images" --top-k 1 --json | python scripts/demo_images.py score "$RUN/images"
}
classify

echo "== 5. client-1 uploads its local prompt over REST (key from PROMPTFOLIO_KEY); the next request uses it"
promptfolio upload --tenant clinic-1 --file "$RUN/train/clients/client-1/local-promptfolio-auto.safetensors"
classify
echo "done: outputs in $RUN (metrics.json, plots, store, serve.log)"
