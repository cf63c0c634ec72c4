"""Training and scoring entry points that run single-process or under torchrun.

Examples::

    python -m xai_lib.train stage1 --config configs/demo.yaml --run-dir outputs/r1
    torchrun --standalone --nproc_per_node 2 -m xai_lib.train stage1 --config configs/demo.yaml --run-dir outputs/r1
    python -m xai_lib.train stage2 --config configs/xai_stage2.yaml --run-dir outputs/r1
    torchrun --standalone --nproc_per_node 2 -m xai_lib.train score --checkpoint outputs/r1/stage1_detector.pth \\
        --config configs/demo.yaml --split eval --out outputs/r1/scores/eval_scores.txt

The same code path serves both: under torchrun each rank joins the process group
(NCCL on GPUs, gloo on CPU), reads its shard through a ``DistributedSampler``, and only
rank 0 writes logs and checkpoints. ``training.batch_size`` is the GLOBAL batch: each of
N ranks takes ``batch_size // N`` utterances per step (and BatchNorm statistics cover the
global batch), so N processes train like one. On CPU, torchrun gives each process one
thread (``OMP_NUM_THREADS=1``); set it yourself to give them more.

A failing rank prints ``[rank N] ErrorType: message`` on stderr and exits non-zero
(status 2 without a traceback for errors a user can fix: config, paths, data, checkpoints,
NaN loss; status 1 with the traceback otherwise); torchrun then stops the other ranks and
exits non-zero too, naming the failed rank.
"""
from __future__ import annotations

import argparse
import logging
import os

from xai_lib.console import say_error

from torch.distributed.elastic.multiprocessing.errors import record

__all__ = ["main"]

log = logging.getLogger("xai_lib.train")


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m xai_lib.train", description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="command", required=True)
    for name, default_cfg in (("stage1", "configs/demo.yaml"), ("stage2", "configs/xai_stage2.yaml")):
        s = sub.add_parser(name, help=f"train {name}")
        s.add_argument("--config", default=default_cfg, help="YAML config")
        s.add_argument("--run-dir", required=True, help="run directory")
        s.add_argument("--override", "-o", action="append", default=[], help="dotted override key=value (repeatable)")
        s.add_argument("--no-resume", action="store_true", help="start from scratch even if a resumable state exists")
        if name == "stage2":
            s.add_argument("--detector", default=None, help="Stage-1 checkpoint (default: resolution order in docs/architecture.md)")
    sc = sub.add_parser("score", help="score a protocol split into an ASVspoof score file (sharded under torchrun)")
    sc.add_argument("--checkpoint", required=True)
    sc.add_argument("--config", default="configs/demo.yaml", help="Stage-1 YAML giving the data section")
    sc.add_argument("--split", default="eval", choices=["train", "dev", "eval"])
    sc.add_argument("--out", required=True, help="score file to write (rank 0)")
    sc.add_argument("--override", "-o", action="append", default=[])
    return p


def _user_errors() -> tuple[type[BaseException], ...]:
    """Errors a user causes (bad config, path, data, checkpoint): reported without a traceback."""
    from xai_lib.config import ConfigError
    from xai_lib.data.audio import AudioError
    from xai_lib.data.protocols import MissingAudioError, ProtocolError
    from xai_lib.files import CheckpointError
    from xai_lib.detector.model import PretrainedNotFoundError
    from xai_lib.training import NonFiniteLossError, ResumeError

    return (ConfigError, AudioError, MissingAudioError, ProtocolError, CheckpointError, PretrainedNotFoundError,
            NonFiniteLossError, ResumeError)


@record  # under torchrun: the failing rank's exception is written where the launcher reports it
def main(argv: list[str] | None = None) -> int:
    """Run one command (``stage1``, ``stage2`` or ``score``); returns the exit status."""
    args = _parser().parse_args(argv)
    rank = int(os.environ.get("RANK", "0"))
    tag = f" [rank {rank}]" if int(os.environ.get("WORLD_SIZE", "1")) > 1 else ""
    logging.basicConfig(  # rank 0 logs progress; other ranks only warnings and errors
        level=logging.INFO if rank == 0 else logging.WARNING,
        format=f"%(asctime)s %(levelname)s{tag} %(name)s: %(message)s",
    )
    from xai_lib.config import Stage1Config, Stage2Config, load_config
    from xai_lib.paths import resolve_path
    from xai_lib.training import init_distributed

    ctx = init_distributed("auto")
    try:
        if args.command == "stage1":
            from xai_lib.detector.training import train_stage1

            cfg = load_config(resolve_path(args.config), Stage1Config, args.override)
            cfg.data.root = str(resolve_path(cfg.data.root))
            res = train_stage1(cfg, resolve_path(args.run_dir), resume=not args.no_resume)
            if ctx.is_main:
                log.info("Stage 1 done: %s (%d epochs)", res.checkpoint, res.epochs_completed)
        elif args.command == "stage2":
            from xai_lib.importance.training import train_stage2

            cfg = load_config(resolve_path(args.config), Stage2Config, args.override)
            cfg.data.root = str(resolve_path(cfg.data.root))
            res = train_stage2(cfg, resolve_path(args.run_dir), detector_path=args.detector, resume=not args.no_resume)
            if ctx.is_main:
                log.info("Stage 2 done: %s", res.checkpoint)
        else:
            from xai_lib.data.datasets import build_split
            from xai_lib.detector.metrics import write_score_file
            from xai_lib.detector.checkpoint import load_detector
            from xai_lib.detector.training import score_utterances

            cfg = load_config(resolve_path(args.config), Stage1Config, args.override)
            cfg.data.root = str(resolve_path(cfg.data.root))
            model = load_detector(resolve_path(args.checkpoint)).to(ctx.device)
            utts = build_split(cfg.data, args.split)
            scores = score_utterances(model, utts, cfg, ctx)
            if ctx.is_main:
                order = [u.utt_id for u in utts if u.utt_id in scores]
                write_score_file(resolve_path(args.out), order, [scores[u] for u in order])
                log.info("wrote %d scores to %s", len(order), args.out)
    except Exception as exc:  # one clear line per rank, then a non-zero exit
        where = f"[rank {ctx.rank}] " if ctx.distributed else ""
        say_error(f"{where}{type(exc).__name__}: {exc}")
        if isinstance(exc, _user_errors()):
            return 2  # the message says what to fix; a traceback would only bury it
        raise
    finally:
        if ctx.distributed:
            import torch.distributed as dist

            if dist.is_initialized():
                dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
