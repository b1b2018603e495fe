"""Schemathesis hooks for Tether (loaded with SCHEMATHESIS_HOOKS=tether_hooks).

Real credentials, per operation, as a device and its user would use them:
- POST /v1/register: the device's default (factory) credentials;
- POST /v1/pair and DELETE /v1/devices/{device_id}/pairing: the user's credentials;
- everything else: the device's assigned credentials, which the server may replace on
  any answer (X-Tether-Set-Credentials: a registration with default credentials
  revokes the old ones), so the latest ones seen are used from then on.
"""

import base64
import os

import schemathesis

DEVICE_DEFAULT = tuple(os.environ["TETHER_ST_DEVICE_DEFAULT"].split(":", 1))
USER = tuple(os.environ["TETHER_ST_USER"].split(":", 1))
_assigned = [tuple(os.environ["TETHER_ST_DEVICE_ASSIGNED"].split(":", 1))]


def _basic(pair):
    return "Basic " + base64.b64encode(f"{pair[0]}:{pair[1]}".encode()).decode()


@schemathesis.auth(refresh_interval=None, retry_on=[])
class TetherAuth:
    def get(self, case, ctx):
        path = case.operation.path
        if path == "/v1/register":
            return DEVICE_DEFAULT
        if path == "/v1/pair" or path.startswith("/v1/devices/"):
            return USER
        return _assigned[0]

    def set(self, case, data, ctx):
        case.headers = case.headers or {}
        case.headers["Authorization"] = _basic(data)


@schemathesis.hook
def after_call(context, case, response):
    header = response.headers.get("x-tether-set-credentials")
    if isinstance(header, list):
        header = header[0] if header else None
    if header:
        cred_id, _, secret = header.strip().partition(" ")
        if cred_id.startswith("a.") and secret:
            _assigned[0] = (cred_id, secret)
