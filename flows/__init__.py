"""Thin Prefect flows and the retune command line."""
