"""Shipped recipes (TOML files), readable with importlib.resources."""
