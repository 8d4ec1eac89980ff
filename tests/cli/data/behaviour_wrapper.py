"""A wrapper whose behaviour the request chooses: sleep, fail, or answer something odd."""

import time

import numpy as np


def create_model(modeldir):
    def model(data):
        if "sleep" in data:
            time.sleep(float(np.asarray(data["sleep"]).reshape(-1)[0]))
        if "fail" in data:
            raise ValueError("boom: the model failed on purpose")
        if "notdict" in data:
            return [1, 2, 3]
        if "object" in data:
            return {"out": object()}
        return {key: value for key, value in data.items() if key != "sleep"} | {"done": True}

    return model
