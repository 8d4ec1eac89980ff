"""What ``studio-plug serve`` is asked for: ``ServeOptions``, and ``ModelSpec`` for each model.

The fields of ``ServeOptions`` are the one declaration of the serve options: each names its flag,
kind and help through ``option(...)`` (core/options.py, beside it), and the CLI's click options
and the command line sent to an instance or worker are generated from them. Part of the kernel's
plugin types: a backend receives them in its ``LaunchContext``, and ``core.types`` and
``studio_plugins`` name them as they name the rest.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import MISSING, dataclass, field
from typing import Any

from core.options import FLAG, SIZE, SWITCH, WORKERS, integer, number, option


@dataclass(frozen=True)
class ModelSpec:
    """One model to serve: its name on the server, its experiment and how to build it."""

    name: str
    key: str
    checkpoint: str | None = None
    wrapper: str | None = None


@dataclass(frozen=True)
class ServeOptions:
    """Everything ``studio-plug serve`` was asked for, independent of where it runs.

    Each field is the one declaration of its option (core/options.py): the CLI's click options
    and the command line sent to an instance or worker (``serve_argv``) are generated from it.
    Fields are in ``--help`` order."""

    keys: tuple[str, ...] = option(
        MISSING, None, "Positional experiment keys; each is served under its own name.",
        metavar="EXPERIMENT_KEY...", item=str)
    port: int = option(
        5000, "--port", "TCP port to serve on; 0 picks a free one (the URL is printed).",
        kind=integer(0, 65535), always=True)
    grpc_port: int | None = option(
        None, "--grpc-port", "Serve the Open Inference Protocol (V2) over gRPC on this port too; 0 "
        "picks a free one (printed). Every worker shares it. Needs the grpc extra. Default: off.",
        kind=integer(0, 65535))
    host: str = option(
        "localhost", "--host", "Address to listen on: localhost (this machine only) or 0.0.0.0 "
        "(every interface).", always=True)
    certfile: str | None = option(
        None, "--certfile", "Serve HTTPS with this PEM certificate (its chain may follow it in the "
        "file); needs --keyfile. The printed URL is https://.", metavar="FILE")
    keyfile: str | None = option(
        None, "--keyfile", "The PEM private key of --certfile's certificate (unencrypted; keep it "
        "private). May be the same file.", metavar="FILE")
    ca_certs: str | None = option(
        None, "--ca-certs", "With HTTPS: require a client certificate signed by a CA in this PEM "
        "file (mutual TLS); others are refused in the handshake.", metavar="FILE")
    killafter: float = option(
        3600.0, "--killafter", "Exit (status 0) after this many seconds with no request; never "
        "during a request. 0 disables.", kind=number(0), always=True)
    store_url: str | None = option(
        None, "--store", "Experiment store URL (file:///path, ...); default: $STUDIOML_HOME "
        "(~/.studioml).", envvar="STUDIO_STORE")
    token: str | None = option(
        None, "--token", "Require 'Authorization: Bearer TOKEN' on every request but health "
        "checks and the /docs page.", envvar="STUDIO_TOKEN", secret=True)
    cors: tuple[str, ...] = option(
        (), "--cors", "Let web pages from ORIGIN (scheme://host[:port], as in their Origin header; "
        "'*': any) call the server from a browser; repeatable. Default: no CORS headers.",
        metavar="ORIGIN", item=str)
    """Origins (``*``: any) whose web pages may call the server."""
    wrapper: str | None = option(
        None, "--wrapper", "A .py file, module or registered name with create_model(modeldir) "
        "returning a dict -> dict callable. NAME=WRAPPER gives one model its own.")
    """The wrapper for every model without its own (the CLI's ``--wrapper`` is repeatable)."""
    wrappers: Mapping[str, str] = option(
        None, "--wrapper", "", factory=dict, parsed_by="wrapper", item=lambda pair: "=".join(pair))
    """``--wrapper NAME=PATH``: a wrapper for one model."""
    models: tuple[ModelSpec, ...] = option(
        (), "--model", "Serve experiment KEY as model NAME (repeatable; after the positional "
        "keys). POST /models/NAME and the V2 routes address it by name.",
        metavar="NAME=KEY[:CHECKPOINT]",
        item=lambda s: f"{s.name}={s.key}:{s.checkpoint}" if s.checkpoint else f"{s.name}={s.key}")
    allow_partial: bool = option(
        False, "--allow-partial", "With several models: serve the others when one fails to load "
        "(it is reported not ready) instead of failing the start.", kind=FLAG)
    watch: float = option(
        0.0, "--watch", "Check the store every S seconds for a newer checkpoint and swap it in "
        "without a restart (a load that fails keeps the old model). 0: off.", kind=number(0))
    checkpoint: str | None = option(
        None, "--checkpoint", "Serve this file of the modeldir instead of the newest checkpoint.")
    loader: str | None = option(
        None, "--loader", "Force a loader (see `studio-plug plugins`).")
    trust_checkpoint: bool = option(
        False, "--trust-checkpoint", "Allow checkpoints that run their own code when loaded "
        "(Keras Lambda layers, pickled torch modules). Only for checkpoints you trust.", kind=FLAG)
    gpus: int = option(
        0, "--gpus", "GPUs to use (local: CUDA when > 0 and present; cloud: instance size).",
        kind=integer(0))
    max_body: int = option(
        64 * 1024 * 1024, "--max-body", "Largest request body accepted; larger ones get 413.",
        kind=SIZE, shown_default="64MiB", always=True)
    read_timeout: float = option(
        20.0, "--read-timeout", "Seconds a request body may take to start arriving; after that it "
        "must keep up --min-rate (as Apache's RequestReadTimeout body=20,MinRate=500), else it is "
        "answered 408 and the connection closed. Request headers get 5 s, or this when shorter (an "
        "HTTPS handshake 10 s, or this); a gRPC call's message must arrive whole within it. 0: no "
        "body read timeout.", kind=number(0))
    """core/http/body_guard.py applies it."""
    min_rate: int = option(
        500, "--min-rate", "Bytes/s a request body must keep up: each N bytes received extend "
        "--read-timeout by one second. 0: the whole body within --read-timeout.",
        kind=integer(0))
    body_budget: int | None = option(
        None, "--body-budget", "Bytes of request bodies held at once (per worker process); a body "
        "that does not fit gets 503 with Retry-After before it is read. Default: 1GiB or 4 x "
        "--max-body, whichever is more. 0: unbounded.", kind=SIZE)
    threads: int = option(
        4, "--threads", "Threads that run a synchronous model, so the event loop never blocks "
        "(a compiled model's calls timed under 1 ms run on the event loop instead).",
        kind=integer(1), always=True)
    timeout: float | None = option(
        None, "--timeout", "Seconds until a request is answered 504 (the late result is "
        "discarded). Default: no deadline.", kind=number(0, low_open=True))
    max_queue: int = option(
        256, "--max-queue", "Requests admitted at once (waiting or running); more get 503 with "
        "Retry-After at once. 0: unbounded.", kind=integer(0), always=True)
    max_batch_size: int = option(
        32, "--max-batch-size", "Requests that arrive while the model is busy, with arrays that "
        "agree in trailing shape and dtype, are stacked into its next call of up to N rows; one "
        "that finds it idle runs at once. 1: off. Applies to the framework loaders' models and "
        "to wrappers that set `model.batchable = True`.", kind=integer(1), always=True)
    max_batch_delay: float = option(
        0.0, "--max-batch-delay", "Milliseconds a partial batch may wait for more requests to join "
        "it (fuller batches, at the cost of latency). 0: no wait.", kind=number(0), always=True)
    compile: bool = option(
        True, "--compile", "Framework models (Keras, torch): once serving, compile the model in "
        "the background (a traced, frozen TorchScript graph) and swap it in when it answers as the "
        "loaded one does; the loaded model serves meanwhile, and stays if compiling fails.",
        kind=SWITCH)
    workers: int = option(
        1, "--workers", "Worker processes: the model is loaded once, then N workers are forked "
        "and share it (copy-on-write) and one socket. 'auto': one per usable core. Batching forms "
        "batches within a worker.", kind=WORKERS)
    threads_per_worker: int | None = option(
        None, "--threads-per-worker", "Intra-op threads (torch/Keras) in each serving process. "
        "Default: usable cores / workers; one process alone: usable cores - 1 (a core for its "
        "event loop), or OMP_NUM_THREADS if set. At least 1.", kind=integer(1))
    metrics: bool = option(
        True, "--metrics", "Serve Prometheus metrics on GET /metrics.", kind=SWITCH)
    access_log: bool = option(
        False, "--access-log", "Log one line per request: method, path, status, duration, batch "
        "size, model, request id.", kind=FLAG)
    debug: bool = option(
        False, "--debug", "Log debug output and return tracebacks in error replies.", kind=FLAG)
    backend_options: Mapping[str, Any] = field(default_factory=dict)
    """Values of the backends' own options (``Backend.cli_options``); read by the backend that
    launches, so they are not on the command line it sends."""

    def model_specs(self) -> list[ModelSpec]:
        """Every model to serve, in order (the first is the default for ``POST /``)."""
        specs = [ModelSpec(key, key, self.checkpoint, None) for key in self.keys] + list(self.models)
        return [
            ModelSpec(s.name, s.key, s.checkpoint, self.wrappers.get(s.name, self.wrapper))
            for s in specs
        ]
