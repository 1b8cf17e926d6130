"""API keys: their form, how they are made and hashed, and the scopes that say what a key may do.

A key reads ``aimass_<key id>_<secret>``: the key id (12 lowercase letters and digits) is public and names the key
in listings and the audit log; the secret is 32 random bytes (256 bits, base64url). Only the SHA-256 of the whole
key is stored. A salted slow hash (bcrypt, argon2) protects guessable passwords; a 256-bit random secret cannot be
guessed, so a fast hash loses nothing and lets every gateway check a key in a microsecond.
"""

from __future__ import annotations

import hashlib
import re
import secrets
import string
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Final

KEY_PREFIX: Final = "aimass_"
KEY_ID_LENGTH: Final = 12
SECRET_BYTES: Final = 32
_KEY_ID_ALPHABET: Final = string.ascii_lowercase + string.digits
# aimass_ + 12 id characters + _ + 43 base64url characters (32 bytes, unpadded).
KEY_PATTERN: Final = re.compile(r"^aimass_([a-z0-9]{12})_([A-Za-z0-9_-]{43})$")

# What a key may do. A key holds one or more; the admin key that `aimass up` creates holds them all.
SCOPE_INFER: Final = "infer"  # call models (every inference service, the model catalogue)
SCOPE_MODELS_ADMIN: Final = "models:admin"  # load and unload models anywhere in the mesh
SCOPE_MODELS_TRAIN: Final = "models:train"  # the tenant's own models: datasets, training jobs, versions, deployments
SCOPE_KEYS_ADMIN: Final = "keys:admin"  # create, list and revoke the keys of the key's own tenant
SCOPE_AUDIT_READ: Final = "audit:read"  # read the audit log of the key's own tenant
SCOPE_TENANTS_ADMIN: Final = "tenants:admin"  # every tenant: limits, keys and audit (the operator's scope)
SCOPES: Final = frozenset(
    {SCOPE_INFER, SCOPE_MODELS_ADMIN, SCOPE_MODELS_TRAIN, SCOPE_KEYS_ADMIN, SCOPE_AUDIT_READ, SCOPE_TENANTS_ADMIN}
)
ADMIN_SCOPES: Final = SCOPES

# Tenant ids: what a person types on a command line and a log shows without quoting.
TENANT_PATTERN: Final = re.compile(r"^[a-z0-9][a-z0-9._-]{0,62}$")


@dataclass(frozen=True)
class NewKey:
    """A key just made: ``key`` is shown once and never stored; ``key_hash`` is what the store keeps."""

    key_id: str
    key: str
    key_hash: str


def new_key() -> NewKey:
    key_id = "".join(secrets.choice(_KEY_ID_ALPHABET) for _ in range(KEY_ID_LENGTH))
    key = f"{KEY_PREFIX}{key_id}_{secrets.token_urlsafe(SECRET_BYTES)}"
    return NewKey(key_id=key_id, key=key, key_hash=hash_key(key))


def hash_key(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def key_id_of(key: str) -> str | None:
    """The key id of a well-formed key, None for anything else (checked before any lookup)."""
    match = KEY_PATTERN.match(key)
    return match.group(1) if match else None


def check_scopes(scopes: Iterable[str]) -> frozenset[str]:
    """``scopes`` as a set, or ValueError naming the unknown ones and the known ones."""
    wanted = frozenset(s.strip() for s in scopes if s.strip())
    unknown = wanted - SCOPES
    if unknown:
        raise ValueError(f"unknown scopes {', '.join(sorted(unknown))}; known: {', '.join(sorted(SCOPES))}")
    if not wanted:
        raise ValueError(f"a key needs at least one scope; known: {', '.join(sorted(SCOPES))}")
    return wanted


def check_tenant_id(tenant_id: str) -> str:
    if not TENANT_PATTERN.match(tenant_id):
        raise ValueError(
            f"tenant id {tenant_id[:70]!r} is not valid: 1-63 characters, lowercase letters, digits, '.', '_' or "
            "'-', starting with a letter or digit"
        )
    return tenant_id
