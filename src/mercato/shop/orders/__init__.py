"""Orders: orders placed from a cart and their lines."""
