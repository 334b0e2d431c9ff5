#!/usr/bin/env bash
# Builds the service container and runs it end to end on this machine (README: Deployment):
#   bento -> image (packages from a local wheelhouse, served on 127.0.0.1 only) -> container on the
#   host network bound to 127.0.0.1 (CPU fallback unless GPUS is set) -> register a tenant, classify,
#   upload a local prompt (from a short `promptfolio train` run), classify -> restart the container
#   -> the tenant and its prompt are still there (the store lives on the mounted /data volume).
# Prints the image size and every step's time. Not part of .ci/run (it builds a multi-GB image).
# Run as root (it chowns the volume folder to the image's user, uid 1034). Needs the project's
# environment (`bentoml`, `promptfolio`, `pip` on PATH), Docker with BuildKit, and the base image
# (built here by scripts/build-base-image.sh when missing: mmdebstrap).
# If no Docker daemon answers and this runs as root, it starts dockerd (DOCKERD_ARGS) and stops it
# at the end. Settings (environment):
#   DOCKER      docker client with BuildKit (a client >= 23 needs the buildx plugin)   [docker]
#   IMAGE       image tag to build and run                                             [promptfolio:gpu]
#   PORT        service port on 127.0.0.1                                               [3791]
#   WHEELHOUSE  wheel cache filled by `pip download`                                   [.cache/wheelhouse]
#   WHEEL_PORT  127.0.0.1 port that serves the wheelhouse during the build             [8765]
#   GPUS        e.g. "all" to pass `--gpus all` (needs the NVIDIA container toolkit)   [unset: CPU]
#   KEEP_IMAGE  1 keeps the image afterwards                                           [1]
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
cd "$ROOT"
DOCKER="${DOCKER:-docker}"
IMAGE="${IMAGE:-promptfolio:gpu}"
BASE_IMAGE="promptfolio-base:bookworm-py311"
PORT="${PORT:-3791}"
WHEELHOUSE="${WHEELHOUSE:-$ROOT/.cache/wheelhouse}"
KEEP_IMAGE="${KEEP_IMAGE:-1}"
DOCKERD_ARGS="${DOCKERD_ARGS:---storage-driver vfs --iptables=false --ip6tables=false --bridge=none}"
WORK="$ROOT/.cache/container-check"
NAME="promptfolio-check-$$"
URL="http://127.0.0.1:$PORT"
export BENTOML_HOME="${BENTOML_HOME:-$ROOT/.cache/bentoml}" BENTOML_DO_NOT_TRACK=true
export PROMPTFOLIO_ADMIN_KEY="check-admin-$RANDOM$RANDOM"
SERVER_PIDS=()
mkdir -p "$WORK"

say() { printf '== %s\n' "$*"; }
fail() { printf 'container-check: %s\n' "$*" >&2; exit 1; }
now() { date +%s.%N; }
since() { python3 -c "import sys; print(f'{float(sys.argv[2]) - float(sys.argv[1]):.1f} s')" "$1" "$(now)"; }

cleanup() {
  "$DOCKER" rm -f "$NAME" >/dev/null 2>&1 || true
  for pid in "${SERVER_PIDS[@]}"; do kill "$pid" 2>/dev/null || true; wait "$pid" 2>/dev/null || true; done
  if [ -n "${DOCKERD_PID:-}" ]; then
    say "stopping the dockerd this script started (pid $DOCKERD_PID)"
    kill "$DOCKERD_PID"; wait "$DOCKERD_PID" 2>/dev/null || true
  fi
}
trap cleanup EXIT

