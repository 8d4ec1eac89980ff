"""Named pipe stages (fetch_url, decode_image, resize_to_model_input) and what ModelPipe.add takes."""

from __future__ import annotations

import io
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from typing import Any

import numpy as np
import pytest
from PIL import Image

from plugins.stages.builtin import FetchError, decode_image, fetch_url
from studio_plugins import ConfigurationError, LoadError, Stage, hookimpl
from studio_plugins.model_util import ModelPipe, model_input_shape, resize_to_model_input
from studio_plugins.testing import make_host


def png(width: int, height: int, mode: str = "RGB", seed: int = 0) -> bytes:
    rng = np.random.default_rng(seed)
    shape = (height, width, 3) if mode == "RGB" else (height, width)
    buffer = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8)).convert(mode).save(buffer, "PNG")
    return buffer.getvalue()


@pytest.fixture(scope="module")
def keras() -> Any:
    import keras

    return keras


def keras_model(keras: Any, shape: tuple[int, ...]) -> Any:
    inputs = keras.Input(shape)
    x = keras.layers.Flatten()(inputs)
    return keras.Model(inputs, keras.layers.Dense(2)(x))


# --- registration and lookup ------------------------------------------------------------------


def test_the_builtin_stages_are_registered() -> None:
    stages = make_host().stages()
    assert {"fetch_url", "decode_image", "resize_to_model_input"} <= set(stages)


def test_a_plugin_registers_a_stage_usable_by_name() -> None:
    class Shout:
        @hookimpl
        def studio_register_stages(self, register: Callable[[str, Stage], None]) -> None:
            register("shout", lambda text, suffix="!": text.upper() + suffix)

    pipe = ModelPipe(make_host(Shout()))
    pipe.add("shout", num_workers=2)
    assert pipe({"a": "hi", "b": "yo"}) == {"a": "HI!", "b": "YO!"}
    assert ModelPipe(make_host(Shout())).add(pipe.stage("shout", suffix="?"))(["x"]) == ["X?"]


def test_an_unknown_stage_name_lists_what_is_installed() -> None:
    with pytest.raises(ConfigurationError, match="no pipe stage named 'nope'") as info:
        ModelPipe(make_host()).add("nope")
    assert info.value.hint is not None and "fetch_url" in info.value.hint


def test_a_stage_that_needs_parameters_says_so_at_add() -> None:
    with pytest.raises(ConfigurationError, match="model") as info:
        ModelPipe(make_host()).add("resize_to_model_input")
    assert info.value.hint is not None and "pipe.stage" in info.value.hint


