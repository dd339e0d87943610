"""Create etcd's root user and the paydispatch user and role, then enable auth.

Settings from the environment: PAYDISPATCH_ETCD_* (endpoints, TLS files, user and
password), ETCD_ROOT_PASSWORD. Does nothing when auth is on already."""
import os
import sys

import grpc
from aetcd import rpc

PREFIX = os.environ.get("ETCD_AUTH_PREFIX", "/paydispatch/").encode()
PREFIX_END = PREFIX[:-1] + bytes([PREFIX[-1] + 1])
env = os.environ
user, password = env["PAYDISPATCH_ETCD_USERNAME"], env["PAYDISPATCH_ETCD_PASSWORD"]
root_password = env["ETCD_ROOT_PASSWORD"]


def read(name):
    with open(env[name], "rb") as f:
        return f.read()


credentials = grpc.ssl_channel_credentials(
    read("PAYDISPATCH_ETCD_CA_FILE"),
    read("PAYDISPATCH_ETCD_KEY_FILE"),
    read("PAYDISPATCH_ETCD_CERT_FILE"),
)


def tolerate_existing(call, request):
    try:
        call(request, timeout=5)
    except grpc.RpcError as error:
        if "already exists" not in (error.details() or ""):
            raise


def set_up(channel):
    auth = rpc.AuthStub(channel)
    try:
        auth.Authenticate(rpc.AuthenticateRequest(name="root", password=root_password),
                          timeout=5)
        print("etcd auth is already enabled; nothing to do")
        return
    except grpc.RpcError as error:
        if "authentication is not enabled" not in (error.details() or ""):
            raise
    tolerate_existing(auth.UserAdd, rpc.AuthUserAddRequest(name="root",
                                                           password=root_password))
    auth.UserGrantRole(rpc.AuthUserGrantRoleRequest(user="root", role="root"), timeout=5)
    tolerate_existing(auth.RoleAdd, rpc.AuthRoleAddRequest(name=user))
    # Read and write under the prefix: the election keys, and so their leases (etcd
    # checks a lease against the keys attached to it).
    permission = rpc.Permission(permType=rpc.Permission.READWRITE, key=PREFIX,
                                range_end=PREFIX_END)
    auth.RoleGrantPermission(rpc.AuthRoleGrantPermissionRequest(name=user,
                                                                perm=permission),
                             timeout=5)
    tolerate_existing(auth.UserAdd, rpc.AuthUserAddRequest(name=user, password=password))
    auth.UserGrantRole(rpc.AuthUserGrantRoleRequest(user=user, role=user), timeout=5)
    auth.AuthEnable(rpc.AuthEnableRequest(), timeout=5)
    print(f"etcd auth enabled: users root and {user} (readwrite on {PREFIX.decode()})")


failures = []
for endpoint in env["PAYDISPATCH_ETCD_ENDPOINTS"].split(","):
    target = endpoint.strip().removeprefix("https://")
    try:
        with grpc.secure_channel(target, credentials) as channel:
            set_up(channel)
        sys.exit(0)
    except grpc.RpcError as error:
        failures.append(f"{target}: {error.code().name}: {error.details()}")
sys.exit("could not set up etcd auth: " + "; ".join(failures))
