"""The search under torchrun / accelerate launch: two processes split the batches and take the
same steps as one process over all of them."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from factories import random_ia3_adapter, tiny_model

pytestmark = pytest.mark.slow  # two torchrun processes per test

SCRIPT = textwrap.dedent(
    """
    import json, os, sys
    import torch
    from ia3fuse._tiny_models import tiny_model  # = factories.tiny_model; tests/ is not on this path
    from ia3fuse.search import search_weights

    work, optimizer = sys.argv[1], sys.argv[2]
    model = tiny_model("llama", 0)
    gen = torch.Generator().manual_seed(0)
    batches = []
    for _ in range(4):
        ids = torch.randint(0, 128, (4, 12), generator=gen)
        batches.append({"input_ids": ids, "labels": ids.roll(1, 1)})
    result = search_weights(model, {"a": work + "/a", "b": work + "/b"}, batches, granularity="layer",
                            budget=72, optimizer=optimizer)
    if int(os.environ.get("RANK", "0")) == 0:
        out = work + "/" + optimizer + "-" + os.environ.get("WORLD_SIZE", "1") + ".json"
        with open(out, "w") as fh:
            json.dump({"weights": result.weights.tolist(), "final": result.final_objective,
                       "history": result.history}, fh)
    """
)


@pytest.fixture(scope="module")
def work(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("dist")
    model = tiny_model("llama", 0)
    random_ia3_adapter(model, root / "a", seed=1, spread=0.5)
    random_ia3_adapter(model, root / "b", seed=2, spread=0.5)
    (root / "run.py").write_text(SCRIPT)
    return root


def _run(work: Path, optimizer: str, processes: int) -> dict:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    if processes == 1:
        cmd = [sys.executable, str(work / "run.py"), str(work), optimizer]
    else:
        cmd = [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--nproc_per_node",
            str(processes),
            "--master_port",
            "29531",
            str(work / "run.py"),
            str(work),
            optimizer,
        ]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads((work / f"{optimizer}-{processes}.json").read_text())


@pytest.mark.parametrize("optimizer", ["adam", "cma"])
def test_two_processes_take_the_same_steps_as_one(work: Path, optimizer: str) -> None:
    one = _run(work, optimizer, 1)
    two = _run(work, optimizer, 2)
    assert len(two["history"]) == len(one["history"]) > 1
    torch.testing.assert_close(torch.tensor(two["weights"]), torch.tensor(one["weights"]), rtol=0, atol=1e-5)
    assert abs(two["final"] - one["final"]) < 1e-5
    # the search moved: it is not comparing two untouched starting points
    assert one["weights"] != [[0.5, 0.5], [0.5, 0.5]]
