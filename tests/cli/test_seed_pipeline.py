"""The seed's second example end to end: image URLs in, Keras predictions out, through a real server.

A small Keras image model is saved into the experiment's modeldir; a wrapper file loads the newest
checkpoint and builds ModelPipe -> fetch_url (4 workers, deadline) -> decode_image ->
resize_to_model_input(model) -> model (batches of 32 via np.vstack). PNGs come from the test's
own HTTP server on 127.0.0.1, which also has a URL that 404s and one that never answers.
"""

from __future__ import annotations

import io
import os
import time
from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest
from PIL import Image

from studio_plugins.client import predict
from studio_plugins.model_util import resize_to_model_input
from studio_plugins.testing import ServerProcess

FETCH_DEADLINE = 3.0

WRAPPER = f'''
import glob
import os

import numpy as np

os.environ.setdefault("KERAS_BACKEND", "torch")
import keras

from studio_plugins import model_util


def create_model(modeldir):
    # load the latest Keras checkpoint
    checkpoints = [(p, os.path.getmtime(p)) for p in glob.glob(os.path.join(modeldir, "*.keras"))]
    last_checkpoint = max(checkpoints, key=lambda t: t[1])[0]
    model = keras.models.load_model(last_checkpoint, compile=False)

    # create the model pipe
    pipe = model_util.ModelPipe()
    pipe.add("fetch_url", num_workers=4, timeout={FETCH_DEADLINE})
    pipe.add("decode_image")
    pipe.add(model_util.resize_to_model_input(model))
    pipe.add(model, num_workers=1, batch_size=32, batcher=np.vstack)
    return pipe
'''

SIZES = [(24, 24, "RGB"), (40, 30, "RGB"), (17, 50, "L"), (64, 64, "RGBA"), (8, 12, "RGB")]


def png(width: int, height: int, mode: str, seed: int) -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).convert(mode).save(buffer, "PNG")
    return buffer.getvalue()


def image_model(keras: Any, seed: int) -> Any:
    keras.utils.set_random_seed(seed)
    inputs = keras.Input((24, 24, 3))
    x = keras.layers.Conv2D(4, 3, activation="relu")(inputs)
    x = keras.layers.GlobalAveragePooling2D()(x)
    return keras.Model(inputs, keras.layers.Dense(5, activation="softmax")(x))


@pytest.fixture(scope="module")
def seed_setup(tmp_path_factory: pytest.TempPathFactory, http_site: Any) -> Iterator[dict[str, Any]]:
    import keras

    home = tmp_path_factory.mktemp("studioml")
    modeldir = home / "experiments" / "images" / "modeldir"
    modeldir.mkdir(parents=True)
    older = modeldir / "epoch-1.keras"
    image_model(keras, 1).save(older)
    os.utime(older, (time.time() - 3600, time.time() - 3600))
    newest = image_model(keras, 2)
    newest.save(modeldir / "epoch-2.keras")
    wrapper = home / "image_wrapper.py"
    wrapper.write_text(WRAPPER)

    images = {}
    for index in range(40):  # more than one batch of 32
        width, height, mode = SIZES[index % len(SIZES)]
        path = f"/img/{index}.png"
        http_site.files[path] = png(width, height, mode, seed=index)
        images[f"img{index}"] = path
    env = {"STUDIOML_HOME": str(home), "KERAS_BACKEND": "torch"}
    with ServerProcess("images", "--wrapper", str(wrapper), "--threads", "2", env=env) as server:
        yield {"server": server, "model": newest, "images": images, "site": http_site}


def expected_outputs(setup: dict[str, Any], keys: list[str]) -> np.ndarray:
    """The model run directly on the same images, resized the same way."""
    model = setup["model"]
    resize = resize_to_model_input(model)
    files = setup["site"].files
    arrays = [resize(Image.open(io.BytesIO(files[setup["images"][key]]))) for key in keys]
    return np.asarray(model.predict(np.vstack(arrays), verbose=0))


@pytest.mark.timeout(180)
def test_image_urls_answer_what_the_newest_model_answers(seed_setup: dict[str, Any]) -> None:
    site = seed_setup["site"]
    keys = list(seed_setup["images"])
    request = {key: site.url(seed_setup["images"][key]) for key in keys}
    result = predict(seed_setup["server"].url, request, timeout=60)
    assert list(result) == keys
    expected = expected_outputs(seed_setup, keys)
    for index, key in enumerate(keys):
        assert result[key].shape == (5,)
        np.testing.assert_allclose(result[key], expected[index], rtol=1e-4, atol=1e-6)


@pytest.mark.timeout(180)
def test_a_404_and_a_url_that_never_answers_are_none_within_the_deadline(
    seed_setup: dict[str, Any],
) -> None:
    site = seed_setup["site"]
    good = ["img0", "img1", "img2", "img3"]
    request = {key: site.url(seed_setup["images"][key]) for key in good}
    request |= {"missing": site.url("/img/missing.png"), "silent": site.url("/never")}
    started = time.monotonic()
    result = predict(seed_setup["server"].url, request, timeout=60)
    elapsed = time.monotonic() - started
    assert result["missing"] is None and result["silent"] is None
    assert result.failed == ("missing", "silent")  # X-Studio-Failed-Keys: failures, not answers
    expected = expected_outputs(seed_setup, good)
    for index, key in enumerate(good):
        np.testing.assert_allclose(result[key], expected[index], rtol=1e-4, atol=1e-6)
    # The silent URL costs the fetch deadline, not the fetch's own (longer) socket timeout.
    assert FETCH_DEADLINE <= elapsed < FETCH_DEADLINE + 3.0
    log = "\n".join(seed_setup["server"].stderr_lines)
    assert "'silent' took longer than 3s" in log and "'missing'" in log and "404" in log

