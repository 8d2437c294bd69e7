"""The fedstream aggregation server."""
