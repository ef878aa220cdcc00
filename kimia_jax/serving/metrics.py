"""Prometheus metrics of one engine (its own registry, so several engines can live in a process).

queue length, active slots, generated tokens (a counter: rate() gives tokens/s) and the last
tick's tokens/s, time to first token, time to first audio chunk, seconds of audio streamed,
requests by how they ended, requests refused as busy.
"""

from __future__ import annotations

import prometheus_client as prom

_LATENCY_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0)


class EngineMetrics:
    def __init__(self, slots: int):
        self.registry = prom.CollectorRegistry()
        r = self.registry
        self.queue_length = prom.Gauge(
            "kimia_queue_length", "Requests waiting for a slot.", registry=r
        )
        self.active_slots = prom.Gauge("kimia_active_slots", "Slots holding a request.", registry=r)
        self.slots = prom.Gauge("kimia_slots", "Decode slots of the engine.", registry=r)
        self.slots.set(slots)
        self.tokens = prom.Counter(
            "kimia_generated_tokens",
            "Decode steps run for requests (one text + one audio token each).",
            registry=r,
        )
        self.tokens_per_second = prom.Gauge(
            "kimia_tokens_per_second", "Decode steps per second over the last tick.", registry=r
        )
        self.ttft = prom.Histogram(
            "kimia_time_to_first_token_seconds",
            "Submit to the first sampled token.",
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.first_audio = prom.Histogram(
            "kimia_time_to_first_audio_seconds",
            "Submit to the first 24 kHz audio chunk.",
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.audio_seconds = prom.Counter(
            "kimia_audio_seconds",
            "Seconds of 24 kHz speech streamed to clients (rate() over wall time: how many "
            "real-time streams the detokenizer sustains).",
            registry=r,
        )
        self.requests = prom.Counter(
            "kimia_requests", "Finished requests by reason.", ["reason"], registry=r
        )
        self.rejected = prom.Counter(
            "kimia_rejected_busy", "Requests refused: queue full.", registry=r
        )

    def step_time(self, seconds: float, steps: int) -> None:
        """A tick ran `steps` decode steps (all rows together) in `seconds`."""
        if seconds > 0:
            self.tokens_per_second.set(steps / seconds)

    def text(self) -> bytes:
        return prom.generate_latest(self.registry)
