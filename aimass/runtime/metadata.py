"""gRPC metadata keys of the aimass contract (see protos/aimass/v1/common.proto), shared by servers and clients."""

from __future__ import annotations

import uuid
from collections.abc import Iterable
from typing import Any, Final

# Trailer carrying a serialized aimass.v1.ErrorInfo (reason code, limits) next to an error status.
ERROR_INFO_KEY: Final = "aimass-error-bin"
# Correlates a request across gateway and replica logs; replicas echo it back as a trailer.
REQUEST_ID_KEY: Final = "x-request-id"

# The tenant a request is for, set by the gateway after authentication; replicas account work to it.
TENANT_KEY: Final = "x-aimass-tenant"
# Trailer naming the replica (its registry instance id) that answered, on success and error alike; the gateway
# relays it untouched, so a caller sees which replica served a request that went through the gateway.
REPLICA_KEY: Final = "x-aimass-replica"


def metadata_value(metadata: Iterable[Any] | None, key: str) -> str:
    """One metadata entry's value, or "" when absent."""
    for entry_key, value in metadata or ():
        if entry_key == key:
            return str(value)
    return ""


def tenant_of(metadata: Iterable[Any] | None) -> str:
    """The tenant a request is for, or "" when none is named (anonymous)."""
    return metadata_value(metadata, TENANT_KEY)


def request_id_of(metadata: Iterable[Any] | None) -> str:
    """The caller's request id, or "" when it sent none."""
    return metadata_value(metadata, REQUEST_ID_KEY)


def new_request_id() -> str:
    return uuid.uuid4().hex[:16]
