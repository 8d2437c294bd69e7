"""Example: regression."""
