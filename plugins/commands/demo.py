"""``studio-plug demo``: write a small Keras model into experiment ``demo`` and serve it.

The model doubles its input (``x``: a batch of 3-vectors; one Dense layer named ``double`` whose
kernel is 2·I, no bias). It is written into the embedded store the way a training script would
(``get_model_directory``), then served exactly as ``studio-plug serve demo`` would serve it.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import click

from studio_plugins import get_model_directory, hookimpl, studio_home

KEY = "demo"
CHECKPOINT = "demo.keras"
EXAMPLE = {"x": [[1.0, 2.0, 3.0]]}


def write_demo_model(modeldir: Path) -> Path:
    """The doubling model as ``modeldir/demo.keras``."""
    import numpy as np

    from plugins.loaders.keras import import_keras
    from plugins.loaders.torch_runtime import import_torch, single_threaded

    keras = import_keras()
    torch = import_torch("keras")
    with single_threaded(torch):  # this process may fork workers later (see torch_runtime)
        inputs = keras.Input((3,), name="x")
        double = keras.layers.Dense(3, use_bias=False, name="double")
        model = keras.Model(inputs, double(inputs), name="demo")
        double.set_weights([2 * np.eye(3, dtype="float32")])
        path = modeldir / CHECKPOINT
        partial = path.with_name(".writing-" + path.name)  # never leave a half-written checkpoint
        model.save(partial)
        partial.replace(path)
    return path


def ensure_demo_model() -> tuple[Path, bool]:
    """The demo's checkpoint, written unless the experiment already has a Keras checkpoint."""
    from plugins.loaders.keras import KerasLoader

    modeldir = Path(get_model_directory(KEY))
    loader = KerasLoader()
    existing = sorted(p for p in modeldir.iterdir() if p.is_file() and loader.recognises(p))
    if existing:
        return existing[-1], False
    return write_demo_model(modeldir), True


def curl_example(host: str, port: int, token: str | None) -> str:
    address = "127.0.0.1" if host in ("localhost", "0.0.0.0", "") else host
    url = f"http://{address}:{port if port else 'PORT'}/"
    auth = " -H 'Authorization: Bearer $STUDIO_TOKEN'" if token else ""
    return (
        f"curl -s -X POST {url} -H 'Content-Type: application/json'{auth} "
        f"-d '{json.dumps(EXAMPLE)}'"
    )


@hookimpl
def studio_register_commands(cli: click.Group) -> None:
    @cli.command("demo")
    @click.option("--port", type=click.IntRange(0, 65535), default=5000, show_default=True,
                  help="TCP port to serve on; 0 picks a free one (the URL is printed).")
    @click.option("--host", "bind_host", default="localhost", show_default=True,
                  help="Address to listen on: localhost or 0.0.0.0.")
    @click.option("--killafter", type=click.FloatRange(min=0), default=3600, show_default=True,
                  help="Exit after this many seconds with no request; 0 disables.")
    @click.pass_context
    def demo(ctx: click.Context, port: int, bind_host: str, killafter: float) -> None:
        """Write a small Keras model into experiment `demo` and serve it.

        The model doubles a batch of 3-vectors named x. It goes into the embedded store
        ($STUDIOML_HOME) unless a checkpoint is already there, and is then served exactly as
        `studio-plug serve demo` would.
        """
        from studio_plugins import StudioError

        try:
            path, written = ensure_demo_model()
        except StudioError as exc:
            click.echo(f"error: {exc.message}", err=True)
            if exc.hint:
                click.echo(f"hint: {exc.hint}", err=True)
            ctx.exit(1)
        click.echo(f"{'wrote' if written else 'using'} {path}")
        click.echo("try it (the answer is x doubled, under the key it was sent with, `x`):")
        click.echo(f"  {curl_example(bind_host, port, os.environ.get('STUDIO_TOKEN'))}")
        if not port:
            click.echo("  (PORT: the port on the 'Serving' line below)")
        serve = cli.get_command(ctx, "serve")
        if serve is None:
            raise click.ClickException("the serve command is missing")
        # the demo model lives in the embedded store, whatever STUDIO_STORE says
        store = Path(studio_home()).resolve().as_uri()
        argv = [KEY, "--port", str(port), "--host", bind_host, "--killafter", f"{killafter:g}",
                "--store", store]
        with serve.make_context("serve", argv, parent=ctx) as serve_ctx:
            serve.invoke(serve_ctx)

