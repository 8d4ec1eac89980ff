"""HTTP: the ASGI app, its routes, and reading, decoding and answering one request."""
