"""Catalog: products, prices, categories and search."""