# --- Docker daemon and BuildKit ---------------------------------------------------------------
if ! "$DOCKER" info >/dev/null 2>&1; then
  [ "$(id -u)" = 0 ] && command -v dockerd >/dev/null || fail "no Docker daemon answers, and none can be started here"
  mkdir -p "$WORK"
  say "starting dockerd $DOCKERD_ARGS (log: $WORK/dockerd.log)"
  # shellcheck disable=SC2086  # DOCKERD_ARGS is a list of flags
  dockerd $DOCKERD_ARGS > "$WORK/dockerd.log" 2>&1 &
  DOCKERD_PID=$!
  for _ in $(seq 60); do "$DOCKER" info >/dev/null 2>&1 && break; sleep 1; done
  "$DOCKER" info >/dev/null 2>&1 || fail "dockerd did not start: see $WORK/dockerd.log"
fi
client_major=$("$DOCKER" version --format '{{.Client.Version}}' | cut -d. -f1)
if [ "$client_major" -ge 23 ] && ! "$DOCKER" buildx version >/dev/null 2>&1; then
  fail "$DOCKER $("$DOCKER" version --format '{{.Client.Version}}') has no buildx plugin, so no BuildKit; install buildx or point DOCKER at a client with built-in BuildKit (e.g. Debian's docker.io: DOCKER=/usr/bin/docker)"
fi
# bentoml containerize runs the first `docker` on PATH: make it this one
mkdir -p "$WORK/bin"; ln -sf "$(command -v "$DOCKER")" "$WORK/bin/docker"; export PATH="$WORK/bin:$PATH"

if ! docker image inspect "$BASE_IMAGE" >/dev/null 2>&1; then
  say "base image $BASE_IMAGE (Debian bookworm + Python 3.11, from Debian packages)"
  t=$(now); scripts/build-base-image.sh "$BASE_IMAGE"; echo "base image: $(since "$t")"
fi

# --- bento and image ----------------------------------------------------------------------------
say "bentoml build"
t=$(now)
TAG=$(bentoml build --output tag | sed -n 's/^__tag__://p')
BENTO=$(bentoml get "$TAG" -o path)
echo "bento $TAG: $(since "$t")"

say "wheelhouse $WHEELHOUSE (pip download of the bento's requirements; offline wherever pip's index is)"
t=$(now)
pip download --quiet --disable-pip-version-check -d "$WHEELHOUSE" -r "$BENTO/env/python/requirements.txt" \
  > "$WORK/pip-download.log" 2>&1 || { tail -20 "$WORK/pip-download.log"; fail "pip download failed"; }
echo "wheelhouse: $(ls "$WHEELHOUSE" | wc -l) wheels, $(du -sh "$WHEELHOUSE" | cut -f1), $(since "$t")"
# a fixed port: the URL is a build arg of the install step, so a new one would void its build cache
WHEEL_PORT="${WHEEL_PORT:-8765}"
python3 -m http.server --bind 127.0.0.1 --directory "$WHEELHOUSE" "$WHEEL_PORT" >/dev/null 2>&1 &
SERVER_PIDS+=($!)
for _ in $(seq 50); do curl -sf "http://127.0.0.1:$WHEEL_PORT/" >/dev/null && break; sleep 0.1; done
curl -sf "http://127.0.0.1:$WHEEL_PORT/" >/dev/null || fail "the wheelhouse server did not start on 127.0.0.1:$WHEEL_PORT"

say "bentoml containerize $TAG -t $IMAGE (build network: host, packages from 127.0.0.1:$WHEEL_PORT only)"
t=$(now)
# From the temp folder: bentoml containerize copies the bento there and (BentoML issue #5566, 1.4.36+)
# refuses a dockerfile_template outside the working directory.
(cd "$(python3 -c 'import tempfile; print(tempfile.gettempdir())')" && \
 bentoml containerize "$TAG" -t "$IMAGE" --opt network=host --opt progress=plain \
  --opt build-arg=PIP_NO_INDEX=1 --opt build-arg=PIP_FIND_LINKS="http://127.0.0.1:$WHEEL_PORT/" \
  > "$WORK/containerize.log" 2>&1) || { tail -40 "$WORK/containerize.log"; fail "containerize failed (log: $WORK/containerize.log)"; }
