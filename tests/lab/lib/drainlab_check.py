#!/usr/bin/python3
"""Self-check of the DrainLabDriver behaviour against the running lab
(stdlib only).  Prints what nova shows while migrations run.

  drainlab_check.py [timing|stall|fail|cold|paging|all]   (default all)

Uses servers named "dlcheck-*" (deleted at the end) on host1/host2; expects
host1 and host2 enabled and the default knobs (base 1 s, 2 s per GiB).
"""
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import osapi  # noqa: E402

osapi.VERBOSE = False
H = {"OpenStack-API-Version": "compute 2.93"}
TOK, T = osapi.get_token()
NOVA = osapi.endpoint(T["catalog"], "compute")
GLANCE = osapi.endpoint(T["catalog"], "image")
FAILED = []


def nova(method, path, body=None):
    return osapi.request(method, NOVA + path, body, token=TOK, headers=H)[0]


def check(cond, msg):
    print("  %s: %s" % ("ok" if cond else "FAILED", msg), flush=True)
    if not cond:
        FAILED.append(msg)


def server(sid):
    return nova("GET", "/servers/" + sid)["server"]


def boot(name, flavor="m1.small", host="host1", metadata=None):
    fl = next(f for f in osapi.list_all(NOVA + "/flavors", "flavors", token=TOK, headers=H) if f["name"] == flavor)
    img = osapi.request("GET", GLANCE + "/v2/images?name=tiny", token=TOK)[0]["images"][0]
    sid = nova("POST", "/servers", {"server": {
        "name": name, "imageRef": img["id"], "flavorRef": fl["id"], "networks": "none",
        "availability_zone": "nova:" + host, "metadata": metadata or {}}})["server"]["id"]
    def active():
        s = server(sid)
        if s["status"] == "ERROR":
            raise SystemExit("%s went ERROR: %s" % (name, s.get("fault")))
        return s["status"] == "ACTIVE"
    osapi.wait_for(name + " ACTIVE", active, timeout=120, interval=0.3)
    return sid


def live_migrate(sid, host):
    nova("POST", "/servers/%s/action" % sid,
         {"os-migrateLive": {"host": host, "block_migration": "auto"}})


def watch(sid, until, timeout=60, on_sample=None):
    """poll server + /servers/{id}/migrations every 0.1 s until until(server);
    returns (elapsed, transitions, samples)"""
    t0 = time.time()
    trans, samples, last = [], [], None
    while time.time() - t0 < timeout:
        s = server(sid)
        migs = nova("GET", "/servers/%s/migrations" % sid)["migrations"]
        m = migs[0] if migs else None
        key = (s["status"], s["OS-EXT-STS:task_state"], s["OS-EXT-SRV-ATTR:host"],
               m and m["status"])
        if key != last:
            trans.append((round(time.time() - t0, 1),) + key)
            last = key
        if m:
            samples.append((round(time.time() - t0, 1), m["status"], m["memory_total_bytes"],
                            m["memory_processed_bytes"], m["memory_remaining_bytes"]))
            if on_sample and on_sample(m, samples):
                on_sample = None
        if until(s) and m is None:  # and no in-progress migration left
            return time.time() - t0, trans, samples
        time.sleep(0.1)
    raise SystemExit("timeout; transitions %s" % trans)


def os_migrations(sid):
    return osapi.list_all(NOVA + "/os-migrations?instance_uuid=%s&migration_type=live-migration" % sid, "migrations",
                          token=TOK, headers=H)


