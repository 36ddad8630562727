"""A test helper: an engine wrapper that keeps every batch it was sent (to check batching)."""

from __future__ import annotations


class Recording:
    """Forwards to a real engine and keeps every batch it was sent."""

    def __init__(self, engine):
        self.engine, self.batches = engine, []
        self.counters = engine.counters

    def generate(self, requests, progress=False):
        self.batches.append(list(requests))
        return self.engine.generate(requests, progress)
