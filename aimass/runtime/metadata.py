"""gRPC metadata keys of the aimass contract (see protos/aimass/v1/common.proto), shared by servers and clients."""

from __future__ import annotations

import uuid
from collections.abc import Iterable
from typing import Any, Final

# Trailer carrying a serialized aimass.v1.ErrorInfo (reason code, limits) next to an error status.
ERROR_INFO_KEY: Final = "aimass-error-bin"
# Correlates a request across gateway and replica logs; replicas echo it back as a trailer.
REQUEST_ID_KEY: Final = "x-request-id"

# Metadata under this prefix is the mesh's own: the gateway drops whatever a caller sent under it and writes the
# request scope it verified (aimass.runtime.scope); replicas trust it because only gateways may call them.
INTERNAL_PREFIX: Final = "x-aimass-"
# The tenant a request is for (the caller's API key's), its fair-share weight, the most urgent priority it may use,
# and the key's public id.
TENANT_KEY: Final = "x-aimass-tenant"
TENANT_WEIGHT_KEY: Final = "x-aimass-tenant-weight"
MAX_PRIORITY_KEY: Final = "x-aimass-max-priority"
KEY_ID_KEY: Final = "x-aimass-key-id"
# The address a forwarded admin call came from (the gateway's caller), for the audit log of the process applying it.
CALLER_PEER_KEY: Final = "x-aimass-caller-peer"
# Trailer naming the replica (its registry instance id) that answered, on success and error alike; the gateway
# relays it untouched, so a caller sees which replica served a request that went through the gateway.
REPLICA_KEY: Final = "x-aimass-replica"


def metadata_value(metadata: Iterable[Any] | None, key: str) -> str:
    """One metadata entry's value, or "" when absent."""
    for entry_key, value in metadata or ():
        if entry_key == key:
            return str(value)
    return ""


def metadata_values(metadata: Iterable[Any] | None, keys: Iterable[str]) -> dict[str, str]:
    """Several entries' values in one pass ("" for those absent; the first value of a repeated key)."""
    found = dict.fromkeys(keys, "")
    missing = set(found)
    for entry_key, value in metadata or ():
        if entry_key in missing:
            found[entry_key] = str(value)
            missing.discard(entry_key)
    return found


def tenant_of(metadata: Iterable[Any] | None) -> str:
    """The tenant a request is for, or "" when none is named (anonymous)."""
    return metadata_value(metadata, TENANT_KEY)


def request_id_of(metadata: Iterable[Any] | None) -> str:
    """The caller's request id, or "" when it sent none."""
    return metadata_value(metadata, REQUEST_ID_KEY)


def new_request_id() -> str:
    return uuid.uuid4().hex[:16]