@pytest.mark.timeout(60)
def test_the_default_host_is_built_on_first_use_not_at_import() -> None:
    code = (
        "import studio_plugins.model_util as m\n"
        "assert m._default_host is None\n"
        "pipe = m.ModelPipe().add(lambda x: x)\n"
        "assert m._default_host is None\n"
        "pipe.add('decode_image', num_workers=1)\n"
        "assert m._default_host is not None\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr


# --- fetch_url -------------------------------------------------------------------------------------


def test_fetch_url_gets_the_body(http_site: Any) -> None:
    http_site.files["/a.bin"] = b"hello" * 1000
    assert fetch_url(http_site.url("/a.bin")) == b"hello" * 1000


def test_fetch_url_errors_are_clear(http_site: Any) -> None:
    with pytest.raises(FetchError, match="404"):
        fetch_url(http_site.url("/missing.png"))
    with pytest.raises(FetchError, match="only http and https"):
        fetch_url("file:///etc/passwd")
    with pytest.raises(FetchError, match="only http and https"):
        fetch_url("ftp://example.com/x")
    with pytest.raises(FetchError, match="not allowed"):
        fetch_url(http_site.url("/redirect?to=file:///etc/passwd"))
    with pytest.raises(FetchError, match="which is not http"):  # urllib alone would follow ftp
        fetch_url(http_site.url("/redirect?to=ftp://127.0.0.1:9/x"))
    with pytest.raises(FetchError, match="URL string"):
        fetch_url(b"http://x")  # type: ignore[arg-type]


def test_fetch_url_follows_http_redirects(http_site: Any) -> None:
    http_site.files["/target"] = b"here"
    assert fetch_url(http_site.url("/redirect?to=" + http_site.url("/target"))) == b"here"


def test_fetch_url_caps_the_size(http_site: Any) -> None:
    http_site.files["/big"] = b"x" * 5000
    with pytest.raises(FetchError, match="limit of 4000"):
        fetch_url(http_site.url("/big"), max_bytes=4000)
    assert len(fetch_url(http_site.url("/big"), max_bytes=5000)) == 5000


def test_fetch_url_caps_a_body_without_content_length() -> None:
    # A raw server that streams without Content-Length: the cap applies while reading.
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        port = listener.getsockname()[1]
        import threading

        def serve() -> None:
            connection, _ = listener.accept()
            with connection:
                connection.recv(4096)
                connection.sendall(b"HTTP/1.0 200 OK\r\n\r\n" + b"y" * 200_000)

        threading.Thread(target=serve, daemon=True).start()
        with pytest.raises(FetchError, match="more than the limit of 100000"):
            fetch_url(f"http://127.0.0.1:{port}/stream", max_bytes=100_000)


@pytest.mark.timeout(30)
def test_fetch_url_times_out(http_site: Any) -> None:
    started = time.monotonic()
    with pytest.raises(FetchError, match="timed out"):
        fetch_url(http_site.url("/never"), timeout=0.5)
    assert time.monotonic() - started < 5


def test_fetch_url_parameters_bind_through_pipe_stage(http_site: Any) -> None:
    http_site.files["/c.bin"] = b"z" * 100
    pipe = ModelPipe(make_host())
    pipe.add(pipe.stage("fetch_url", max_bytes=10), num_workers=2)
    assert pipe([http_site.url("/c.bin")]) == [None]


# --- decode_image -------------------------------------------------------------------------------


def test_decode_image_gives_a_decoded_pillow_image() -> None:
    image = decode_image(png(7, 5))
    assert isinstance(image, Image.Image) and image.size == (7, 5) and image.mode == "RGB"


def test_decode_image_refuses_what_is_not_an_image() -> None:
    with pytest.raises(ValueError, match="not a readable image"):
        decode_image(b"<html>nope</html>")
    with pytest.raises(ValueError, match="not a readable image"):
        decode_image(png(8, 8)[:60])  # truncated


# --- resize_to_model_input -------------------------------------------------------------------------


def test_resize_for_a_keras_colour_channels_last_model(keras: Any) -> None:
    model = keras_model(keras, (12, 10, 3))
    image = decode_image(png(30, 20))
    array = resize_to_model_input(model)(image)
    assert array.shape == (1, 12, 10, 3) and array.dtype == np.float32
    assert array.min() >= 0.0 and array.max() <= 1.0
    expected = np.asarray(image.resize((10, 12), Image.Resampling.BILINEAR), np.float32) / 255
    np.testing.assert_allclose(array[0], expected, atol=1e-6)


def test_resize_for_keras_grey_flat_and_channels_first_models(keras: Any) -> None:
    image = decode_image(png(9, 9))
    assert resize_to_model_input(keras_model(keras, (8, 8, 1)))(image).shape == (1, 8, 8, 1)
    assert resize_to_model_input(keras_model(keras, (8, 8)))(image).shape == (1, 8, 8)
    assert resize_to_model_input(keras_model(keras, (784,)))(image).shape == (1, 784)
    assert resize_to_model_input(keras_model(keras, (3, 6, 5)))(image).shape == (1, 3, 6, 5)
    flat_colour = resize_to_model_input(keras_model(keras, (3 * 4 * 4,)))(image)
    assert flat_colour.shape == (1, 48)
    # np.vstack batches several, as the batched model stage does
    batch = np.vstack([resize_to_model_input(keras_model(keras, (8, 8, 1)))(image)] * 3)
    assert batch.shape == (3, 8, 8, 1)


def test_resize_keeps_the_image_size_where_the_model_does_not_fix_it(keras: Any) -> None:
    inputs = keras.Input((None, None, 3))
    model = keras.Model(inputs, keras.layers.GlobalAveragePooling2D()(inputs))
    image = decode_image(png(6, 4))
    assert resize_to_model_input(model)(image).shape == (1, 4, 6, 3)


def test_resize_for_torch_modules() -> None:
    import torch

    conv = torch.nn.Sequential(torch.nn.Conv2d(3, 2, 3), torch.nn.Flatten())
    image = decode_image(png(6, 5))
    array = resize_to_model_input(conv)(image)
    assert array.shape == (1, 3, 5, 6)  # channels first, the image's own size
    assert model_input_shape(torch.nn.Linear(64, 2)) == (64,)
    assert resize_to_model_input(torch.nn.Linear(64, 2))(image).shape == (1, 64)
    grey = resize_to_model_input(conv, input_shape=(1, 8, 8))(image)
    assert grey.shape == (1, 1, 8, 8)
    assert resize_to_model_input(torch.nn.ReLU(), input_shape=(3, 4, 4))(image).shape == (1, 3, 4, 4)


def test_resize_errors_are_clear(keras: Any) -> None:
    import torch

    with pytest.raises(LoadError, match="cannot tell the input shape") as info:
        resize_to_model_input(torch.nn.ReLU())
    assert info.value.hint is not None and "input_shape" in info.value.hint
    with pytest.raises(LoadError, match="does not look like an image"):
        resize_to_model_input(keras_model(keras, (7, 7, 7, 7)))
    with pytest.raises(TypeError, match="Pillow image or a uint8 array"):
        resize_to_model_input(None, input_shape=(4, 4))("a string")


def test_resize_takes_uint8_arrays_too() -> None:
    array = np.full((10, 10, 3), 255, np.uint8)
    out = resize_to_model_input(None, input_shape=(5, 5, 1))(array)
    assert out.shape == (1, 5, 5, 1) and np.allclose(out, 1.0)


# --- models passed to add ------------------------------------------------------------------------


def test_a_keras_model_is_called_through_predict(keras: Any) -> None:
    model = keras_model(keras, (4,))
    rows = np.random.default_rng(1).random((5, 4)).astype(np.float32)
    pipe = ModelPipe(make_host()).add(lambda row: row[None, :]).add(
        model, num_workers=1, batch_size=2, batcher=np.vstack
    )
    result = pipe({f"r{i}": rows[i] for i in range(5)})
    expected = model.predict(rows, verbose=0)
    for i in range(5):
        np.testing.assert_allclose(result[f"r{i}"], expected[i], rtol=1e-5, atol=1e-6)


def test_a_torch_module_is_called_under_inference_mode() -> None:
    import torch

    torch.manual_seed(0)
    module = torch.nn.Sequential(torch.nn.Linear(3, 2), torch.nn.Dropout(0.5))
    module.train()
    rows = np.random.default_rng(2).random((4, 3))  # float64: cast to the module's dtype
    pipe = ModelPipe(make_host()).add(module, batch_size=4, batcher=np.vstack)
    result = pipe([row[None, :] for row in rows])
    with torch.no_grad():
        expected = module.eval()(torch.as_tensor(rows, dtype=torch.float32)).numpy()
    assert all(isinstance(r, np.ndarray) for r in result)
    np.testing.assert_allclose(np.stack(result), expected, rtol=1e-5)  # dropout off: eval mode


def test_the_seed_pipeline_in_process(http_site: Any, keras: Any) -> None:
    model = keras_model(keras, (8, 8, 3))
    http_site.files["/one.png"] = png(20, 10, seed=1)
    http_site.files["/two.png"] = png(8, 8, "L", seed=2)
    pipe = ModelPipe(make_host())
    pipe.add("fetch_url", num_workers=4, timeout=5)
    pipe.add("decode_image")
    pipe.add(resize_to_model_input(model))
    pipe.add(model, num_workers=1, batch_size=32, batcher=np.vstack)
    result = pipe({"one": http_site.url("/one.png"), "two": http_site.url("/two.png"),
                   "gone": http_site.url("/gone.png")})
    assert result["gone"] is None
    resize = resize_to_model_input(model)
    images = [decode_image(http_site.files[p]) for p in ("/one.png", "/two.png")]
    expected = model.predict(np.vstack([resize(image) for image in images]), verbose=0)
    np.testing.assert_allclose(result["one"], expected[0], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(result["two"], expected[1], rtol=1e-5, atol=1e-6)
