"""Compression stage: the Table interface, its kinds, and the method registry."""
