"""How one model version batches (`BatchPolicy`): the batcher's own section, taken from a
model's settings (`ModelSettings.batching`), which checked every value; nothing here checks
again."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class BatchPolicy:
    """How one model version batches. Sizes are in rows (the first tensor dimension).

    A plain value: the settings it comes from (ModelSettings) refuse a batch size below 1, a
    negative delay, no instances, or preferred sizes outside 1..max_batch_size."""

    max_batch_size: int = 64
    max_queue_delay_s: float = 0.002
    preferred_batch_sizes: tuple[int, ...] = ()
    # Rows allowed to wait; None means unbounded (only when asked for explicitly).
    max_queue_size: int | None = 2048
    # Batches that may run at once (executor threads). Inline models run one at a time.
    instances: int = 1
    # False: every request runs alone, straight away (the unbatched path).
    enabled: bool = True