echo "image build: $(since "$t")"
kill "${SERVER_PIDS[0]}"; SERVER_PIDS=()
SIZE=$(docker image inspect -f '{{.Size}}' "$IMAGE")
echo "image $IMAGE: $(python3 -c "print(f'{$SIZE / 2**30:.2f} GiB')") ($SIZE bytes)"
docker image inspect -f 'user={{.Config.User}} healthcheck={{json .Config.Healthcheck.Test}}' "$IMAGE"

# --- a local prompt and test images (a short federated run on the embedded encoder) --------------
say "local prompt: promptfolio train (2 clients, 1 round) on the host"
t=$(now)
rm -rf "$WORK/train" "$WORK/images"
promptfolio train --clients 2 --rounds 1 --local-epochs 1 --images-per-class 4 --out "$WORK/train" > "$WORK/train.log" 2>&1 \
  || { tail -20 "$WORK/train.log"; fail "train failed"; }
LOCAL_PROMPT=$(ls "$WORK"/train/clients/client-0/local-promptfolio*.safetensors | head -1)
# the global prompt that local prompt was trained with: the service pins the pair, so it is published first
GLOBAL_PROMPT="$WORK/train/$(basename "$LOCAL_PROMPT" | sed 's/^local-/global-/')"
python3 scripts/demo_images.py export "$WORK/train" 0 "$WORK/images" 8
echo "train: $(since "$t")"

# --- run ------------------------------------------------------------------------------------------
# The image's user is bentoml (uid 1034): the mounted /data must be writable by it.
DATA="$WORK/data"
rm -rf "$DATA"; install -d -o 1034 -g 1034 -m 0755 "$DATA"
GPU_ARGS=(); [ -n "${GPUS:-}" ] && GPU_ARGS=(--gpus "$GPUS")
start_container() {
  docker run -d --name "$NAME" --network host "${GPU_ARGS[@]}" -v "$DATA:/data" \
    -e BENTOML_HOST=127.0.0.1 -e BENTOML_PORT="$PORT" -e PROMPTFOLIO_ADMIN_KEY "$IMAGE" >/dev/null
}
wait_ready() {
  local t; t=$(now)
  for _ in $(seq 600); do
    curl -sf "$URL/readyz" >/dev/null && { echo "ready after $(since "$t")"; return 0; }
    [ "$(docker inspect -f '{{.State.Running}}' "$NAME")" = true ] || break
    sleep 0.5
  done
  docker logs --tail 40 "$NAME"; fail "the service did not become ready"
}
# api STEP_NAME EXPECTED_STATUS curl-args...: prints status and time; the body goes to $WORK/last.json
api() {
  local step=$1 want=$2; shift 2
  local out; out=$(curl -s -o "$WORK/last.json" -w '%{http_code} %{time_total}' "$@")
  printf '%-34s HTTP %s  %6.3f s\n' "$step" "${out% *}" "${out#* }"
  [ "${out% *}" = "$want" ] || { cat "$WORK/last.json"; echo; fail "$step: expected HTTP $want"; }
}
field() { python3 -c "import json, sys; d = json.load(open(sys.argv[1])); print(eval(sys.argv[2], {}, {'d': d}))" "$WORK/last.json" "$1"; }

say "docker run $IMAGE (network host, 127.0.0.1:$PORT, /data <- $DATA)"
t=$(now); start_container; echo "container created and started: $(since "$t") (vfs copies the image for each new container)"
wait_ready
# inside the running container (each `docker run` would copy the whole image on the vfs driver)
echo "compilers/git in the image: [$(docker exec "$NAME" sh -c \
  'for c in gcc cc c++ g++ make git; do command -v $c; done; true' | tr '\n' ' ')]"
