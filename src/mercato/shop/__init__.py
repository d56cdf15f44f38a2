"""The shop's bounded contexts, each owning its own tables."""
