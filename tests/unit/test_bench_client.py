"""The generator's pure parts: request bytes, response framing and its guard rails."""

from __future__ import annotations

import time

import pytest

from mercato.bench.client import GeneratorConfig, ResponseParser, build_request


def test_build_request_is_a_keep_alive_get() -> None:
    raw = build_request("127.0.0.1", 8000, "/v1/products?limit=20")
    assert raw.startswith(b"GET /v1/products?limit=20 HTTP/1.1\r\nHost: 127.0.0.1:8000\r\n")
    assert raw.endswith(b"\r\n\r\n")
    assert b"connection: close" not in raw.lower()


def test_parser_frames_content_length_bodies_across_reads() -> None:
    parser = ResponseParser()
    response = b'HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 11\r\n\r\n{"a": "bc"}'
    assert not parser.feed(response[:20])
    assert not parser.feed(response[20:-3])
    assert parser.feed(response[-3:])
    assert parser.status == 200
    assert parser.keep_alive
    parser.reset()
    assert parser.feed(b"HTTP/1.1 404 Not Found\r\ncontent-length: 0\r\nconnection: close\r\n\r\n")
    assert parser.status == 404
    assert not parser.keep_alive


def test_parser_frames_chunked_bodies() -> None:
    parser = ResponseParser()
    assert not parser.feed(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n")
    assert not parser.feed(b"6\r\n world\r\n0\r\n")
    assert parser.feed(b"\r\n")
    assert parser.status == 200


def test_parser_rejects_unframed_bodies() -> None:
    with pytest.raises(ValueError):
        ResponseParser().feed(b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\n\r\nabc")


def test_only_loopback_127_0_0_1_is_a_target() -> None:
    base = {"port": 1, "paths": ("/x",), "rate_per_s": 1.0, "duration_s": 1.0, "t0_s": time.monotonic()}
    assert GeneratorConfig(**base).host == "127.0.0.1"  # type: ignore[arg-type]
    for host in ("10.0.0.1", "example.com", "0.0.0.0"):
        with pytest.raises(ValueError, match="only targets"):
            GeneratorConfig(**base, host=host)  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        GeneratorConfig(**{**base, "paths": ()})  # type: ignore[arg-type]


def test_config_shares_its_timetable_by_process_index() -> None:
    base = {"port": 1, "paths": ("/x",), "rate_per_s": 100.0, "duration_s": 1.0, "t0_s": 50.0}
    shares = [GeneratorConfig(**base, processes=2, index=k).timetable() for k in range(2)]  # type: ignore[arg-type]
    assert [s.count for s in shares] == [50, 50]
    assert shares[1].due_s(0) == 50.01
