"""A Patroni/etcd cluster for the HA tests: started once per module in a /tmp folder the PostgreSQL OS
user can reach (pytest's own tmp folders are 0700), torn down and deleted at the end."""

from __future__ import annotations

import asyncio
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from mercato.cluster import Topology, cluster_down, cluster_up


def need_ha_binaries() -> None:
    for binary in ("etcd", "patroni"):
        if shutil.which(binary) is None:
            pytest.skip(f"{binary} not installed (apt-get install etcd-server patroni)")


@contextmanager
def running_cluster(
    *, synchronous_mode: bool = False, nats_cluster: bool = False, backups: bool = False, members: int = 3
) -> Iterator[Topology]:
    need_ha_binaries()
    if backups and shutil.which("pgbackrest") is None:
        pytest.skip("pgbackrest not installed")
    root = Path(tempfile.mkdtemp(prefix="mercato-ha-test-"))
    root.chmod(0o755)
    try:
        yield cluster_up(
            root / "cluster",
            synchronous_mode=synchronous_mode,
            nats_cluster=nats_cluster,
            backups=backups,
            members=members,
        )
    finally:
        cluster_down(root / "cluster", purge=True)
        shutil.rmtree(root, ignore_errors=True)


async def shop_history(url: str, data_dir: Path, *, completed: int = 2, declined: int = 1) -> list[str]:
    """Real checkouts on the shop database at `url` (migrated): the simulated PSP and carrier serve on
    free ports in this loop, a saga runner drives each order to its end. `completed` orders are paid
    and shipped, `declined` ones are compensated (stock released, order cancelled). Their ids."""
    import random
    import uuid

    from mercato.bootstrap import build_container
    from mercato.config import CheckoutSettings
    from mercato.demo.seed import demo_products
    from mercato.kit.ports import free_port
    from mercato.providers.config import ProviderSettings
    from mercato.providers.server import serve_providers
    from mercato.workers.sagas import build_saga_runner
    from tests.conftest import make_settings
    from tests.integration.provider_support import warm_up

    providers_settings = ProviderSettings(
        psp_port=free_port(), carrier_port=free_port(), data_dir=data_dir, graceful_shutdown_s=1
    )
    settings = make_settings(
        url,
        providers=providers_settings,
        checkout=CheckoutSettings(provider_timeout_s=2.0, provider_attempts=3, saga_deadline_s=60),
    )
    providers = await serve_providers(providers_settings)
    await warm_up(providers_settings.psp_base_url, providers_settings.carrier_base_url)
    container = build_container(settings)
    ids: list[str] = []
    try:
        [product] = await container.catalog.create_many(demo_products(1, random.Random(9)))
        await container.inventory.set_available(product.sku, 20)
        runner = build_saga_runner(container, owner="ha-test-runner")
        for n in range(completed + declined):
            customer = uuid.uuid4()
            await container.cart.set_item(customer, product.sku, 2)
            order = await container.checkout.start(
                customer, correlation_id="ha-test", card_token="tok_decline" if n >= completed else None
            )
            for _ in range(300):
                await runner.run_once()
                saga = await container.sagas.get(order.id)
                if saga is not None and saga.status.terminal:
                    break
                await asyncio.sleep(0.02)
            else:
                raise AssertionError(f"order {order.id}: saga did not finish")
            ids.append(str(order.id))
    finally:
        await container.close()
        await providers.stop()
    return ids
