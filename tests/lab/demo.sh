#!/bin/bash
# demo.sh - the "main job" end to end: start the lab, boot servers on host1
# (alternating projects admin and demo), show where they are, show the
# drainer's plan (--dry-run), drain host1 with the drainer, show where they
# are afterwards, end the maintenance with `drainer -enable`. The lab keeps
# running afterwards (tests/lab/down.sh stops it).
#
# env: DEMO_SERVERS (4), DEMO_HOST (host1), DEMO_FLAVOR (m1.small),
#      DEMO_SKIP_UP=1 (lab already running), DEMO_KEEP=1 (keep the servers
#      and leave the host disabled), OSLAB_RUN and the up.sh knobs.
set -euo pipefail
HERE=$(cd "$(dirname "$0")" && pwd)
# hold the lab lock (shared with tests/support/openstack.rs) for the whole run
[ "${LAB_LOCK_HELD:-}" = 1 ] || exec /usr/bin/python3 "$HERE/lib/lablock.py" bash "$0" "$@"
ROOT=$(cd "$HERE/../.." && pwd)
RUN=${OSLAB_RUN:-$HERE/run}
N=${DEMO_SERVERS:-4}
HOST=${DEMO_HOST:-host1}
FLAVOR=${DEMO_FLAVOR:-m1.small}
PY=/usr/bin/python3
T0=$EPOCHREALTIME
step() { awk -v a="$T0" -v b="$EPOCHREALTIME" -v m="$*" 'BEGIN{printf "\n[%6.1fs] == %s\n", b-a, m}'; }

if [ "${DEMO_SKIP_UP:-}" != 1 ]; then
  step "(a) lab: $HERE/up.sh"
  bash "$HERE/up.sh"
fi
source "$RUN/openrc"
export OS_PASSWORD

step "clean slate: delete old demo-* servers, enable every nova-compute service"
"$PY" "$HERE/lib/demo.py" cleanup demo-
"$PY" "$HERE/lib/demo.py" enable-all

step "(b) boot $N x $FLAVOR servers on $HOST (projects admin + demo)"
"$PY" "$HERE/lib/demo.py" boot "$N" "$HOST" "$FLAVOR"

step "(c) before the drain"
"$PY" "$HERE/lib/demo.py" where demo-

"$PY" "$HERE/lib/demo.py" config "$RUN/drainer.yaml"
sed 's/^Password:.*/Password: ***/; s/^/    /' "$RUN/drainer.yaml"

step "build drainer (cargo build --release; the first build takes several minutes)"
BUILD_LOG=$RUN/log/demo-build.log
(cd "$ROOT" && cargo build --release --locked --bin drainer) >"$BUILD_LOG" 2>&1 \
  || { tail -30 "$BUILD_LOG"; echo "ERROR: cargo build failed (whole log: $BUILD_LOG)" >&2; exit 2; }
DRAINER=$ROOT/target/release/drainer
echo "  $("$DRAINER" --version): $DRAINER"

step "(d) the plan: drainer -config-path $RUN/drainer.yaml --node $HOST --dry-run"
"$DRAINER" -config-path "$RUN/drainer.yaml" --node "$HOST" --dry-run

step "(e) evacuate: drainer -config-path $RUN/drainer.yaml --node $HOST"
rc=0
"$DRAINER" -config-path "$RUN/drainer.yaml" --node "$HOST" || rc=$?
echo "  drainer exit code: $rc"

step "(f) after the drain"
"$PY" "$HERE/lib/demo.py" where demo-

if [ "${DEMO_KEEP:-}" != 1 ]; then
  step "(g) maintenance over: drainer -config-path $RUN/drainer.yaml --node $HOST -enable"
  "$DRAINER" -config-path "$RUN/drainer.yaml" --node "$HOST" -enable
  step "cleanup: delete the demo servers (DEMO_KEEP=1 keeps them and $HOST disabled)"
  "$PY" "$HERE/lib/demo.py" cleanup demo-
fi
echo
echo "The lab keeps running for the test suite: $(wc -l <"$RUN/pids") processes started by"
echo "tests/lab/up.sh (logs in $RUN/log). Stop them all with: bash tests/lab/down.sh"
exit $rc
