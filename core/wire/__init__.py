"""The wire codec: the restricted pickle (a data-only decoder and a fast path)."""
