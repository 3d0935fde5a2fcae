"""``valora profile-modes`` times decode steps as the engine runs them: CUDA-graph replays."""

from __future__ import annotations

import pytest
import torch

from valora.orchestrator.cost_model import RowWork, StepSpec
from valora.orchestrator.modes import Mode
from valora.orchestrator.step_profiler import SWITCH_TARGETS, StepProfiler

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]


def test_profiler_replays_decode_graphs_with_eager_logits(exact_fp32: None) -> None:
    from valora.engine.components import attention_backend_for, resolve_model_path
    from valora.models.loader import load_model

    device = torch.device("cuda")
    model = load_model(str(resolve_model_path("default")), dtype=torch.float32, device=device,
                       load_format="dummy", attention_backend=attention_backend_for("auto", device))
    names = ["profile-r4-0", "profile-r8-0"]
    ranks = {"profile-r4-0": 4, "profile-r8-0": 8}
    targets = {name: SWITCH_TARGETS["all"] for name in names}
    profiler = StepProfiler(model, names, ranks, targets, "auto", num_pages=32)
    assert profiler.enable_cuda_graphs(max_batch=4, max_context=40)
    rows = (RowWork("profile-r4-0", 4, 1, 20), RowWork("profile-r8-0", 8, 1, 33),
            RowWork(None, 0, 1, 9))
    specs = [StepSpec(rows), StepSpec(rows, Mode.MIXED, "profile-r4-0", 4),
             StepSpec(tuple(RowWork(None, 0, 1, 20) for _ in range(3)))]
    graphs = profiler.graphs
    for spec in specs:
        batch = profiler.batch(spec)
        with torch.inference_mode():
            profiler.graphs = None
            eager = profiler._run(batch).clone()
            profiler.graphs = graphs
            replayed = profiler._run(batch)
        torch.testing.assert_close(replayed, eager, rtol=1e-4, atol=1e-4)
        assert profiler.measure_step(spec) > 0
    assert profiler.num_graph_steps == 2 * len(specs)  # the checked replay + the timed one
    prefill = StepSpec((RowWork("profile-r4-0", 4, 16, 16),))
    profiler.measure_step(prefill)  # not a decode step: eager
    assert profiler.num_graph_steps == 2 * len(specs)
