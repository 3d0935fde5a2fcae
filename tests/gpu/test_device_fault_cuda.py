"""A real CUDA error inside a step (a device-side assert from an out-of-range index), with
asynchronous scheduling (the CUDA default): the requests of the steps in flight fail with the
device error, the engine reports itself dead, and nothing hangs; with adapters loaded (their host
copies in PyTorch's pinned memory) the child then exits normally, because the dead engine is
retained for the life of the process (``valora.engine.faults.retain_for_process``). A
device-side assert leaves the process's CUDA context unusable, so the engine runs in a child
process under a time limit."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = [pytest.mark.gpu]

CHILD = r"""
import json, sys
import torch
from valora import LLM, SamplingParams
from valora.engine.inputs import GenerateRequest
from valora.engine.faults import retained
from valora.errors import EngineDeadError

adapters = json.loads(sys.argv[2])
llm = LLM(model=sys.argv[1], dtype="float32", device="cuda", num_pages=128, page_size=16,
          max_num_seqs=4, adapters=adapters)
engine = llm.engine
params = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True)
# an adapter's request first: its host copies (PyTorch pinned memory) serve non-blocking copies
warm = llm.generate([{"prompt": "USER: warm up ASSISTANT:", "adapter": next(iter(adapters))}],
                    params)[0]
model = engine.parts.model
real = model.compute_logits
armed = {"on": False}

def compute_logits(hidden):
    if armed["on"]:  # an index past the rows: a device-side assert, raised at the next sync
        hidden = hidden.index_select(0, torch.full((1,), 1 << 20, device=hidden.device))
    return real(hidden)

model.compute_logits = compute_logits
names = [None, *adapters]
ids = [engine.add_request(GenerateRequest(prompt=f"USER: question {i} ASSISTANT:",
                                          sampling_params=params,
                                          adapter=names[i % len(names)])).request_id
       for i in range(3)]
for _ in range(3):
    engine.step()
armed["on"] = True
outputs = {}
for _ in range(6):  # the fault surfaces when a step's tokens are read
    for out in engine.step():
        if out.finished:
            outputs[out.request_id] = out
    if not engine.is_healthy:
        break
try:
    engine.step()
    dead_raises = False
except EngineDeadError:
    dead_raises = True
print(json.dumps({
    "async_scheduling": engine.async_scheduling,
    "warm_ok": warm.error is None and len(warm.outputs[0].token_ids) == 12,
    "healthy": engine.is_healthy, "dead_reason": engine.dead_reason,
    "failed": sorted(rid for rid, out in outputs.items()
                     if out.outputs[0].finish_reason == "error" and out.error),
    "errors": sorted({(out.error or "")[:80] for out in outputs.values()}),
    "ids": sorted(ids), "unfinished": engine.has_unfinished_requests(),
    "dead_raises": dead_raises, "retained": any(kept is engine for kept in retained())}))
# then the interpreter exits normally: nothing of the dead engine is freed against the dead context
"""


def test_a_device_side_assert_fails_the_requests_and_kills_the_engine(
    tiny_llava: Path, adapters: dict[str, Path]
) -> None:
    names = {name: str(path) for name, path in adapters.items()}
    done = subprocess.run([sys.executable, "-c", CHILD, str(tiny_llava), json.dumps(names)],
                          capture_output=True, text=True, timeout=240)
    lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
    assert done.returncode == 0 and lines, done.stderr[-3000:]
    report = json.loads(lines[-1])
    assert report["async_scheduling"] and report["warm_ok"], report
    assert not report["healthy"] and report["dead_reason"], report
    assert report["failed"] == report["ids"], report
    assert all("device error" in e for e in report["errors"]), report
    assert not report["unfinished"] and report["dead_raises"] and report["retained"], report
