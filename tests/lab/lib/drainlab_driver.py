"""DrainLabDriver: nova fake virt driver with realistic-ish live migrations.

Loaded by the lab's nova-compute as ``compute_driver =
drainlab_driver.DrainLabDriver``.  Nova (Zed) imports the driver as
``nova.virt.<compute_driver>``, so up.sh's nova-compute launcher appends
this directory to ``nova.virt.__path__`` (this file becomes
``nova.virt.drainlab_driver``).

Behaviour (subclass of nova.virt.fake.FakeLiveMigrateDriver):

* A live migration takes ``BASE + SECONDS_PER_GIB * flavor_ram_mb / 1024``
  seconds (wall clock, checked every 0.1 s) and writes progress into the migration record like
  the libvirt driver (memory_total/processed/remaining, instance.progress),
  every PROGRESS_INTERVAL seconds, so ``GET /servers/{id}/migrations``
  shows moving numbers.
* metadata ``drainlab:stall=true``: the migration never converges:
  memory_remaining stays at half of memory_total while memory_processed keeps
  growing (dirty pages re-sent).  It only ends by force-complete (completes
  at once) or abort (migration 'cancelled', VM stays ACTIVE on the source),
  or when the VM is deleted.
* metadata ``drainlab:fail=true``: after half the normal duration the
  migration fails on the source like a libvirt job failure:
  recover_method() -> migration 'failed', VM ACTIVE on the source.
* metadata ``drainlab:migration_s=<float>`` overrides the computed duration.
* force-complete / abort state is per instance (the stock fake driver keeps
  driver-wide flags), so parallel migrations on one host are independent.

Knobs (read at the start of every live migration): the file named by env
DRAINLAB_CONF (KEY=VALUE lines, written by up.sh) overrides the environment,
which overrides the defaults:
  DRAINLAB_MIGRATION_BASE_S      1.0
  DRAINLAB_SECONDS_PER_GIB       2.0
  DRAINLAB_PROGRESS_INTERVAL_S   0.5
"""
import os
import time

from oslo_log import log as logging

from nova import exception
from nova import objects
from nova.virt import fake

LOG = logging.getLogger(__name__)

DEFAULTS = {
    "DRAINLAB_MIGRATION_BASE_S": 1.0,
    "DRAINLAB_SECONDS_PER_GIB": 2.0,
    "DRAINLAB_PROGRESS_INTERVAL_S": 0.5,
}
STEP = 0.1
MIB = 1024 * 1024


def _truthy(v):
    return str(v).strip().lower() in ("1", "true", "yes", "on")


def knobs():
    vals = {}
    for k, d in DEFAULTS.items():
        try:
            vals[k] = float(os.environ.get(k, d))
        except ValueError:
            vals[k] = d
    path = os.environ.get("DRAINLAB_CONF")
    if path:
        try:
            with open(path) as f:
                for line in f:
                    line = line.strip()
                    if not line or line.startswith("#") or "=" not in line:
                        continue
                    k, v = (x.strip() for x in line.split("=", 1))
                    if k in DEFAULTS:
                        try:
                            vals[k] = float(v)
                        except ValueError:
                            LOG.warning("drainlab: bad value %s=%r in %s", k, v, path)
        except OSError:
            pass
    return vals


class _MigState(object):
    def __init__(self):
        self.force = False
        self.abort = False


