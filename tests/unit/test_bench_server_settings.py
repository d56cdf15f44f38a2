"""`--setting MERCATO_NAME=VALUE` of `mercato bench checkout` / `bench realtime`: pairs for the
servers' environment, and a clear refusal of anything else (a typo must not measure the defaults)."""

from __future__ import annotations

import pytest

from mercato.bench.servers import server_settings


def test_settings_become_name_value_pairs_in_order() -> None:
    assert server_settings(None) == ()
    assert server_settings(["MERCATO_WORKER_SIDE_JOB_WINDOW_S=0.25", "MERCATO_X=a=b"]) == (
        ("MERCATO_WORKER_SIDE_JOB_WINDOW_S", "0.25"),
        ("MERCATO_X", "a=b"),
    )


@pytest.mark.parametrize("item", ["WORKER_SIDE_JOB_WINDOW_S=0.25", "MERCATO_X", "MERCATO_=1", "=1"])
def test_anything_but_a_mercato_setting_is_refused(item: str) -> None:
    with pytest.raises(ValueError, match="MERCATO_NAME=VALUE"):
        server_settings([item])
