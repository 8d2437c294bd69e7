"""Example: lora."""
