"""Checkout: turns a cart into a paid, shipped order through the order saga."""
