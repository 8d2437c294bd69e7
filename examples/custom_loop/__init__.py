"""Example: custom_loop."""
