"""Tenants. Each API key is its own tenant; its conversations live in a private namespace:

    engine key = "<tenant id>:<conversation id>"     tenant id = sha256(api key)[:16]

so two tenants using the same conversation id never meet, and the key itself is never stored in a
cache key or a log. Without configured keys every caller is the one `anonymous` tenant.
"""

import hashlib
import hmac
import logging
from dataclasses import dataclass

from service.errors import UnauthorizedError

log = logging.getLogger(__name__)

ANONYMOUS = "anonymous"


@dataclass(frozen=True)
class Tenant:
    id: str  # hash of the API key (or "anonymous"): safe to log and to put in cache keys

    def key(self, conversation_id: str) -> str:
        """The engine's key of this tenant's conversation."""
        return f"{self.id}:{conversation_id}"


def tenant_id(api_key: str) -> str:
    return hashlib.sha256(api_key.encode()).hexdigest()[:16]


class Authenticator:
    def __init__(self, api_keys: list[str]) -> None:
        self._tenants = {hashlib.sha256(k.encode()).digest(): Tenant(tenant_id(k)) for k in api_keys}
        if self._tenants:
            log.info("auth: %d API key(s); each key is a separate tenant", len(self._tenants))
        else:
            log.warning("auth: no API keys configured: every caller shares one anonymous tenant")

    @property
    def enabled(self) -> bool:
        return bool(self._tenants)

    def tenant(self, bearer_token: str | None) -> Tenant:
        """The tenant of a bearer token; raises 401 when keys are on and it is missing or wrong."""
        if not self._tenants:
            return Tenant(ANONYMOUS)
        if not bearer_token:
            raise UnauthorizedError("missing API key: send 'Authorization: Bearer <key>'")
        digest = hashlib.sha256(bearer_token.encode()).digest()
        for known, tenant in self._tenants.items():
            if hmac.compare_digest(known, digest):
                return tenant
        raise UnauthorizedError("invalid API key")
