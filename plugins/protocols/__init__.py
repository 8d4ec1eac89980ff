"""Wire protocols served as routes on the same data plane (``studio_register_routes``)."""
