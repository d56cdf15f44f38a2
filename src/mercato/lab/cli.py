"""`mercato lab <experiment>`: each command runs one experiment and prints/plots its result."""

from __future__ import annotations

import typer

from mercato.lab.breaker_cli import breaker_command
from mercato.lab.cache_policy import cache_policy_command
from mercato.lab.chaos_cli import chaos_command
from mercato.lab.delivery import delivery_command
from mercato.lab.failover_cli import failover_command, restore_command
from mercato.lab.leader import leader_command
from mercato.lab.network_cli import network_command
from mercato.lab.outage import outage_command
from mercato.lab.overload import overload_command
from mercato.lab.partition import partition_command
from mercato.lab.ratelimit import ratelimit_command
from mercato.lab.slow_consumer import slow_consumer_command
from mercato.lab.stampede import stampede_command

app = typer.Typer(help="Experiments that measure the guide's claims.", no_args_is_help=True)
app.command("breaker")(breaker_command)
app.command("cache-policy")(cache_policy_command)
app.command("chaos")(chaos_command)
app.command("delivery")(delivery_command)
app.command("failover")(failover_command)
app.command("leader")(leader_command)
app.command("restore")(restore_command)
app.command("network")(network_command)
app.command("outage")(outage_command)
app.command("overload")(overload_command)
app.command("partition")(partition_command)
app.command("ratelimit")(ratelimit_command)
app.command("slow-consumer")(slow_consumer_command)
app.command("stampede")(stampede_command)
