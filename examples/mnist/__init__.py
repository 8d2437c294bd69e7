"""Example: mnist."""
