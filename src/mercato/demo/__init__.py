"""Demo data for embedded mode: a browsable shop on first start."""

from mercato.demo.seed import SeedReport, demo_accounts, demo_products, seed_demo

__all__ = ["SeedReport", "demo_accounts", "demo_products", "seed_demo"]
