"""Real-time delivery: connections, channels, fan-out across processes, presence, backpressure.

    hub = Hub(broker, history, node_id="api-1")        # one per process; `await hub.start()`
    WebSocketSession(websocket, hub, authenticate=..., authorize=..., handlers={...}).run()
    channel_event_response(hub, user=..., channel="order:<id>", since=..., ...)   # SSE

Every sequenced event is durable in a `History` before it is published on the `Broker`; each
connection delivers a channel's events exactly once, in seq order, refilling gaps from history;
its outbound queue is bounded (see `queue.py`). No shop knowledge here.
"""

from mercato.kit.realtime.admission import GatedHistory, HistoryBusy, HistoryGate
from mercato.kit.realtime.broker import Broker, Subscription
from mercato.kit.realtime.connection import Connection
from mercato.kit.realtime.events import ChannelEvent, History
from mercato.kit.realtime.history import SqlChannelHistory
from mercato.kit.realtime.hub import Hub
from mercato.kit.realtime.metrics import NullRealtimeHook, PrometheusRealtimeHook, RealtimeHook
from mercato.kit.realtime.nats_broker import NatsBroker
from mercato.kit.realtime.queue import Offer, OutboundQueue
from mercato.kit.realtime.redis_broker import RedisBroker
from mercato.kit.realtime.sql_broker import SqlBroker
from mercato.kit.realtime.sse import channel_event_response, parse_last_event_id
from mercato.kit.realtime.ws import CloseCode, FrameError, FrameHandler, SessionSettings, WebSocketSession

__all__ = [
    "Broker",
    "ChannelEvent",
    "CloseCode",
    "Connection",
    "FrameError",
    "FrameHandler",
    "GatedHistory",
    "History",
    "HistoryBusy",
    "HistoryGate",
    "Hub",
    "NatsBroker",
    "NullRealtimeHook",
    "Offer",
    "OutboundQueue",
    "PrometheusRealtimeHook",
    "RealtimeHook",
    "RedisBroker",
    "SessionSettings",
    "SqlBroker",
    "SqlChannelHistory",
    "Subscription",
    "WebSocketSession",
    "channel_event_response",
    "parse_last_event_id",
]