echo "onnxruntime packages: $(docker exec "$NAME" pip list 2>/dev/null | awk 'tolower($1) ~ /^onnxruntime/ {printf "%s %s ", $1, $2}')"
echo "container user: $(docker exec "$NAME" id)"
# onnxruntime-gpu (built for CUDA 13) preloads cuBLAS/cuDNN/cudart from the nvidia-* wheels torch brings:
# no CUDA base image. Loading the libraries needs no GPU; running a CUDA session needs the host driver.
docker exec "$NAME" python -c '
import onnxruntime as ort
ort.preload_dlls()
libs = sorted({p.split("site-packages/")[1] for p in open("/proc/self/maps").read().split() if "site-packages/nvidia/" in p})
print(f"onnxruntime-gpu {ort.__version__} (CUDA {ort.capi.build_and_package_info.cuda_version}) preloaded {len(libs)} libraries from the torch wheels:", " ".join(libs))
'
api "GET /v1/info" 200 "$URL/v1/info"
echo "  device=$(field "d['device']") backend=$(field "d['backend']") providers=$(field "d['providers']")"
api "publish the global prompt (admin)" 201 -X POST "$URL/v1/global/prompt" \
  -H "Authorization: Bearer $PROMPTFOLIO_ADMIN_KEY" -F "file=@$GLOBAL_PROMPT"
CLASSES=$(python3 -c "import json; print(json.dumps(sorted(set(json.load(open('$WORK/images/labels.json')).values()))))")
api "POST /v1/tenants (admin)" 201 -X POST "$URL/v1/tenants" -H "Authorization: Bearer $PROMPTFOLIO_ADMIN_KEY" \
  -H 'Content-Type: application/json' -d "{\"tenant\": \"acme\", \"classes\": $CLASSES}"
KEY=$(field "d['api_key']")
IMAGES=(); for f in "$WORK"/images/*.png; do IMAGES+=(-F "images=@$f"); done
api "classify 8 images (global prompt)" 200 "$URL/v1/tenants/acme/classify" -H "Authorization: Bearer $KEY" "${IMAGES[@]}"
echo "  local_version=$(field "d['local_version']") theta=$(field "d['theta']") top-1 of the first: $(field "d['predictions'][0]['top'][0]['label']")"
api "upload local prompt" 201 "$URL/v1/tenants/acme/prompt" -H "Authorization: Bearer $KEY" -F "file=@$LOCAL_PROMPT"
api "classify 8 images (with local)" 200 "$URL/v1/tenants/acme/classify" -H "Authorization: Bearer $KEY" "${IMAGES[@]}"
echo "  local_version=$(field "d['local_version']") theta=$(field "d['theta']") pinned=$(field "d['pinned']") trained_together=$(field "d['trained_together']")"
BEFORE=$(field "[p['top'][0]['label'] for p in d['predictions']]")
for _ in $(seq 90); do [ "$(docker inspect -f '{{.State.Health.Status}}' "$NAME")" = healthy ] && break; sleep 1; done
echo "health: $(docker inspect -f '{{.State.Health.Status}}' "$NAME")"

say "docker restart (the store must survive on the volume)"
t=$(now); docker restart "$NAME" >/dev/null; wait_ready
api "GET /v1/tenants/acme" 200 "$URL/v1/tenants/acme" -H "Authorization: Bearer $KEY"
api "classify 8 images (after restart)" 200 "$URL/v1/tenants/acme/classify" -H "Authorization: Bearer $KEY" "${IMAGES[@]}"
[ "$(field "d['local_version']")" = 1 ] || fail "the local prompt did not survive the restart"
AFTER=$(field "[p['top'][0]['label'] for p in d['predictions']]")
[ "$BEFORE" = "$AFTER" ] || fail "predictions changed across the restart: $BEFORE vs $AFTER"
echo "store survived: tenant acme, local prompt v1, same top-1 labels for all 8 images"
echo "on the volume: $(cd "$DATA" && find . -maxdepth 2 -mindepth 1 | sort | tr '\n' ' ')"
echo "owner of the files the container wrote: $(stat -c '%u:%g' "$DATA/store")"
docker rm -f "$NAME" >/dev/null
[ "$KEEP_IMAGE" = 1 ] || docker rmi "$IMAGE" >/dev/null
say "container check passed"
