"""Built-in extra CLI commands (``studio_register_commands``)."""
