"""What the openstack CLI would send to Keystone, for the credentials oracle
test in src/config/oracle.rs.

Run with Debian's /usr/bin/python3 (python3-openstacksdk) in a directory
holding the clouds.yaml/secure.yaml under test, with HOME and the OS_*
variables of the case. Reads its settings the way openstackclient does
(`--os-*` options set from the OS_* variables, over the cloud
entry, through `get_one_cloud_osc`), builds the Keystone v3 plugin keystoneauth would use,
and captures the token request it would POST instead of sending it.
Prints one JSON object: the request body, interface, region, verify and
cacert; or {"error": "..."} when openstacksdk refuses the settings.
"""

import argparse
import json
import os
import sys

import openstack.config
from keystoneauth1.identity import generic


class Captured(Exception):
    pass


class CapturingSession:
    """Stands in for a keystoneauth Session: keeps the token request body."""

    def __init__(self):
        self.body = None

    def post(self, url, json=None, **kwargs):
        self.body = json
        raise Captured()


def explicit_options(config):
    """The --os-* options as the OS_* variables set them. Options the
    variables leave at argparse's defaults (interface public, auth type
    password) are dropped: a default must not override the cloud entry."""
    parser = argparse.ArgumentParser()
    config.register_argparse_arguments(parser, [])
    options = parser.parse_args([])
    saved = {k: v for k, v in os.environ.items() if k.startswith("OS_")}
    for name in saved:
        del os.environ[name]
    try:
        pristine = argparse.ArgumentParser()
        config.register_argparse_arguments(pristine, [])
        defaults = vars(pristine.parse_args([]))
    finally:
        os.environ.update(saved)
    for dest, value in vars(options).items():
        if dest != "os_cloud" and value == defaults.get(dest):
            setattr(options, dest, None)
    return options


def main():
    config = openstack.config.OpenStackConfig()
    options = explicit_options(config)
    try:
        region = config.get_one_cloud_osc(argparse=options)
    except Exception as error:  # openstacksdk's own refusal is a result too
        print(json.dumps({"error": "%s: %s" % (type(error).__name__, error)}))
        return
    plugin = region.get_auth()
    if isinstance(plugin, generic.BaseGenericPlugin):
        plugin = plugin.create_plugin(None, (3, 0), plugin.auth_url)
    session = CapturingSession()
    try:
        plugin.get_auth_ref(session)
    except Captured:
        pass
    verify, _cert = region.get_requests_verify_args()
    print(json.dumps({
        "auth_url": plugin.auth_url,
        "body": session.body,
        "interface": region.get_interface(),
        "region_name": region.get_region_name() or None,
        "verify": verify is not False,
        "cacert": verify if isinstance(verify, str) else None,
    }, sort_keys=True))


if __name__ == "__main__":
    sys.exit(main())
