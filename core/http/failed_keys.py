"""The reply headers that name the keys a model failed on (a ``Reply``'s ``failed``).

A failed pipeline item comes back as ``None``, and so does an item the model answered with
``None``; the headers tell them apart without touching the body, in every format:

- ``X-Studio-Failed-Count``: how many keys failed (absent when none did);
- ``X-Studio-Failed-Keys``: those keys in input order, each percent-encoded as UTF-8 (keys are
  the client's own text: commas, newlines, any script), joined by commas. At most
  ``MAX_KEYS_BYTES`` bytes: the keys that do not fit are left off whole (the header too when
  not even the first fits), and the count says so.
  Proxies refuse a reply whose headers pass a few KiB (nginx's default buffer is 4 or 8 KiB).
"""

from __future__ import annotations

from collections.abc import Iterable
from urllib.parse import quote, unquote

FAILED_COUNT = b"x-studio-failed-count"
FAILED_KEYS = b"x-studio-failed-keys"
MAX_KEYS_BYTES = 4096


def failed_headers(failed: Iterable[object]) -> list[tuple[bytes, bytes]]:
    """The two headers for the keys in ``failed``; none when it is empty."""
    keys = list(failed)
    if not keys:
        return []
    parts: list[str] = []
    size = 0
    for key in keys:
        part = quote(str(key), safe="")
        size += len(part) + (1 if parts else 0)
        if size > MAX_KEYS_BYTES:
            break
        parts.append(part)
    headers = [(FAILED_COUNT, b"%d" % len(keys))]
    if parts:  # a first key of more than MAX_KEYS_BYTES leaves the count alone
        headers.append((FAILED_KEYS, ",".join(parts).encode("ascii")))
    return headers


def parse_failed(keys: str | None, count: str | None) -> tuple[tuple[str, ...], int]:
    """``(keys, count)`` from the two header values as a client reads them (None: absent).
    The count is at least the keys listed, whatever a server says."""
    names = tuple(unquote(part) for part in keys.split(",")) if keys is not None else ()
    try:
        total = int(count) if count else 0
    except ValueError:
        total = 0
    return names, max(total, len(names))
