"""Prefect flows: the same DVC stages, scheduled and observed."""
