"""A model with a fixed cost per call that reports, per row, how many rows its call had."""

import time

import numpy as np


def create_model(modeldir):
    def model(data):
        x = data["x"]
        time.sleep(0.05)  # fixed overhead per call: concurrent requests pile up and get batched
        return {"y": x * 2, "rows_in_call": np.full(x.shape[0], x.shape[0])}

    model.batchable = True  # its rows are independent: concurrent requests may share a call
    return model
