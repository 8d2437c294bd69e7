"""Runnable examples of fedstream tasks (each folder has a README)."""
