#!/usr/bin/python3
"""Helpers for demo.sh (stdlib only, via osapi.py).

  demo.py boot N HOST [FLAVOR]   boot N servers "demo-<i>" on HOST, alternating
                                 projects admin/demo; wait until ACTIVE
  demo.py where [PREFIX]         table of servers (all projects) named PREFIX*
  demo.py config PATH            write the drainer config (Go-tool keys)
  demo.py cleanup [PREFIX]       delete servers named PREFIX* (default demo-)
  demo.py enable-all             enable every nova-compute service
"""
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import osapi  # noqa: E402

osapi.VERBOSE = False
MV = {"OpenStack-API-Version": "compute 2.93"}


def session(project="admin"):
    osapi.PROJECT = project
    tok, t = osapi.get_token()
    return tok, osapi.endpoint(t["catalog"], "compute"), osapi.endpoint(t["catalog"], "image")


def nova(tok, base, method, path, body=None):
    return osapi.request(method, base + path, body, token=tok, headers=MV)[0]


def list_all(tok, base, query):
    """all pages of /servers/detail (nova's [api] max_limit is small here)"""
    out, url = [], base + "/servers/detail?" + query
    while url:
        page = osapi.request("GET", url, token=tok, headers=MV)[0]
        out += page["servers"]
        url = next((l["href"] for l in page.get("servers_links", []) if l["rel"] == "next"), None)
    return out


def boot(n, host, flavor_name="m1.small"):
    sess = {p: session(p) for p in ("admin", "demo")}
    tok, nv, gl = sess["admin"]
    flavor = next(f for f in osapi.list_all(nv + "/flavors?is_public=None", "flavors", token=tok, headers=MV)
                  if f["name"] == flavor_name)
    image = osapi.request("GET", gl + "/v2/images?name=tiny", token=tok)[0]["images"][0]
    ids = []
    for i in range(n):
        project = ("admin", "demo")[i % 2]
        ptok, pnv, _ = sess[project]
        srv = nova(ptok, pnv, "POST", "/servers", {"server": {
            "name": "demo-%d" % i, "imageRef": image["id"], "flavorRef": flavor["id"],
            "networks": "none", "availability_zone": "nova:" + host}})["server"]
        ids.append(srv["id"])
        print("  booting demo-%d (%s) in project %s on %s" % (i, srv["id"], project, host))
    deadline = time.time() + 180
    while time.time() < deadline:
        ss = [nova(tok, nv, "GET", "/servers/" + s)["server"] for s in ids]
        bad = [s for s in ss if s["status"] == "ERROR"]
        if bad:
            sys.exit("server ERROR: %s" % [(s["name"], s.get("fault")) for s in bad])
        if all(s["status"] == "ACTIVE" for s in ss):
            print("  %d servers ACTIVE" % n)
            return
        time.sleep(0.5)
    sys.exit("timeout waiting for ACTIVE")


def where(prefix="demo-"):
    tok, nv, _ = session("admin")
    projects = {p["id"]: p["name"] for p in osapi.request(
        "GET", osapi.KEYSTONE + "/projects", token=tok)[0]["projects"]}
    ss = [s for s in list_all(tok, nv, "all_tenants=1") if s["name"].startswith(prefix)]
    print("  %-10s %-36s %-7s %-8s %-10s %s" % ("NAME", "ID", "PROJECT", "STATUS", "TASK", "HOST"))
    for s in sorted(ss, key=lambda s: s["name"]):
        print("  %-10s %-36s %-7s %-8s %-10s %s" % (
            s["name"], s["id"], projects.get(s["tenant_id"], s["tenant_id"]), s["status"],
            s["OS-EXT-STS:task_state"] or "-", s["OS-EXT-SRV-ATTR:host"]))
    svcs = nova(tok, nv, "GET", "/os-services?binary=nova-compute")["services"]
    print("  services: " + ", ".join("%s=%s%s" % (
        s["host"], s["status"], "(%s)" % s["disabled_reason"] if s["disabled_reason"] else "")
        for s in sorted(svcs, key=lambda s: s["host"])))


def config(path):
    with open(path, "w") as f:
        f.write("IdentityEndpoint: %s\n" % osapi.KEYSTONE)
        f.write("Username: %s\n" % osapi.USER)
        f.write("Password: %s\n" % osapi.PASSWORD)
        f.write("TenantName: admin\n")
        f.write("DomainID: default\n")
    print("  wrote " + path)


def cleanup(prefix="demo-"):
    tok, nv, _ = session("admin")
    ss = [s for s in list_all(tok, nv, "all_tenants=1") if s["name"].startswith(prefix)]
    for s in ss:
        if s["status"] == "ERROR" or s["OS-EXT-STS:task_state"]:
            nova(tok, nv, "POST", "/servers/%s/action" % s["id"],
                 {"os-resetState": {"state": "active"}})
        nova(tok, nv, "DELETE", "/servers/" + s["id"])
    osapi.wait_for("servers deleted", lambda: not [
        s for s in list_all(tok, nv, "all_tenants=1") if s["name"].startswith(prefix)],
        timeout=120, interval=0.5)
    print("  deleted %d servers" % len(ss))


def enable_all():
    tok, nv, _ = session("admin")
    for s in nova(tok, nv, "GET", "/os-services?binary=nova-compute")["services"]:
        if s["status"] != "enabled":
            nova(tok, nv, "PUT", "/os-services/" + s["id"], {"status": "enabled"})
            print("  enabled nova-compute on " + s["host"])


if __name__ == "__main__":
    if len(sys.argv) < 2:
        sys.exit(__doc__)
    cmd, args = sys.argv[1], sys.argv[2:]
    if cmd == "boot":
        boot(int(args[0]), args[1], *args[2:3])
    elif cmd == "where":
        where(*args[:1])
    elif cmd == "config":
        config(args[0])
    elif cmd == "enable-all":
        enable_all()
    elif cmd == "cleanup":
        cleanup(*args[:1])
    else:
        sys.exit(__doc__)
