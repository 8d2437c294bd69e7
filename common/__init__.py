"""Code shared by the fedstream server and clients: codec, data, models, settings."""
