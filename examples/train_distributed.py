"""Calibrate, patch, train and save Sensitivity-LoRA under torch.distributed (torchrun).

    torchrun --standalone --nproc-per-node 2 examples/train_distributed.py --wrap fsdp2 --out a
    torchrun --standalone --nproc-per-node 2 examples/train_distributed.py --wrap ddp --out b
    python3 examples/train_distributed.py --wrap none --out c      # one process

On the embedded default (MiniLM + Rotten Tomatoes sentences; `bash scripts/install.sh`) or
any local sequence-classification checkpoint (``--model PATH``).  Every process reads the same
global batches and trains on its share of each (rows ``rank::world``); the calibration pass
all-reduces its statistics, so every process gets the same report and plan; ``slora.patch``
runs before the model is wrapped (DDP) or sharded (FSDP2's ``fully_shard`` on every encoder
layer, then the model); ``slora.save_adapter`` is called by every process and writes one PEFT
adapter (FSDP2: gathered, written by rank 0).  gloo on the CPU, NCCL with one GPU per process.
Steps, losses and the plan go to ``OUT/run.json``.  docs/distributed.md explains each step.
"""

from __future__ import annotations

import argparse
import json
import os
import random
from pathlib import Path

import torch
import torch.distributed as dist

import slora
from slora import embedded


def global_batches(n: int, batch_size: int, max_length: int, seed: int) -> list[dict]:
    """The same n training batches on every process (shuffled training split)."""
    data = embedded.load_sentences()
    train, _ = embedded.split_by_movie(data, seed=0)
    random.Random(seed).shuffle(train)
    tokenizer = embedded.load_tokenizer()
    return embedded.make_batches(tokenizer, data, train[: n * batch_size], batch_size, max_length)


def shard(batch: dict, rank: int, world: int) -> dict:
    return {k: v[rank::world] for k, v in batch.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--wrap", choices=["ddp", "fsdp2", "none"], default="fsdp2")
    parser.add_argument("--out", required=True, help="directory for the adapter and run.json")
    parser.add_argument(
        "--model", help="local sequence-classification checkpoint (default: embedded MiniLM)"
    )
    parser.add_argument("--avg-rank", type=int, default=4)
    parser.add_argument("--calib-batches", type=int, default=4)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--batch-size", type=int, default=16, help="global batch size")
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--no-dropout", action="store_true", help="dropout off: any process count then agrees"
    )
    args = parser.parse_args()

    distributed = args.wrap != "none"
    if distributed:
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        dist.init_process_group(backend)
        rank, world = dist.get_rank(), dist.get_world_size()
        if torch.cuda.is_available():
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    else:
        rank, world = 0, 1
    device = torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
    torch.manual_seed(args.seed)

    if args.model:
        from transformers import AutoModelForSequenceClassification

        model = AutoModelForSequenceClassification.from_pretrained(args.model, num_labels=2)
    else:
        model = embedded.load_model(seed=args.seed)
    model.to(device)
    if args.no_dropout:
        for module in model.modules():
            if isinstance(module, torch.nn.Dropout):
                module.p = 0.0
    batches = global_batches(args.calib_batches + args.steps, args.batch_size, 64, args.seed)
    batches = [{k: v.to(device) for k, v in b.items()} for b in batches]

    # 1. calibrate on this process's share (statistics are all-reduced across processes)
    calib = [shard(b, rank, world) for b in batches[: args.calib_batches]]
    report = slora.analyze(model, calib, progress=rank == 0)
    # 2. allocate and patch, before wrapping or sharding
    plan = slora.allocate(report, avg_rank=args.avg_rank)
    torch.manual_seed(args.seed)  # the same LoRA initialisation on every process
    slora.patch(model, plan)
    model.train()
    # 3. wrap
    if args.wrap == "ddp":
        from torch.nn.parallel import DistributedDataParallel

        wrapped = DistributedDataParallel(model)
    elif args.wrap == "fsdp2":
        from torch.distributed.fsdp import fully_shard

        for layer in model.base_model.encoder.layer:
            fully_shard(layer)
        wrapped = fully_shard(model)
    else:
        wrapped = model
    # 4. train on this process's share of each global batch
    params = [p for p in wrapped.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=args.lr)
    losses = []
    for batch in batches[args.calib_batches :]:
        optimizer.zero_grad()
        loss = wrapped(**shard(batch, rank, world)).loss
        loss.backward()
        optimizer.step()
        mean = loss.detach().clone()
        if distributed:
            dist.all_reduce(mean)
            mean /= world
        losses.append(float(mean))
        if rank == 0:
            print(f"step {len(losses)}: loss {losses[-1]:.4f}", flush=True)
    # 5. save: every process calls it; the model itself, not the DDP wrapper
    out = Path(args.out)
    slora.save_adapter(model, out)
    if rank == 0:
        run = {"wrap": args.wrap, "world": world, "losses": losses, "ranks": plan.ranks}
        (out / "run.json").write_text(json.dumps(run, indent=2))
        print(f"adapter written to {out} ({world} process(es), {args.wrap})")
    if distributed:
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
