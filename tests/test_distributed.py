"""Real 2-process launches. Multi-process failures on CPU are silent (one process, or two
that each train alone), so these assert the world size and that parameters stay in sync."""

import json

import pytest

from tests.conftest import REPO, launch

PROBE = str(REPO / "tests" / "scripts" / "dist_probe.py")


def read_ranks(out):
    return [json.loads((out / f"rank{r}.json").read_text()) for r in (0, 1)]


@pytest.mark.integration
@pytest.mark.parametrize(
    "config, distributed_type",
    [("cpu_2proc.yaml", "MULTI_CPU"), ("cpu_zero2_2proc.yaml", "DEEPSPEED")],
)
def test_two_processes_train_in_sync(tmp_path, config, distributed_type):
    launch(config, PROBE, str(tmp_path))
    ranks = read_ranks(tmp_path)
    assert [r["world_size"] for r in ranks] == [2, 2]
    assert all(r["distributed_type"].endswith(distributed_type) for r in ranks)
    # each rank saw different data; only a working all-reduce keeps the weights equal
    assert ranks[0]["checksum"] == pytest.approx(ranks[1]["checksum"], abs=1e-6)
