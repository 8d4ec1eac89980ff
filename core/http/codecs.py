"""Choosing a codec for a request: by Content-Type, else by sniffing; replies by Accept."""

from __future__ import annotations

from core.errors import BadRequest, UnsupportedMediaType
from core.types import Codec

# "we did not say": curl -d and urllib send form-urlencoded unless told otherwise
GENERIC_TYPES = frozenset(
    {"", "application/octet-stream", "*/*", "application/x-www-form-urlencoded"}
)


def _media_type(header: str) -> str:
    return header.split(";", 1)[0].strip().lower()


class CodecSet:
    """The registered codecs, indexed by media type; first registered sniffs first."""

    def __init__(self, codecs: dict[str, Codec]) -> None:
        self.codecs = list(codecs.values())
        self._by_header: dict[str, Codec] = {}  # Content-Type values seen, as sent
        self._content_types = {codec.name: codec.media_type.encode() for codec in self.codecs}
        self.by_type: dict[str, Codec] = {}
        for codec in self.codecs:
            for media_type in codec.media_types:
                self.by_type.setdefault(media_type.lower(), codec)

    def for_request(self, content_type: str, body: bytes) -> Codec:
        codec = self._by_header.get(content_type)
        if codec is not None:
            return codec
        media_type = _media_type(content_type)
        codec = self.by_type.get(media_type)
        if codec is not None:
            if len(self._by_header) < 64:  # clients send a handful of spellings; bounded anyway
                self._by_header[content_type] = codec
            return codec
        if media_type not in GENERIC_TYPES:
            raise UnsupportedMediaType(
                f"unsupported Content-Type {media_type!r}; "
                f"use one of {', '.join(sorted(self.by_type))}"
            )
        if not body:
            raise BadRequest("empty request body; send a dict of named arrays")
        head = body[:16]
        for codec in self.codecs:
            if codec.sniff(head):
                return codec
        raise UnsupportedMediaType(
            "cannot tell the body's format; set Content-Type to one of "
            + ", ".join(sorted(self.by_type))
        )

    def content_type(self, codec: Codec) -> bytes:
        """The Content-Type header value for a reply in ``codec``."""
        value = self._content_types.get(codec.name)
        return value if value is not None else codec.media_type.encode()

    def for_reply(self, accept: str, request_codec: Codec) -> Codec:
        """The first acceptable media type we speak; otherwise the request's own format."""
        if not accept:
            return request_codec
        for part in accept.split(","):
            media_type = _media_type(part)
            if media_type in GENERIC_TYPES:
                return request_codec
            codec = self.by_type.get(media_type)
            if codec is not None:
                return codec
        return request_codec
