"""A periodic INFO line while the engine has work (vLLM's "Avg prompt throughput ..." line), and the logging
config that gives server (uvicorn) and engine/deltaserve logs one format.

The line carries only counts and rates, never prompt or output text.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

log = logging.getLogger("deltaserve.stats")


class StatsLogger:
    """Turns successive `engine.stats()` snapshots into throughput lines. `line()` mutates the previous
    snapshot it compares against; it returns None while there is nothing to report (idle and nothing new)."""

    def __init__(self, clock=time.monotonic):
        self.clock = clock
        self.prev: dict[str, Any] | None = None
        self.t_prev = 0.0

    def line(self, s: dict[str, Any]) -> str | None:
        now = self.clock()
        prev, dt = self.prev, now - self.t_prev
        self.prev, self.t_prev = s, now
        if prev is None or dt <= 0:
            return None
        prompt = s.get("prompt_tokens", 0) - prev.get("prompt_tokens", 0)
        gen = s.get("generated_tokens", 0) - prev.get("generated_tokens", 0)
        running, waiting = s.get("running", 0), s.get("waiting", 0)
        if not (prompt or gen or running or waiting):
            return None
        cached = s.get("cached_tokens", 0) - prev.get("cached_tokens", 0)
        kv = s.get("kv_slots_used", 0) / s["kv_slots_total"] if s.get("kv_slots_total") else 0.0
        hit = f"{100 * cached / prompt:.1f}%" if prompt else "n/a"
        return (f"Avg prompt throughput: {prompt / dt:.1f} tokens/s, Avg generation throughput: {gen / dt:.1f} "
                f"tokens/s, Running: {running} reqs, Waiting: {waiting} reqs, KV usage: {100 * kv:.1f}%, "
                f"Prefix cache hit rate: {hit}")


async def log_stats_forever(stats, interval: float) -> None:
    """Every `interval` seconds log a line from `await stats()` (AsyncEngine.stats) while there is work."""
    logger = StatsLogger()
    while True:
        try:
            text = logger.line(await stats())
        except Exception as e:  # the engine stopped: the loop ends with the app
            log.debug("stats unavailable: %s", e)
            text = None
        if text:
            log.info(text)
        await asyncio.sleep(interval)


def logging_config(level: str = "info") -> dict[str, Any]:
    """uvicorn's default logging config with the `deltaserve` loggers on its default formatter and handler."""
    from uvicorn.config import LOGGING_CONFIG

    cfg = {**LOGGING_CONFIG, "formatters": dict(LOGGING_CONFIG["formatters"]),
           "loggers": dict(LOGGING_CONFIG["loggers"])}
    cfg["formatters"]["default"] = {**cfg["formatters"]["default"],
                                    "fmt": "%(asctime)s %(levelprefix)s %(name)s: %(message)s"}
    cfg["loggers"]["deltaserve"] = {"handlers": ["default"], "level": level.upper(), "propagate": False}
    return cfg
