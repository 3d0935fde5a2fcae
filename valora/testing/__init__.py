"""Builders of tiny random checkpoints and adapters, for tests and the first-use demo model."""
