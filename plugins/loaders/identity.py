"""The identity model: serves its input back. Used when a modeldir has no checkpoint."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from studio_plugins import Loader, LoadOptions, Payload, ServedModel, hookimpl


async def identity(data: Payload) -> Payload:
    # async: nothing to compute, so no reason to hop to a worker thread
    return data


class IdentityLoader(Loader):
    name = "identity"
    patterns = ()

    def load(self, checkpoint: Path | None, options: LoadOptions) -> ServedModel:
        # Not batchable: stacking and cutting rows would cost more than the model itself.
        return ServedModel(predict=identity, platform="identity", checkpoint=None, batchable=False)


@hookimpl
def studio_register_loaders(register: Callable[[Loader], None]) -> None:
    register(IdentityLoader())
