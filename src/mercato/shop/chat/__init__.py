"""Chat: rooms with members (an order's support room, staff-created rooms) and sequenced messages."""
