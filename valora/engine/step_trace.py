"""One executed step as the model runner's step trace records it (benchmarks read the trace to
see where a serving run's time went)."""

from __future__ import annotations

from dataclasses import dataclass

from valora.forward_batch import ForwardBatch


@dataclass(frozen=True)
class StepRecord:
    """One executed step, as ``ModelRunner.enable_step_trace`` records it: host clock at its
    start (``time.perf_counter``; under asynchronous scheduling, when the step before it was
    read, if later than its launch), host wall seconds (tokens read back: GPU time included),
    whether a CUDA graph ran it, its rows and tokens, and LoRA ops per linear (0: none — base rows
    or merged mode; 1: unmerged, or mixed with the correction fused; 2: mixed, two ops)."""

    start_s: float
    seconds: float
    graphed: bool
    rows: int
    tokens: int
    lora_ops: int
    mode: str = ""
    """The weights' mode the step ran under (``unmerged`` / ``merged`` / ``mixed``) when a mode
    controller decides it; "" otherwise."""

    def as_list(self) -> list[float | int | bool | str]:
        return [self.start_s, self.seconds, self.graphed, self.rows, self.tokens, self.lora_ops,
                self.mode]


def lora_ops(batch: ForwardBatch) -> int:
    """LoRA ops per linear the step runs (``StepRecord.lora_ops``)."""
    return int(batch.lora is not None) + int(batch.lora_correction is not None)
