"""The pages a browser gets: ``GET /docs`` (renders ``/openapi.json``) and ``GET /`` when the
request prefers HTML (the served models, their inputs, a ready ``curl`` line for each).

Model names, experiment keys, checkpoint file names and the ``Host`` header are text from outside
(a checkpoint is any file someone put in a modeldir): the index page escapes all of it, and its
``curl`` lines quote it for the shell; the docs page builds its DOM from text nodes only. Each page
carries a Content-Security-Policy that allows its one inline style and script (by hash) and
connections to this server only: nothing is fetched from the internet.
"""

from __future__ import annotations

import base64
import hashlib
import html
import json
import math
import re
import shlex
from collections.abc import Sequence
from importlib import resources
from typing import Any
from urllib.parse import quote

from core.http.openapi import declared
from core.types import ModelState, TensorSpec

DOCS_PAGE: bytes = resources.files("core.http").joinpath("docs.html").read_bytes()
MAX_EXAMPLE = 16
"""Values at most in a curl line's example body; a larger input gets an .npz line instead."""
_STATES = frozenset({"ready", "loading", "failed", "unloaded"})


def _inline(tag: str, page: str) -> str:
    match = re.search(rf"<{tag}>(.*?)</{tag}>", page, re.DOTALL)
    if match is None:  # pragma: no cover - the page is ours
        raise RuntimeError(f"core/http/docs.html has no <{tag}>")
    return match.group(1)


def _source_hash(text: str) -> str:
    return "'sha256-" + base64.b64encode(hashlib.sha256(text.encode()).digest()).decode() + "'"


STYLE = _inline("style", DOCS_PAGE.decode())
"""One stylesheet for both pages (it lives in docs.html, which stays a page of its own)."""
_POLICY = "default-src 'none'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'; img-src data:"
_COMMON = {"X-Content-Type-Options": "nosniff", "Referrer-Policy": "no-referrer",
           "Cache-Control": "no-cache"}
DOCS_HEADERS = {
    "Content-Security-Policy": f"{_POLICY}; style-src {_source_hash(STYLE)}; "
    f"script-src {_source_hash(_inline('script', DOCS_PAGE.decode()))}; connect-src 'self'",
    **_COMMON,
}
INDEX_HEADERS = {"Content-Security-Policy": f"{_POLICY}; style-src {_source_hash(STYLE)}", **_COMMON}
HTML_TYPES = frozenset({"text/html", "application/xhtml+xml"})


def prefers_html(accept: bytes | str | None) -> bool:
    """Whether an ``Accept`` header ranks HTML above JSON: browsers send ``text/html,...,*/*;q=0.8``;
    curl sends ``*/*``, API clients nothing or ``application/json``. A tie goes to JSON (an API
    client that names both gets what it got before), and so does an unreadable q-value."""
    if not accept:
        return False
    text = accept.decode("latin-1") if isinstance(accept, bytes) else accept
    html_q = json_q = 0.0
    for part in text.split(","):
        media_type, *params = part.split(";")
        media_type = media_type.strip().lower()
        if media_type not in HTML_TYPES and media_type != "application/json":
            continue
        q = 1.0
        for param in params:
            key, _, value = param.partition("=")
            if key.strip().lower() == "q":
                try:
                    q = float(value)
                except ValueError:
                    q = 0.0
                if not 0.0 <= q <= 1.0:  # also NaN
                    q = 0.0
        if media_type in HTML_TYPES:
            html_q = max(html_q, q)
        else:
            json_q = max(json_q, q)
    return html_q > json_q


# --- the index page ----------------------------------------------------------------------


def _zeros(spec: TensorSpec) -> Any:
    """A batch of one for ``spec`` as JSON values, or None when it would be over MAX_EXAMPLE."""
    shape = [1 if size < 0 else size for size in spec.shape]
    if math.prod(shape) > MAX_EXAMPLE:
        return None
    value: Any = False if spec.datatype == "BOOL" else 0 if "INT" in spec.datatype else 0.0
    for size in reversed(shape):
        value = [value] * size
    return value


def example_body(inputs: Sequence[TensorSpec]) -> str | None:
    """A JSON body the model takes (zeros of its declared inputs), None when too large to read."""
    if not inputs or not all(declared(spec) for spec in inputs):  # the names at most: a guess
        return json.dumps({spec.name: [[1.0, 2.0, 3.0]] for spec in inputs} or {"x": [[1.0, 2.0, 3.0]]})
    values = {spec.name: _zeros(spec) for spec in inputs}
    if any(value is None for value in values.values()):
        return None
    return json.dumps(values)


