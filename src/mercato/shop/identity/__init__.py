"""Identity: accounts, passwords, access and refresh tokens, roles and scopes."""
