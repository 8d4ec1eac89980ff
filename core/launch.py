"""``serve``: pick the backend, and (for local serving) assemble, bind and run.

Order matters: everything that can fail in assembly fails before the port is bound.
"""

from __future__ import annotations

import logging
import shlex
import time
from dataclasses import dataclass

from core.activity import Activity
from core.app import AppSettings, build_app
from core.assembly import load_model
from core.codecs import CodecSet
from core.dataplane import DataPlaneOptions
from core.errors import ConfigurationError
from core.host import PluginHost
from core.serving import bind_socket, run_server, socket_url
from core.types import ServedModel, ServeOptions

log = logging.getLogger("studio_plugins.launch")


@dataclass
class Launch:
    """The ``LaunchContext`` handed to backends."""

    host: PluginHost
    options: ServeOptions

    def assemble(self) -> tuple[dict[str, ServedModel], dict[str, float]]:
        """Every model, and how long each took to load."""
        models: dict[str, ServedModel] = {}
        seconds: dict[str, float] = {}
        for key in self.options.keys:
            started = time.perf_counter()
            models[key] = load_model(self.host, self.options, key)
            seconds[key] = time.perf_counter() - started
        return models, seconds

    def serve_here(self) -> int:
        options = self.options
        models, load_seconds = self.assemble()
        sock = bind_socket(options.host, options.port)
        url = socket_url(sock)
        activity = Activity()

        def announce() -> None:
            # The one line on stdout: scripts and tests wait for it.
            print(f"Serving {', '.join(models)} on {url}", flush=True)

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
            load_seconds=load_seconds,
            activity=activity,
            on_ready=announce,
        )
        app = build_app(models, settings)
        with sock:
            return run_server(app, sock, activity, killafter=options.killafter)

    def serve_argv(self) -> list[str]:
        """The ``studio-plug serve`` command line for these options.

        Backend options and the token are left out: a backend passes the token its own way
        (``STUDIO_TOKEN`` in the environment keeps it out of process listings)."""
        o = self.options
        argv = ["studio-plug", "serve", *o.keys, "--host", o.host, "--port", str(o.port)]
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
