"""API keys and tenants for the gRPC gateway.

Clients send `authorization: Bearer <key>` metadata; each key belongs to one tenant, and every
memory id a tenant uses is scoped to it (stored as `<tenant>~<memory_id>`): a tenant cannot name,
list or read another tenant's memories. Keys come from a YAML file (`serve.api_keys_file`:
`{tenant: [key, ...]}`) and/or an environment variable (`serve.api_keys_env`, default
LONGMEM_API_KEYS: `tenant:key,tenant:key`). With no keys configured the gateway runs in the
explicit insecure local mode: no authentication, every caller is tenant `default`.
"""

from __future__ import annotations

import hmac
import os
import re

import yaml

from longmem.config import ServeConfig

TENANT = re.compile(r"^[A-Za-z0-9_-]{1,64}$")
SEPARATOR = "~"  # never allowed in a memory id, so scoped ids cannot collide across tenants
LOCAL_TENANT = "default"


class Unauthenticated(Exception):
    """Missing or unknown API key."""


def load_keys(cfg: ServeConfig) -> dict[str, str]:
    """API key -> tenant, from the keys file and the environment variable."""
    pairs: list[tuple[str, str]] = []
    if cfg.api_keys_file:
        with open(cfg.api_keys_file) as f:
            data = yaml.safe_load(f) or {}
        if not isinstance(data, dict):
            raise ValueError(f"{cfg.api_keys_file}: expected a mapping tenant -> list of keys")
        for tenant, keys in data.items():
            pairs += [(str(tenant), str(k)) for k in ([keys] if isinstance(keys, str) else keys or [])]
    for item in filter(None, os.environ.get(cfg.api_keys_env, "").split(",")):
        tenant, sep, key = item.strip().partition(":")
        if not sep:
            raise ValueError(f"${cfg.api_keys_env}: entries must look like tenant:key")
        pairs.append((tenant, key))
    keys: dict[str, str] = {}
    for tenant, key in pairs:
        if not TENANT.match(tenant):
            raise ValueError(f"tenant name '{tenant}' must be 1-64 letters, digits, '_' or '-'")
        if len(key) < cfg.min_api_key_chars:
            raise ValueError(f"an API key of tenant '{tenant}' is shorter than {cfg.min_api_key_chars} characters")
        if keys.setdefault(key, tenant) != tenant:
            raise ValueError("one API key is given to two tenants")
    return keys


class Tenants:
    def __init__(self, keys: dict[str, str]):
        self.keys = keys

    @property
    def required(self) -> bool:
        return bool(self.keys)

    def tenant_of(self, metadata) -> str:
        """The tenant of a call from its gRPC metadata ((key, value) pairs)."""
        if not self.required:
            return LOCAL_TENANT
        values = [v for k, v in metadata if k.lower() == "authorization"]
        if not values:
            raise Unauthenticated("missing 'authorization: Bearer <api key>' metadata")
        scheme, _, presented = values[0].partition(" ")
        if scheme.lower() != "bearer" or not presented:
            raise Unauthenticated("authorization metadata must be 'Bearer <api key>'")
        tenant = None
        for key, owner in self.keys.items():  # compare against every key, in constant time each
            if hmac.compare_digest(key.encode(), presented.strip().encode()):
                tenant = owner
        if tenant is None:
            raise Unauthenticated("unknown API key")
        return tenant


def scope(tenant: str, memory_id: str) -> str:
    return f"{tenant}{SEPARATOR}{memory_id}"


def unscope(tenant: str, scoped_id: str) -> str | None:
    """The tenant's own memory id, or None when the scoped id belongs to someone else."""
    prefix = f"{tenant}{SEPARATOR}"
    return scoped_id[len(prefix):] if scoped_id.startswith(prefix) else None
