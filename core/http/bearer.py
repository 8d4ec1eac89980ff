"""``--token``: the one check of an ``Authorization`` value, for HTTP (the edge middleware) and
for other protocols through the ``ServingContext`` (gRPC's ``authorization`` metadata)."""

from __future__ import annotations

import hmac


def bearer_matches(authorization: bytes | str | None, expected: bytes) -> bool:
    """Whether ``authorization`` is ``Bearer <expected>``: the scheme case-insensitive (RFC 7235),
    the token compared in constant time."""
    if authorization is None:
        return False
    if isinstance(authorization, str):
        authorization = authorization.encode("latin-1", "replace")
    scheme, _, token = authorization.partition(b" ")
    return scheme.lower() == b"bearer" and hmac.compare_digest(token.strip(), expected)
