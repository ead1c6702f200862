"""Trains a small linear model for a few steps through pickalign.runtime and reports, per rank,
the world size and a checksum of the parameters. Launched by tests in 2 processes."""

import json
import sys
from pathlib import Path

import torch

from pickalign.config import RunConfig
from pickalign.runtime import make_accelerator, seed_everything


def main(out: str) -> None:
    config = RunConfig(output_dir=out, report_to="none")
    accelerator = make_accelerator(config, micro_batch_size=4)
    seed_everything(0, accelerator)
    torch.manual_seed(0)  # identical init on every rank; DDP must keep it identical
    model = torch.nn.Linear(8, 1)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    model, optimizer = accelerator.prepare(model, optimizer)
    generator = torch.Generator().manual_seed(100 + accelerator.process_index)  # per-rank data
    for _ in range(3):
        x = torch.randn(4, 8, generator=generator).to(accelerator.device)
        loss = model(x).pow(2).mean()
        accelerator.backward(loss)
        optimizer.step()
        optimizer.zero_grad()
    weights = accelerator.unwrap_model(model).weight.detach().float()
    report = {
        "rank": accelerator.process_index,
        "world_size": accelerator.num_processes,
        "distributed_type": str(accelerator.distributed_type),
        "checksum": weights.sum().item(),
    }
    Path(out, f"rank{accelerator.process_index}.json").write_text(json.dumps(report))


if __name__ == "__main__":
    main(sys.argv[1])
