"""The fedstream client: receives the global model, trains locally, uploads its delta."""
