"""Inventory: stock per SKU and reservations that never oversell."""