def show(trans, samples):
    print("  transitions (t, status, task_state, host, migration status):")
    for t in trans:
        print("    %s" % (t,))
    if samples:
        step = max(1, len(samples) // 8)
        print("  GET /servers/{id}/migrations samples (t, status, total, processed, remaining):")
        for x in samples[::step] + samples[-1:]:
            print("    %s" % (x,))


def done_on(host):
    return lambda s: (s["status"] in ("ACTIVE", "ERROR") and s["OS-EXT-STS:task_state"] is None
                      and (host is None or s["OS-EXT-SRV-ATTR:host"] == host))


def t_timing():
    print("\n== timing: m1.small (512 MB) live migration host1 -> host2 -> host1")
    sid = boot("dlcheck-timing")
    live_migrate(sid, "host2")
    el, trans, samples = watch(sid, done_on("host2"))
    show(trans, samples)
    t_run = next(t[0] for t in trans if t[4] == "running")
    check(1.5 <= el - t_run <= 3.5,
          "host1->host2: 'running' for %.1fs (expected ~2 s = 1 + 2*0.5), %.1fs in total" % (el - t_run, el))
    check(any(x[3] and x[4] and 0 < x[4] < x[2] for x in samples), "progress visible (0 < remaining < total)")
    live_migrate(sid, "host1")
    el, trans, samples = watch(sid, done_on("host1"))
    check(server(sid)["OS-EXT-SRV-ATTR:host"] == "host1",
          "second migration host2->host1 works (%.1fs): VM known on dest after first" % el)
    m = os_migrations(sid)
    print("  /os-migrations: %s" % [(x["id"], x["status"], x["source_compute"], x["dest_compute"]) for x in m])
    check([x["status"] for x in m] == ["completed", "completed"], "both completed")
    print("  full /os-migrations entry: %s" % m[0])


def t_stall():
    print("\n== stall: drainlab:stall=true, abort, then force-complete")
    sid = boot("dlcheck-stall", metadata={"drainlab:stall": "true"})
    live_migrate(sid, "host2")
    state = {}

    def sample(m, samples):
        run = [x for x in samples if x[1] == "running" and x[4]]
        if len(run) >= 2 and run[-1][0] - run[0][0] >= 3.0:
            state["mid"] = m["id"]
            state["remaining"] = sorted({x[4] for x in run})
            t = time.time()
            osapi.request("DELETE", NOVA + "/servers/%s/migrations/%s" % (sid, m["id"]),
                          token=TOK, headers=H)
            state["abort_http_s"] = time.time() - t
            return True
    el, trans, samples = watch(sid, lambda s: "mid" in state and done_on(None)(s), on_sample=sample)
    show(trans, samples)
    check(state.get("remaining") and len(state["remaining"]) == 1,
          "memory_remaining constant while stalled: %s" % state.get("remaining"))
    s = server(sid)
    m = os_migrations(sid)
    print("  /os-migrations after abort: %s" % [(x["id"], x["status"]) for x in m])
    check(m[0]["status"] == "cancelled", "aborted migration status %r" % m[0]["status"])
    check(s["status"] == "ACTIVE" and s["OS-EXT-SRV-ATTR:host"] == "host1",
          "after abort: %s on %s" % (s["status"], s["OS-EXT-SRV-ATTR:host"]))

    live_migrate(sid, "host2")
    state.clear()

    def sample2(m, samples):
        if m["status"] == "running" and samples[-1][0] >= 2.0:
            state["mid"] = m["id"]
            t = time.time()
            nova("POST", "/servers/%s/migrations/%s/action" % (sid, m["id"]),
                 {"force_complete": None})
            state["t"] = t
            return True
    el, trans, samples = watch(sid, lambda s: "mid" in state and done_on("host2")(s),
                               on_sample=sample2)
    show(trans, samples)
    m = os_migrations(sid)
    print("  /os-migrations after force-complete: %s" % [(x["id"], x["status"]) for x in m])
    check(m[0]["status"] == "completed" and server(sid)["OS-EXT-SRV-ATTR:host"] == "host2",
          "force-completed on host2 %.1fs after the call" % (time.time() - state["t"]))


def t_fail():
    print("\n== fail: drainlab:fail=true")
    sid = boot("dlcheck-fail", metadata={"drainlab:fail": "true"})
    live_migrate(sid, "host2")
    el, trans, samples = watch(sid, lambda s: trans_seen(sid) and done_on(None)(s))
    show(trans, samples)
    s = server(sid)
    m = os_migrations(sid)
    print("  /os-migrations: %s" % [(x["id"], x["status"]) for x in m])
    check(m[0]["status"] in ("failed", "error"), "failed migration status %r" % m[0]["status"])
    check(s["status"] == "ACTIVE" and s["OS-EXT-SRV-ATTR:host"] == "host1" and
          s["OS-EXT-STS:task_state"] is None,
          "after failure: %s on %s task_state %s" % (s["status"], s["OS-EXT-SRV-ATTR:host"],
                                                     s["OS-EXT-STS:task_state"]))
    print("  server fault: %s" % s.get("fault"))
    acts = nova("GET", "/servers/%s/os-instance-actions" % sid)["instanceActions"]
    print("  instance actions: %s" % [(a["action"], a["message"]) for a in acts])


def trans_seen(sid):
    return [m for m in os_migrations(sid) if m["status"] not in ("accepted", "queued", "preparing", "running")]


def t_cold():
    print("\n== cold migration (migrate + confirmResize) host1 -> host2, then live back")
    sid = boot("dlcheck-cold", flavor="m1.tiny")
    nova("POST", "/servers/%s/action" % sid, {"migrate": {"host": "host2"}})
    el, trans, _ = watch(sid, lambda s: s["status"] in ("VERIFY_RESIZE", "ERROR"))
    show(trans, [])
    nova("POST", "/servers/%s/action" % sid, {"confirmResize": None})
    el, trans, _ = watch(sid, done_on("host2"))
    check(server(sid)["status"] == "ACTIVE", "cold-migrated + confirmed: ACTIVE on host2")
    live_migrate(sid, "host1")
    watch(sid, done_on(None))
    check(server(sid)["OS-EXT-SRV-ATTR:host"] == "host1", "live migration after cold migration")


def t_paging():
    print("\n== paging ([api] max_limit)")
    have = osapi.list_all(NOVA + "/servers?all_tenants=1", "servers", token=TOK, headers=H)
    for i in range(max(0, 6 - len(have))):
        boot("dlcheck-page-%d" % i, flavor="m1.tiny")
    page = nova("GET", "/servers?all_tenants=1")
    links = page.get("servers_links", [])
    print("  first page: %d servers, servers_links=%s" % (len(page["servers"]), links))
    check(len(page["servers"]) < 6 and any(l["rel"] == "next" for l in links),
          "a partial first page (max_limit) + rel=next link")


def cleanup():
    url, ss = NOVA + "/servers?all_tenants=1", []
    while url:
        p = osapi.request("GET", url, token=TOK, headers=H)[0]
        ss += p["servers"]
        url = next((l["href"] for l in p.get("servers_links", []) if l["rel"] == "next"), None)
    mine = [s["id"] for s in ss if s["name"].startswith("dlcheck-")]
    for sid in mine:
        nova("DELETE", "/servers/" + sid)
    osapi.wait_for("dlcheck servers deleted", lambda: all(
        osapi.request("GET", NOVA + "/servers?all_tenants=1&name=^dlcheck-", token=TOK,
                      headers=H)[0]["servers"] == [] for _ in [0]), timeout=60, interval=0.5)


if __name__ == "__main__":
    what = sys.argv[1] if len(sys.argv) > 1 else "all"
    tests = {"timing": t_timing, "stall": t_stall, "fail": t_fail, "cold": t_cold,
             "paging": t_paging}
    import lablock
    with lablock.held():  # tests/support/openstack.rs tests reset the lab
        for svc in nova("GET", "/os-services?binary=nova-compute")["services"]:
            if svc["host"] in ("host1", "host2") and svc["status"] != "enabled":
                nova("PUT", "/os-services/" + svc["id"], {"status": "enabled"})
                print("enabled nova-compute on %s (was disabled: %s)" % (svc["host"], svc["disabled_reason"]))
        try:
            for name, fn in tests.items():
                if what in (name, "all"):
                    fn()
        finally:
            cleanup()
    if FAILED:
        sys.exit("FAILED: %s" % FAILED)
    print("\nall checks ok")
