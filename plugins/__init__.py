"""Built-in plugins. Each module is an ordinary plugin: hookimpls and its own classes only."""
