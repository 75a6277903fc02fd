"""The driver → worker contract: what `prepare.prepare_run` hands every training worker.

A base-layer module: the driver (`prepare`, `launch`, `sweep`) builds a `PreparedRun` and the
workers (`recipe`) read it, so neither imports the other's layer for it.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

@dataclass
class PreparedRun:
    """Everything a training worker needs, as paths/URIs and small values (picklable)."""

    policy_path: str
    reference_path: str
    tokenizer_path: str
    train_uri: str
    eval_uri: str
    train_pairs: int
    eval_pairs: int
    total_steps: int
    builtin_task: bool
    reference_cache: dict | None = None
    validation: dict = field(default_factory=dict)
    reference_metrics: dict | None = None

    def to_dict(self) -> dict:
        return asdict(self)
