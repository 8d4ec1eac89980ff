"""``serve``: pick the backend, and (for local serving) assemble, bind and run.

Order matters: everything that can fail in assembly fails before the port is bound.
"""

from __future__ import annotations

import logging
import shlex
from dataclasses import dataclass

from core.activity import Activity
from core.app import AppSettings, build_app
from core.codecs import CodecSet
from core.dataplane import DataPlaneOptions
from core.errors import ConfigurationError
from core.host import PluginHost
from core.repository import ModelRepository
from core.serving import bind_socket, run_server, socket_url
from core.types import ServeOptions

log = logging.getLogger("studio_plugins.launch")


@dataclass
class Launch:
    """The ``LaunchContext`` handed to backends."""

    host: PluginHost
    options: ServeOptions

    def assemble(self) -> ModelRepository:
        """Every model, loaded in parallel threads (errors name the model that failed)."""
        repository = ModelRepository(self.host, self.options)
        repository.load_all()
        return repository

    def serve_here(self) -> int:
        options = self.options
        repository = self.assemble()
        sock = bind_socket(options.host, options.port)
        url = socket_url(sock)
        activity = Activity()

        def announce() -> None:
            # The one line on stdout: scripts and tests wait for it.
            print(f"Serving {', '.join(repository.names())} on {url}", flush=True)

        settings = AppSettings(
            codecs=CodecSet(self.host.codecs()),
            token=options.token,
            max_body=options.max_body,
            debug=options.debug,
            dataplane=DataPlaneOptions(
                threads=options.threads,
                max_queue=options.max_queue,
                timeout=options.timeout,
                max_batch_size=options.max_batch_size,
                max_batch_delay=options.max_batch_delay / 1000,
            ),
            metrics=options.metrics,
            access_log=options.access_log,
            watch=options.watch,
            activity=activity,
            on_ready=announce,
        )
        app = build_app(repository, settings, self.host.route_factories())
        with sock:
            return run_server(app, sock, activity, killafter=options.killafter)

    def serve_argv(self) -> list[str]:
        """The ``studio-plug serve`` command line for these options.

        Backend options and the token are left out: a backend passes the token its own way
        (``STUDIO_TOKEN`` in the environment keeps it out of process listings)."""
        o = self.options
        argv = ["studio-plug", "serve", *o.keys, "--host", o.host, "--port", str(o.port)]
        for spec in o.models:
            target = f"{spec.key}:{spec.checkpoint}" if spec.checkpoint else spec.key
            argv += ["--model", f"{spec.name}={target}"]
        for name, wrapper in o.wrappers.items():
            argv += ["--wrapper", f"{name}={wrapper}"]
        if o.allow_partial:
            argv.append("--allow-partial")
        if o.watch:
            argv += ["--watch", f"{o.watch:g}"]
        argv += ["--killafter", f"{o.killafter:g}", "--max-body", str(o.max_body)]
        argv += ["--threads", str(o.threads), "--max-queue", str(o.max_queue)]
        if o.timeout:
            argv += ["--timeout", f"{o.timeout:g}"]
        if o.max_batch_size > 1:
            argv += ["--max-batch-size", str(o.max_batch_size),
                     "--max-batch-delay", f"{o.max_batch_delay:g}"]
        if not o.metrics:
            argv.append("--no-metrics")
        if o.access_log:
            argv.append("--access-log")
        for flag, value in (
            ("--store", o.store_url),
            ("--wrapper", o.wrapper),
            ("--checkpoint", o.checkpoint),
            ("--loader", o.loader),
        ):
            if value:
                argv += [flag, value]
        if o.gpus:
            argv += ["--gpus", str(o.gpus)]
        if o.trust_checkpoint:
            argv.append("--trust-checkpoint")
        if o.debug:
            argv.append("--debug")
        return argv

    def serve_command(self) -> str:
        return shlex.join(self.serve_argv())


def launch(host: PluginHost, options: ServeOptions, cloud: str = "local") -> int:
    backends = host.backends()
    if cloud not in backends:
        raise ConfigurationError(
            f"no backend named {cloud!r}", hint=f"backends installed: {', '.join(sorted(backends))}"
        )
    return backends[cloud].launch(Launch(host, options))
