"""Mercato: an e-commerce backend built on a reusable platform kit."""

__version__ = "0.1.0"
