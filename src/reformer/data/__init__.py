"""Datasets: byte-level text (text.py)."""
