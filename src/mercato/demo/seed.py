"""Demo data for embedded mode: a browsable catalog with stock, an admin and a few customers.

Deterministic for a given random seed, so two fresh installs show the same shop.
"""

from __future__ import annotations

import random
import string
from dataclasses import dataclass, field

from rich.progress import Progress

from mercato.bootstrap import SEED_MARKER, Container
from mercato.config import SeedSettings
from mercato.kit.storage import get_meta, set_meta
from mercato.shop.catalog.model import NewProduct, Product
from mercato.shop.identity.contracts import Role
from mercato.shop.identity.model import EmailTaken

CATEGORIES = {
    "books": ("Novel", "Cookbook", "Atlas", "Biography", "Anthology", "Guide"),
    "electronics": ("Headphones", "Speaker", "Charger", "Keyboard", "Mouse", "Monitor"),
    "kitchen": ("Kettle", "Pan", "Knife", "Grinder", "Teapot", "Blender"),
    "garden": ("Trowel", "Planter", "Hose", "Shears", "Lantern", "Bench"),
    "toys": ("Puzzle", "Kite", "Robot", "Train", "Blocks", "Doll"),
    "sports": ("Racket", "Ball", "Helmet", "Mat", "Bottle", "Gloves"),
    "fashion": ("Jacket", "Scarf", "Sneakers", "Hat", "Belt", "Backpack"),
    "home": ("Lamp", "Rug", "Clock", "Mirror", "Cushion", "Vase"),
    "beauty": ("Soap", "Serum", "Brush", "Balm", "Comb", "Oil"),
    "office": ("Notebook", "Pen", "Stapler", "Desk Organizer", "Chair", "Planner"),
    "pets": ("Leash", "Bowl", "Bed", "Toy", "Brush", "Carrier"),
    "music": ("Guitar Strings", "Capo", "Tuner", "Metronome", "Drumsticks", "Harmonica"),
}
ADJECTIVES = (
    "Classic",
    "Compact",
    "Deluxe",
    "Eco",
    "Everyday",
    "Handmade",
    "Heavy-Duty",
    "Lightweight",
    "Modern",
    "Nordic",
    "Premium",
    "Rustic",
    "Smart",
    "Travel",
    "Vintage",
    "Wireless",
)
COLORS = ("black", "white", "red", "blue", "green", "grey", "oak", "sand")


@dataclass
class SeedReport:
    products: int = 0
    already_seeded: bool = False
    credentials: list[tuple[str, str, str]] = field(default_factory=list)


def demo_products(count: int, rng: random.Random) -> list[NewProduct]:
    categories = sorted(CATEGORIES)
    out = []
    for n in range(count):
        category = categories[n % len(categories)]
        noun = rng.choice(CATEGORIES[category])
        adjective = rng.choice(ADJECTIVES)
        color = rng.choice(COLORS)
        out.append(
            NewProduct(
                sku=f"{category[:3].upper()}-{n + 1:06d}",
                name=f"{adjective} {noun}",
                description=f"A {adjective.lower()} {noun.lower()} in {color}.",
                price_minor=rng.randrange(199, 50000, 100),
                currency="EUR",
                category=category,
                attributes={"color": color, "weight_g": rng.randrange(50, 5000, 10)},
            )
        )
    return out


def demo_stock(products: list[Product], rng: random.Random) -> list[tuple[str, int]]:
    """Units per SKU: 0..200, with about one product in twenty sold out so the shop shows that case."""
    return [(p.sku, 0 if rng.random() < 0.05 else rng.randint(1, 200)) for p in products]


async def seed_stock(
    container: Container, products: list[Product], rng: random.Random, *, progress: Progress | None = None
) -> None:
    levels = demo_stock(products, rng)
    task = progress.add_task("Seeding stock", total=len(levels)) if progress else None
    batch_size = 500
    for start in range(0, len(levels), batch_size):
        batch = levels[start : start + batch_size]
        await container.inventory.set_available_many(batch)
        if progress is not None and task is not None:
            progress.advance(task, len(batch))


def demo_password(rng: random.Random) -> str:
    """A 16-character demo password: reproducible for a given seed, yet not a guessable constant."""
    alphabet = string.ascii_letters + string.digits
    return "".join(rng.choice(alphabet) for _ in range(16))


def demo_accounts(settings: SeedSettings) -> list[tuple[Role, str, str]]:
    """The admin from settings plus `settings.customers` customers, with their passwords."""
    # Its own generator, so customer passwords do not change when the product count does.
    rng = random.Random(f"{settings.random_seed}-accounts")
    accounts = [(Role.ADMIN, settings.admin_email, settings.admin_password.get_secret_value())]
    accounts += [
        (Role.CUSTOMER, f"customer{n}@mercato.local", demo_password(rng))
        for n in range(1, settings.customers + 1)
    ]
    return accounts


async def seed_accounts(
    container: Container, report: SeedReport, *, progress: Progress | None = None
) -> None:
    """The admin from settings plus `seed.customers` customers.

    Accounts that already exist (a seed interrupted before its marker was written) are left as
    they are and not reported, since the password printed would not be theirs.
    """
    accounts = demo_accounts(container.settings.seed)
    task = progress.add_task("Seeding accounts", total=len(accounts)) if progress else None
    for role, email, password in accounts:
        try:
            user = await container.identity.create_user(email, password, role=role)
        except EmailTaken:
            pass
        else:
            report.credentials.append((role.value, user.email, password))
        if progress is not None and task is not None:
            progress.advance(task)


async def seed_demo(container: Container, *, progress: Progress | None = None) -> SeedReport:
    """Seed once: a marker in `platform_meta` makes a second run a no-op."""
    settings = container.settings.seed
    report = SeedReport()
    async with container.db.read() as conn:
        if await get_meta(conn, SEED_MARKER):
            report.already_seeded = True
            # Deterministic, so they can be shown again on every start of the demo.
            report.credentials = [(r.value, e, p) for r, e, p in demo_accounts(settings)]
            return report
    rng = random.Random(settings.random_seed)
    drafts = demo_products(settings.products, rng)
    task = progress.add_task("Seeding catalog", total=len(drafts)) if progress else None
    batch_size = 200
    created: list[Product] = []
    for start in range(0, len(drafts), batch_size):
        created.extend(await container.catalog.create_many(drafts[start : start + batch_size]))
        if progress is not None and task is not None:
            progress.advance(task, min(batch_size, len(drafts) - start))
    report.products = len(created)
    await seed_stock(container, created, rng, progress=progress)
    await seed_accounts(container, report, progress=progress)
    async with container.db.write() as conn:
        await set_meta(conn, SEED_MARKER, container.clock.now().isoformat(), now=container.clock.now())
    return report
