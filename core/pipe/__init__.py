"""The stage engine behind ``studio_plugins.model_util.ModelPipe``."""
