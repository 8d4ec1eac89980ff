"""``--cloud local`` (the default): serve in this process with Hypercorn."""

from __future__ import annotations

from collections.abc import Callable

from studio_plugins import Backend, LaunchContext, hookimpl


class LocalBackend(Backend):
    name = "local"
    help = "serve here, in this process (default)"

    def launch(self, context: LaunchContext) -> int:
        return context.serve_here()


@hookimpl
def studio_register_backends(register: Callable[[Backend], None]) -> None:
    register(LocalBackend())