class DrainLabDriver(fake.FakeLiveMigrateDriver):

    def __init__(self, virtapi, read_only=False):
        super(DrainLabDriver, self).__init__(virtapi, read_only)
        self._lm = {}  # instance uuid -> _MigState (live migrations running here)

    # ------------------------------------------------------------ helpers
    @staticmethod
    def _metadata(instance):
        try:
            return dict(instance.metadata or {})
        except Exception:  # lazy-load failure: behave like a normal VM
            LOG.exception("drainlab: cannot read metadata", instance=instance)
            return {}

    @staticmethod
    def _ram_mb(instance):
        try:
            return int(instance.flavor.memory_mb)
        except Exception:
            return int(getattr(instance, "memory_mb", 0) or 0)

    @staticmethod
    def _migration(context, instance, migrate_data):
        if migrate_data is not None and migrate_data.obj_attr_is_set("migration"):
            return migrate_data.migration
        try:
            return objects.Migration.get_by_instance_and_status(
                context, instance.uuid, "running")
        except exception.MigrationNotFoundByStatus:
            return None

    def _save_progress(self, migration, instance, total, processed, remaining):
        if migration is None:
            return
        try:
            migration.memory_total = total
            migration.memory_processed = processed
            migration.memory_remaining = remaining
            migration.disk_total = 0
            migration.disk_processed = 0
            migration.disk_remaining = 0
            migration.save()
            instance.progress = 100 - int(round(remaining * 100.0 / total)) if total else 0
            instance.save()
        except Exception as e:  # progress is cosmetic, never fail the migration
            LOG.warning("drainlab: progress update failed: %s", e, instance=instance)

    def get_host_uptime(self):
        # GET /os-hypervisors/detail (>= 2.88 includes uptime) asks every
        # compute; the stock fake driver raises NotImplementedError there
        with open("/proc/uptime") as f:
            secs = int(float(f.read().split()[0]))
        return " %s up %d days, %d:%02d,  1 user,  load average: 0.00, 0.00, 0.00" % (
            time.strftime("%H:%M:%S"), secs // 86400, secs % 86400 // 3600, secs % 3600 // 60)

    # ------------------------------------------------------------ live migration
    def live_migration(self, context, instance, dest, post_method,
                       recover_method, block_migration=False,
                       migrate_data=None):
        cfg = knobs()
        md = self._metadata(instance)
        stall = _truthy(md.get("drainlab:stall", ""))
        fail = _truthy(md.get("drainlab:fail", ""))
        ram_mb = self._ram_mb(instance)
        duration = (cfg["DRAINLAB_MIGRATION_BASE_S"] +
                    cfg["DRAINLAB_SECONDS_PER_GIB"] * ram_mb / 1024.0)
        if "drainlab:migration_s" in md:
            try:
                duration = float(md["drainlab:migration_s"])
            except ValueError:
                pass
        duration = max(duration, 0.0)
        interval = max(cfg["DRAINLAB_PROGRESS_INTERVAL_S"], STEP)
        total = max(ram_mb, 1) * MIB
        migration = self._migration(context, instance, migrate_data)
        st = self._lm[instance.uuid] = _MigState()
        LOG.info("drainlab: live migration to %s: %d MiB, %.1fs%s%s", dest,
                 ram_mb, duration, " STALL" if stall else "",
                 " FAIL" if fail else "", instance=instance)
        outcome = "completed"
        processed = 0
        try:
            t0 = time.time()
            next_save = t0
            while True:
                if st.abort:
                    outcome = "cancelled"
                    break
                if st.force:
                    break
                if instance.uuid not in self.instances:
                    # deleted (driver.destroy) while migrating
                    outcome = "gone"
                    break
                now = time.time()
                frac = (now - t0) / duration if duration > 0 else 1.0
                if stall:
                    # remaining never shrinks, processed keeps growing
                    remaining = total // 2
                    processed = total // 2 + int(total * frac)
                else:
                    processed = min(total, int(total * frac))
                    remaining = total - processed
                if now >= next_save:
                    self._save_progress(migration, instance, total, processed, remaining)
                    next_save = now + interval
                if fail and frac >= 0.5:
                    outcome = "failed"
                    break
                if not stall and frac >= 1.0:
                    break
                time.sleep(STEP)
        finally:
            self._lm.pop(instance.uuid, None)

        LOG.info("drainlab: live migration to %s ends: %s", dest, outcome,
                 instance=instance)
        if outcome == "cancelled":
            recover_method(context, instance, dest, migrate_data,
                           migration_status="cancelled")
        elif outcome == "failed":
            # what libvirt does on VIR_DOMAIN_JOB_FAILED (status 'failed')
            recover_method(context, instance, dest, migrate_data)
        elif outcome == "gone":
            if migration is not None:
                try:
                    migration.status = "error"
                    migration.save()
                except Exception:
                    pass
        else:
            self._save_progress(migration, instance, total,
                                max(total, processed), 0)
            post_method(context, instance, dest, block_migration, migrate_data)

    def live_migration_force_complete(self, instance):
        st = self._lm.get(instance.uuid)
        if st is None:
            LOG.warning("drainlab: force-complete: no live migration running",
                        instance=instance)
            return
        st.force = True

    def live_migration_abort(self, instance):
        st = self._lm.get(instance.uuid)
        if st is None:
            LOG.warning("drainlab: abort: no live migration running",
                        instance=instance)
            return
        st.abort = True
