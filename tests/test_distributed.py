"""Calibration under torch.distributed (gloo, 2 processes on the CPU) equals one process on the
union of the data."""

import json
import os
import socket
import sys
from pathlib import Path

import torch.multiprocessing as mp

HERE = Path(__file__).parent


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, world: int, port: int, out: str) -> None:
    sys.path.insert(0, str(HERE))
    import torch.distributed as dist
    from tiny_models import MODELS, batches

    import slora

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        data = batches("bert", n=4)[rank::world]
        report = slora.analyze(MODELS["bert"](), data, estimator="fisher", progress=False)
        Path(out, f"rank{rank}.json").write_text(json.dumps(report.to_dict()))
    finally:
        dist.destroy_process_group()


def test_two_process_report_equals_single_process_on_union(tmp_path):
    from tiny_models import MODELS, batches

    import slora

    mp.spawn(_worker, args=(2, _free_port(), str(tmp_path)), nprocs=2, join=True)
    single = slora.analyze(MODELS["bert"](), batches("bert", n=4), progress=False).to_dict()
    for rank in range(2):
        got = json.loads((tmp_path / f"rank{rank}.json").read_text())
        assert got["num_tokens"] == single["num_tokens"]
        for name, m in single["modules"].items():
            for key in ("global", "topk", "local", "score"):
                assert abs(got["modules"][name][key] - m[key]) <= 1e-5 * abs(m[key]), (name, key)
            assert abs(got["modules"][name]["effrank"] - m["effrank"]) <= 1