def curl_line(url: str, body: str | None, token: bool) -> str:
    """A shell line that posts ``body`` (JSON) to ``url``, or an .npz file when ``body`` is None.
    Everything from outside is shell-quoted; the token is never written, only ``$STUDIO_TOKEN``."""
    words = ["curl -s -X POST", shlex.quote(url)]
    if token:
        words.append('-H "Authorization: Bearer $STUDIO_TOKEN"')
    if body is None:
        words += ["-H 'Content-Type: application/x-npz'", "--data-binary @body.npz"]
    else:
        words += ["-H 'Content-Type: application/json'", "-d", shlex.quote(body)]
    return " ".join(words)


def shape_text(spec: TensorSpec) -> str:
    if not declared(spec):
        return "not declared"
    return "(" + ", ".join("N" if size < 0 else str(size) for size in spec.shape) + ")"


def _rows(specs: Sequence[TensorSpec]) -> str:
    return "".join(f"<tr><td>{html.escape(s.name)}</td>"
                   f"<td>{html.escape(s.datatype if declared(s) else 'any')}</td>"
                   f"<td>{html.escape(shape_text(s))}</td></tr>" for s in specs)


def _model_card(state: ModelState, base_url: str, default: bool, token: bool) -> str:
    e = html.escape
    served = state.model
    badge = state.state if state.state in _STATES else ""
    heading = f'<h3>{e(state.name)}<span class="badge {badge}">{e(state.state)}</span>'
    if default:
        heading += '<span class="badge">default: POST /</span>'
    heading += "</h3>"
    facts = [("experiment", state.key)]
    inputs: Sequence[TensorSpec] = ()
    if served is not None:
        inputs = served.inputs
        facts += [("loader", served.platform),
                  ("checkpoint", served.checkpoint.name if served.checkpoint is not None else "none")]
    facts_html = "".join(f"<dt>{e(label)}</dt><dd>{e(value)}</dd>" for label, value in facts)
    if inputs:
        table = ('<table><thead><tr><th>input</th><th>datatype</th><th>shape</th></tr></thead>'
                 f"<tbody>{_rows(inputs)}</tbody></table>")
    else:
        table = '<p class="muted">inputs: not declared by the model (send the names it expects)</p>'
    body = example_body(inputs)
    url = base_url + "models/" + quote(state.name, safe="")
    note = ""
    if body is None:
        names = ", ".join(f"{s.name} {s.datatype} {s.shape}" for s in inputs)
        note = (f'<p class="muted">Too large for a JSON line: write body.npz with numpy.savez '
                f"({e(names)}; -1: any size) or use studio_plugins.client.predict.</p>")
    elif not all(declared(spec) for spec in inputs):
        note = ('<p class="muted">The model names its inputs but not their datatypes and shapes: '
                "the values above are a guess, put your own in.</p>")
    return (f'<div class="card model" id="model-{e(state.name)}">{heading}<dl>{facts_html}</dl>'
            f"{table}<pre>{e(curl_line(url, body, token))}</pre>{note}</div>")


def index_page(models: Sequence[ModelState], base_url: str, *, formats: Sequence[str], token: bool,
               version: str) -> str:
    """``GET /`` for a browser: every model (the first is the default for ``POST /``); ``formats``:
    the media types of the server's codecs."""
    cards = "".join(_model_card(state, base_url, i == 0, token) for i, state in enumerate(models))
    default = html.escape(models[0].name) if models else ""
    count = f"{len(models)} model{'s' if len(models) != 1 else ''}"
    return (
        '<!doctype html>\n<html lang="en"><head><meta charset="utf-8">'
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        f'<link rel="icon" href="data:,"><title>studio-plug: {count}</title>'
        f"<style>{STYLE}</style></head><body>"
        f"<header><h1>studio-plug {html.escape(version)}</h1>"
        f'<p>{count} &middot; <a href="docs">API docs</a> &middot; <a href="openapi.json">openapi.json'
        "</a></p></header><main>"
        f"<p><code>POST /</code> runs <b>{default}</b>; <code>POST /models/NAME</code> runs any model "
        f"below. Bodies: {', '.join(f'<code>{html.escape(f)}</code>' for f in formats)}; the reply "
        "comes in the request's format unless <code>Accept</code> names another.</p>"
        f"{cards}</main></body></html>"
    )


UNAUTHORIZED_PAGE = (
    '<!doctype html>\n<html lang="en"><head><meta charset="utf-8"><link rel="icon" href="data:,">'
    f"<title>studio-plug: token needed</title><style>{STYLE}</style></head><body>"
    "<header><h1>studio-plug</h1></header><main><p>This server needs its bearer token: send "
    "<code>Authorization: Bearer TOKEN</code> (the server's <code>--token</code>). In a browser, "
    '<a href="docs">the API docs</a> ask for it and show the models.</p></main></body></html>'
)
