#!/bin/bash
# demo.sh - the "main job" end to end: start the lab, boot servers on host1
# (alternating projects admin and demo), show where they are, drain host1 with
# the drainer, show where they are afterwards.
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

step "(d) drainer -config-path $RUN/drainer.yaml --node $HOST"
"$PY" "$HERE/lib/demo.py" config "$RUN/drainer.yaml"
cat "$RUN/drainer.yaml" | sed 's/^Password:.*/Password: ***/; s/^/    /'
rc=0
(cd "$ROOT" && cargo run --release --bin drainer -- -config-path "$RUN/drainer.yaml" --node "$HOST") || rc=$?
echo "  drainer exit code: $rc"

step "(e) after the drain"
"$PY" "$HERE/lib/demo.py" where demo-

if [ "${DEMO_KEEP:-}" != 1 ]; then
  step "cleanup (DEMO_KEEP=1 keeps the servers and $HOST disabled)"
  "$PY" "$HERE/lib/demo.py" cleanup demo-
  "$PY" "$HERE/lib/demo.py" enable-all
fi
exit $rc
