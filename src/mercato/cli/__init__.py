"""The `mercato` command line."""
