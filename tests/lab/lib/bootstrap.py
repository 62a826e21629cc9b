#!/usr/bin/python3
"""Idempotent post-start setup through the REST APIs.

  bootstrap.py catalog            register compute/placement/image/network
  bootstrap.py wait-computes N [SINCE]  wait for N computes up (heartbeat >= SINCE)
  bootstrap.py resources N        project demo (admin is admin there too),
                                  flavors m1.tiny/small/large, image 'tiny'
                                  (+ wait for N hypervisors)
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import osapi  # noqa: E402

os.environ.setdefault("OSAPI_VERBOSE", "0")
osapi.VERBOSE = os.environ["OSAPI_VERBOSE"] == "1"
KS = osapi.KEYSTONE
SERVICES = [  # name, type, url
    ("nova", "compute", "http://127.0.0.1:8774/v2.1"),
    ("placement", "placement", "http://127.0.0.1:8778"),
    ("glance", "image", "http://127.0.0.1:9292"),
    ("neutron", "network", "http://127.0.0.1:9696"),
]


def catalog():
    tok, _ = osapi.get_token()
    svcs = osapi.request("GET", KS + "/services", token=tok)[0]["services"]
    eps = osapi.request("GET", KS + "/endpoints", token=tok)[0]["endpoints"]
    for name, stype, url in SERVICES:
        svc = next((s for s in svcs if s["type"] == stype), None)
        if svc is None:
            svc = osapi.request("POST", KS + "/services", {"service": {
                "name": name, "type": stype, "enabled": True}}, token=tok)[0]["service"]
        for iface in ("public", "internal", "admin"):
            if not any(e["service_id"] == svc["id"] and e["interface"] == iface
                       for e in eps):
                osapi.request("POST", KS + "/endpoints", {"endpoint": {
                    "service_id": svc["id"], "interface": iface, "url": url,
                    "region_id": "RegionOne", "enabled": True}}, token=tok)
    print("catalog ok")


FLAVORS = [  # name, id, ram MB, vcpus, disk GB
    ("m1.tiny", "1", 64, 1, 1),
    ("m1.small", "2", 512, 1, 1),
    ("m1.large", "4", 4096, 2, 1),
]


def projects(tok):
    """Project 'demo' (domain Default) + role admin for user admin on it."""
    def one(path, key, name):
        items = osapi.request("GET", KS + path, token=tok)[0][key]
        return next((x for x in items if x["name"] == name), None)
    demo = one("/projects?domain_id=default&name=demo", "projects", "demo")
    if demo is None:
        demo = osapi.request("POST", KS + "/projects", {"project": {
            "name": "demo", "domain_id": "default", "enabled": True,
            "description": "second project for drain tests"}}, token=tok)[0]["project"]
    user = one("/users?domain_id=default&name=admin", "users", "admin")
    role = one("/roles?name=admin", "roles", "admin")
    # PUT is idempotent (204 whether or not the assignment existed)
    osapi.request("PUT", KS + "/projects/%s/users/%s/roles/%s" % (
        demo["id"], user["id"], role["id"]), token=tok)
    print("project demo ok")


def _compute(tok, cat):
    return osapi.endpoint(cat, "compute")


def wait_computes(n, since=""):
    """n nova-compute services 'up' whose last heartbeat is >= since (UTC,
    ISO); the first heartbeat is sent after the RPC server is consuming."""
    tok, t = osapi.get_token()
    nova = _compute(tok, t["catalog"])

    def up():
        s = osapi.request("GET", nova + "/os-services?binary=nova-compute",
                          token=tok)[0]["services"]
        return len([x for x in s if x["state"] == "up" and
                    (x["updated_at"] or "") >= since]) >= n
    osapi.wait_for("%d nova-compute services up" % n, up, timeout=180)
    print("computes up")


def resources(n):
    tok, t = osapi.get_token()
    cat = t["catalog"]
    nova, glance = _compute(tok, cat), osapi.endpoint(cat, "image")

    def hyp():
        h = osapi.request("GET", nova + "/os-hypervisors", token=tok)[0]["hypervisors"]
        return len(h) >= n
    osapi.wait_for("%d hypervisors" % n, hyp, timeout=120)

    projects(tok)
    flavors = osapi.list_all(nova + "/flavors?is_public=None", "flavors", token=tok)
    for name, fid, ram, vcpus, disk in FLAVORS:
        if not any(f["name"] == name for f in flavors):
            osapi.request("POST", nova + "/flavors", {"flavor": {
                "name": name, "id": fid, "ram": ram, "vcpus": vcpus, "disk": disk}},
                token=tok)
    imgs = osapi.request("GET", glance + "/v2/images?name=tiny", token=tok)[0]["images"]
    if not any(i["status"] == "active" for i in imgs):
        for i in imgs:  # half-created leftovers
            osapi.request("DELETE", glance + "/v2/images/" + i["id"], token=tok)
        img = osapi.request("POST", glance + "/v2/images", {
            "name": "tiny", "disk_format": "raw", "container_format": "bare",
            "visibility": "public"}, token=tok)[0]
        osapi.request("PUT", glance + "/v2/images/%s/file" % img["id"],
                      raw=b"\0" * 1024, token=tok)
    print("flavors %s + image tiny ok" % "/".join(f[0] for f in FLAVORS))


if __name__ == "__main__":
    cmd = sys.argv[1]
    if cmd == "catalog":
        catalog()
    elif cmd == "wait-computes":
        wait_computes(int(sys.argv[2]), sys.argv[3] if len(sys.argv) > 3 else "")
    elif cmd == "resources":
        resources(int(sys.argv[2]))
    else:
        sys.exit(__doc__)
