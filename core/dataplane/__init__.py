"""The data plane: admission, deadlines, batching and metrics around a model call."""
