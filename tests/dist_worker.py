"""Helper launched under torchrun by tests/test_distributed.py (not collected by pytest).

Modes:
    grads OUT_DIR          one DDP training step of the detector described by OUT_DIR/model.json
                           on a fixed global batch; every rank saves its gradients and updated
                           weights, and rank 0 also saves the gradients of ONE process on the
                           whole batch (no DDP).
    fail-rank1 ARGS...     run ``python -m xai_lib.train ARGS...`` with rank 1 made to fail.
"""
from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import torch

GLOBAL_BATCH = 8
SAMPLES = 4000


def _tiny_detector(model_json: Path):
    from xai_lib.config import ModelConfig, config_from_dict
    from xai_lib.detector.model import Detector

    torch.manual_seed(0)  # identical initial weights on every rank
    return Detector(config_from_dict(json.loads(model_json.read_text()), ModelConfig))


def grads(out_dir: Path) -> None:
    from xai_lib.training import init_distributed, wrap_ddp
    from xai_lib.detector.training import _weighted_ce

    ctx = init_distributed("cpu")
    gen = torch.Generator().manual_seed(123)
    wave = 0.1 * torch.randn(GLOBAL_BATCH, SAMPLES, generator=gen)  # (B, L) the global batch
    labels = torch.tensor([0, 1, 0, 0, 1, 0, 1, 0])  # (B,)
    weights = torch.tensor([0.1, 0.9])

    model = _tiny_detector(out_dir / "model.json").train()
    ddp = wrap_ddp(model, ctx)
    mine = slice(ctx.rank, None, ctx.world_size)  # as DistributedSampler deals a batch
    loss, _ = _weighted_ce(ddp(wave[mine]).logits, labels[mine], weights, ctx)
    loss.backward()
    torch.save({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None},
               out_dir / f"grads_rank{ctx.rank}.pt")
    torch.optim.Adam(model.parameters(), lr=1e-3).step()
    torch.save(model.state_dict(), out_dir / f"weights_rank{ctx.rank}.pt")

    if ctx.is_main:  # the reference: one process, the whole batch, plain BatchNorm
        from xai_lib.training import DistContext

        single = _tiny_detector(out_dir / "model.json").train()
        ref_loss, _ = _weighted_ce(single(wave).logits, labels, weights, DistContext())
        ref_loss.backward()
        torch.save({n: p.grad.clone() for n, p in single.named_parameters() if p.grad is not None},
                   out_dir / "grads_single.pt")
    ctx.barrier()
    torch.distributed.destroy_process_group()


def fail_rank1(argv: list[str]) -> int:
    if os.environ.get("RANK") == "1":
        import xai_lib.detector.training as stage1

        def broken(*args, **kwargs):
            raise RuntimeError("injected failure on rank 1")

        stage1.train_stage1 = broken
    from xai_lib.train import main

    return main(argv)


if __name__ == "__main__":
    mode, rest = sys.argv[1], sys.argv[2:]
    if mode == "grads":
        grads(Path(rest[0]))
    elif mode == "fail-rank1":
        sys.exit(fail_rank1(rest))
    else:
        raise SystemExit(f"unknown mode {mode!r}")
