"""The platform kit: generic building blocks with no knowledge of the shop."""
