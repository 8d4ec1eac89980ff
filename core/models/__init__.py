"""Models: an experiment key -> its modeldir -> a loaded model -> the served slots."""
