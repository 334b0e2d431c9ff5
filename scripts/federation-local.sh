#!/usr/bin/env bash
# A real federation on this host, as sites run it (Flower's deployment engine, all on 127.0.0.1):
#   - a SuperLink with TLS (certificates from scripts/make-certs.sh) and node authentication
#     (--enable-supernode-auth: only SuperNodes whose public key was registered may connect),
#   - two registered SuperNodes (site-a, site-b), each with its own images, name and folder,
#   - one unregistered SuperNode, which must be refused,
#   - a 3-round run of the embedded world with `flwr run` and the dropout options: site-b is killed as
#     round 2 starts, the round goes on with site-a within the round timeout, and site-b, restarted,
#     must resume its local prompt from its own disk and train again (round 3, else a resumed round 4).
# Every process it starts is stopped when it ends (also on error or Ctrl-C). Logs and outputs stay
# in WORKDIR (default: a new folder under /tmp).
#
#   scripts/federation-local.sh [WORKDIR]        environment: PF_FED_PORT (SuperLink port, default 19393;
#                                                 SuperNodes use the next three), PF_FED_ROUND_TIMEOUT
#                                                 (the run's round-timeout in seconds, default 120)
set -euo pipefail

cd "$(dirname "$0")/.."
repo="$(pwd)"
work="${1:-$(mktemp -d /tmp/pf-federation-XXXXXX)}"
mkdir -p "$work"
work="$(cd "$work" && pwd)"
port="${PF_FED_PORT:-19393}"
python="${PYTHON:-python}"
export FLWR_HOME="$work/flwr-home"  # the flwr CLI's connection settings: this run's own, not ~/.flwr
export FLWR_TELEMETRY_ENABLED=0 FLWR_DISABLE_UPDATE_CHECK=1 FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION=1
export PROMPTFOLIO_CACHE="${PROMPTFOLIO_CACHE:-$work/cache}" MPLCONFIGDIR="${MPLCONFIGDIR:-$work/cache/matplotlib}"

started=()  # process-group ids of everything started here
t0=$(date +%s)
say() { printf '[%4ss] %s\n' "$(( $(date +%s) - t0 ))" "$*"; }
fail() { say "FAILED: $*"; exit 1; }
stop_group() {  # a process group: TERM, then KILL what is left after 5 s
    local pg="$1" i
    kill -TERM -- "-$pg" 2>/dev/null || return 0
    for i in $(seq 50); do kill -0 -- "-$pg" 2>/dev/null || return 0; sleep 0.1; done
    kill -KILL -- "-$pg" 2>/dev/null || true
}
cleanup() {
    local pg
    for pg in "${started[@]}"; do stop_group "$pg"; done
    say "stopped every process this script started (${#started[@]} process groups); logs in $work"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

start() {  # start NAME CMD...: in its own session (so its children stop with it); log in $work/NAME.log
    local name="$1"; shift
    setsid "$@" > "$work/$name.log" 2>&1 &
    started+=("$!")
    eval "pid_${name//-/_}=$!"
}
wait_for_line() {  # wait_for_line FILE PATTERN SECONDS
    local i
    for i in $(seq $(( $3 * 5 ))); do grep -q -- "$2" "$1" 2>/dev/null && return 0; sleep 0.2; done
    return 1
}
for p in "$port" $((port + 1)) $((port + 2)) $((port + 3)); do
    if "$python" -c "import socket,sys; s=socket.socket(); sys.exit(s.connect_ex(('127.0.0.1', $p)) != 0)"; then
        fail "port $p on 127.0.0.1 is in use (set PF_FED_PORT to a free range of four ports)"
    fi
done

say "work folder $work"
# 1. TLS material (a local CA and a server certificate for 127.0.0.1) and one key pair per site
scripts/make-certs.sh "$work/certs" >/dev/null
mkdir -p "$work/keys"
for site in site-a site-b intruder; do
    ssh-keygen -q -t ecdsa -b 384 -N "" -C "$site" -f "$work/keys/$site"
done
# 2. each site's own images: the embedded world as an ImageFolder, a different style and seed per site
"$python" - "$work" <<'EOF'
import sys
from pathlib import Path
from promptfolio.embedded import world
from promptfolio.embedded.export import export_imagefolder
work = Path(sys.argv[1])
for site, style, seed in (("site-a", "noise", 1), ("site-b", "blur", 2), ("intruder", "clutter", 3)):
    root = export_imagefolder(world.calibrated(style), 4, seed, cache_dir=work / "data" / site)
    (work / "data" / f"{site}.path").write_text(str(root))
EOF
say "certificates, site keys and site images ready"

# 3. the SuperLink: TLS on, only registered SuperNodes, no dependency installation at run time
start superlink flower-superlink --ssl-ca-certfile "$work/certs/ca.crt" --ssl-certfile "$work/certs/server.pem" \
    --ssl-keyfile "$work/certs/server.key" --enable-supernode-auth --disable-runtime-dependency-installation \
    --host 127.0.0.1 --port "$port"
wait_for_line "$work/superlink.log" "Uvicorn running on https://127.0.0.1:$port" 60 || fail "the SuperLink did not start"
mkdir -p "$FLWR_HOME"
cat > "$FLWR_HOME/config.toml" <<EOF
[superlink]
default = "local-tls"

[superlink.local-tls]
address = "127.0.0.1:$port"
root-certificates = "$work/certs/ca.crt"
EOF
say "SuperLink up on https://127.0.0.1:$port (TLS, --enable-supernode-auth)"

# 4. the coordinator registers the two sites' public keys (not the intruder's)
for site in site-a site-b; do
    flwr supernode register "$work/keys/$site.pub" --name "$site" > "$work/register-$site.log" 2>&1 \
        || { cat "$work/register-$site.log"; fail "registering $site"; }
    say "registered $site: $(grep -o 'SuperNode [0-9]* registered' "$work/register-$site.log")"
done

supernode() {  # supernode SITE RUNTIME_PORT: a SuperNode with TLS, its key, its name, images and folder
    start "$1" flower-supernode --root-certificates "$work/certs/ca.crt" --superlink "127.0.0.1:$port" \
        --auth-supernode-private-key "$work/keys/$1" --port "$2" \
        --node-config "site=\"$1\" data-path=\"$(cat "$work/data/$1.path")\" out-dir=\"$work/sites/$1\""
}

# 5. an unregistered SuperNode must be refused
supernode intruder $((port + 3))
refused=no
for i in $(seq 150); do
    if ! kill -0 "$pid_intruder" 2>/dev/null; then refused=yes; break; fi
    sleep 0.2
done
[[ $refused == yes ]] && grep -q "Failed to activate SuperNode" "$work/intruder.log" \
    || fail "the unregistered SuperNode was not refused (see $work/intruder.log)"
say "unregistered SuperNode refused: $(grep -o '\[code: [0-9]*\] [^.]*' "$work/intruder.log" | head -1)"
say "        the SuperLink's side: $(grep -o 'No SuperNode found with the given public key' "$work/superlink.log" | head -1)"

# 6. the two registered sites connect
supernode site-a $((port + 1))
supernode site-b $((port + 2))
for site in site-a site-b; do
    wait_for_line "$work/$site.log" "SuperNode ID:" 60 || fail "$site did not connect (see $work/$site.log)"
done
say "site-a and site-b connected: $(grep -ho 'SuperNode ID: [0-9]*' "$work/site-a.log" "$work/site-b.log" | tr '\n' ' ')"

# 7. a 3-round run with the dropout options (min-train-nodes=1, a short round-timeout): site-b is killed
#    as round 2 starts; round 2 must finish with site-a alone within the timeout; site-b is restarted as
#    soon as the server has given up on it and must resume its local prompt from its own disk in a later
#    round of the same run (or, if Flower does not sample it again in time, in a resumed 4th round)
timeout_s="${PF_FED_ROUND_TIMEOUT:-120}"
run_config="rounds=3 local-epochs=1 num-clients=2 methods=\"promptfolio-auto\" out-dir=\"$work/server\""
run_config+=" min-train-nodes=1 round-timeout=$timeout_s"
start run flwr run . local-tls --stream --run-config "$run_config"
wait_for_line "$work/run.log" "round 2/3: training" 900 || fail "round 2 never started (see $work/run.log)"
stop_group "$pid_site_b"
killed=$(date +%s)
say "round 1 done ($(grep -o 'round 1/3  personal[^$]*' "$work/run.log" | head -1)); killed site-b as round 2 starts" \
    "(min-train-nodes=1, round-timeout=${timeout_s}s)"
wait_for_line "$work/run.log" "round 2 (train): .*failed" $(( timeout_s + 60 )) \
    || fail "the server never gave up on site-b in round 2 (see $work/run.log)"
say "  +$(( $(date +%s) - killed ))s the server gave up on site-b: $(grep -o 'round 2 (train): .*failed: .\{0,90\}' \
    "$work/run.log" | head -1)"
mv "$work/site-b.log" "$work/site-b.before-restart.log"
supernode site-b $((port + 2))
wait_for_line "$work/site-b.log" "SuperNode ID:" 120 || fail "site-b did not reconnect (see $work/site-b.log)"
say "  +$(( $(date +%s) - killed ))s site-b restarted: $(grep -o 'SuperNode ID: [0-9]*' "$work/site-b.log")"
wait_for_line "$work/run.log" "round 2/3  personal" $(( 2 * timeout_s + 60 )) \
    || fail "round 2 did not finish without site-b (see $work/run.log)"
say "  +$(( $(date +%s) - killed ))s round 2 finished: $(grep -o 'round 2/3  personal[^$]*' "$work/run.log" | head -1)"
wait "$pid_run" || true
run_id="$(grep -o 'started run [0-9]*' "$work/run.log" | grep -o '[0-9]*$' || true)"
rounds_done() { "$python" -c "import json,sys; print(len(json.load(open(sys.argv[1]))['rounds']))" "$work/server/metrics.json" 2>/dev/null || echo 0; }
[[ "$(rounds_done)" == 3 ]] || fail "the run did not finish 3 rounds (see $work/run.log)"
say "  +$(( $(date +%s) - killed ))s run $run_id finished: $(grep -o 'round 3/3  personal[^$]*' "$work/run.log" | tail -1)"
trained_in() {  # trained_in ROUND SITE: did SITE's update reach round ROUND's aggregate?
    "$python" -c "import json,sys; r=json.load(open(sys.argv[1]))['rounds'][int(sys.argv[2])-1]
sys.exit(sys.argv[3] not in r['answered'])" "$work/server/metrics.json" "$1" "$2"
}
last_round=3
if ! trained_in 3 site-b; then
    # Flower samples the nodes connected when a round starts: site-b came back too late for round 3
    say "site-b was not sampled again in round 3; a resumed run adds round 4"
    start run2 flwr run . local-tls --stream --run-config "${run_config/rounds=3/rounds=4} resume=true"
    wait "$pid_run2" || true
    cat "$work/run2.log" >> "$work/run.log"
    last_round=4
    [[ "$(rounds_done)" == 4 ]] || fail "the resumed run did not finish round 4 (see $work/run2.log)"
fi
trained_in "$last_round" site-b || fail "site-b did not train again after its restart (see $work/run.log)"

# 8. what happened
grep -ho "site site-b: resumed its local state[^(]*([0-9]* trained)" "$work"/site-b*.log | head -1 | sed 's/^/        /' \
    || fail "site-b did not resume its local state (see $work/site-b.log)"
"$python" - "$work" <<'EOF'
import json, sys
from pathlib import Path
from prompts_store.artifact import read_artifact
work = Path(sys.argv[1])
metrics = json.loads((work / "server" / "metrics.json").read_text())
for record in metrics["rounds"]:
    print(f"        round {record['round']}: sampled {record['sampled']}, answered {', '.join(record['answered'])}"
          f"{' (skipped)' if record['skipped'] else ''}")
for f in metrics["failed_clients"]:
    print(f"        failed: round {f['round']} ({f['stage']}) client {f['client'] or '?'} (node {f['node']}): "
          f"{f['error'][:70]}")
last = metrics["rounds"][-1]
print("        metrics.json rows of the last round:",
      ", ".join(f"{r['site']} personal {r['personal/promptfolio-auto']:.1f}% general "
                f"{r.get('general/promptfolio-auto', 'absent')}" for r in last["eval"]))
for site in ("site-a", "site-b"):
    _, meta = read_artifact((work / "sites" / site / "local-promptfolio-auto.safetensors").read_bytes())
    assert meta.tenant == site, meta.tenant
    progress = json.loads(next((work / "sites" / site / "state").glob("*/progress.json")).read_text())
    print(f"        {site}: local artifact tenant {meta.tenant!r}, θ {meta.theta}, state after round "
          f"{progress['round']} ({progress['trained_rounds']} trained)")
EOF
say "OK: TLS + node authentication, unregistered node refused, round 2 went on without the killed site-b," \
    "which resumed its local prompt and trained again in round $last_round"
