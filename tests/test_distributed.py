"""Calibration under torch.distributed (gloo, 2 processes on the CPU) equals one process on the
union of the data."""

import json
import os
import socket
import sys
from pathlib import Path

import pytest
import torch
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


def _lora_model(seed: int = 0):
    """tiny BERT patched with fixed per-module ranks and random non-zero A and B."""
    from tiny_models import MODELS

    import slora
    from slora.core.patch import lora_layers, plan_for_ranks
    from slora.core.targets import find_targets

    model = MODELS["bert"](seed=seed)
    names = list(find_targets(model))
    slora.patch(model, plan_for_ranks(model, {n: 1 + i % 4 for i, n in enumerate(names)}))
    g = torch.Generator().manual_seed(seed + 7)
    with torch.no_grad():
        for layer in lora_layers(model).values():
            for p in (layer.lora_A.weight, layer.lora_B.weight):
                p.copy_(torch.randn(p.shape, generator=g) * 0.2)
    return model.train()


def _sgd_step(model, batch) -> float:
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.SGD(params, lr=0.5)
    loss = model(**batch).loss
    loss.backward()
    opt.step()
    return float(loss.detach())


def _fsdp2_worker(rank: int, world: int, port: int, out: str) -> None:
    """patch -> fully_shard -> one SGD step on this rank's half of the batch -> save_adapter
    (every rank); then patch on an already-sharded model; analyze on the sharded model."""
    sys.path.insert(0, str(HERE))
    import torch.distributed as dist
    from tiny_models import MODELS, batches

    import slora

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        from torch.distributed.fsdp import fully_shard

        model = _lora_model()
        for layer in model.bert.encoder.layer:
            fully_shard(layer)
        fully_shard(model)
        batch = {k: v[rank::world] for k, v in batches("bert", n=1, batch=8)[0].items()}
        _sgd_step(model, batch)
        slora.save_adapter(model, Path(out, "fsdp2"))  # every rank; rank 0 writes
        assert Path(out, "fsdp2", "adapter_model.safetensors").exists()  # after the barrier
        result: dict = {}
        sharded = MODELS["bert"]()
        fully_shard(sharded)
        try:
            slora.patch(sharded, data=batches("bert", n=1), avg_rank=2)
        except ValueError as exc:
            result["patch_error"] = str(exc)
        plain = MODELS["bert"]()
        for layer in plain.bert.encoder.layer:
            fully_shard(layer)
        fully_shard(plain)
        report = slora.analyze(plain, batches("bert", n=4)[rank::world], progress=False)
        result["report"] = report.to_dict()
        Path(out, f"fsdp2_rank{rank}.json").write_text(json.dumps(result))
    finally:
        dist.destroy_process_group()


def test_fsdp2_train_step_and_save_equal_one_process(tmp_path):
    """Two gloo processes under FSDP2: a training step on each rank's half of the batch, saved
    by every rank, gives one complete adapter equal to one process on the whole batch, which
    PEFT and slora.load_adapter load on the plain base model; patch on a sharded model says
    what to do; analyze on the sharded model equals the plain model's report."""
    from peft import PeftModel
    from safetensors.torch import load_file
    from tiny_models import MODELS, batches

    import slora

    mp.spawn(_fsdp2_worker, args=(2, _free_port(), str(tmp_path)), nprocs=2, join=True)
    single = _lora_model()
    batch = batches("bert", n=1, batch=8)[0]
    _sgd_step(single, batch)
    slora.save_adapter(single, tmp_path / "single")
    got = load_file(str(tmp_path / "fsdp2" / "adapter_model.safetensors"))
    want = load_file(str(tmp_path / "single" / "adapter_model.safetensors"))
    assert got.keys() == want.keys() and len(got) > 0
    for key in want:
        assert got[key].shape == want[key].shape, key
        torch.testing.assert_close(got[key], want[key], rtol=1e-5, atol=1e-6, msg=key)
    assert json.loads((tmp_path / "fsdp2" / "adapter_config.json").read_text()) == json.loads(
        (tmp_path / "single" / "adapter_config.json").read_text()
    )
    single.eval()
    with torch.no_grad():
        expected = single(**batch).logits
        peft = PeftModel.from_pretrained(MODELS["bert"](), str(tmp_path / "fsdp2")).eval()
        loaded = slora.load_adapter(MODELS["bert"](), tmp_path / "fsdp2").eval()
        torch.testing.assert_close(peft(**batch).logits, expected, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(loaded(**batch).logits, expected, rtol=1e-5, atol=1e-5)
    plain = slora.analyze(MODELS["bert"](), batches("bert", n=4), progress=False).to_dict()
    for rank in range(2):
        result = json.loads((tmp_path / f"fsdp2_rank{rank}.json").read_text())
        assert "already sharded" in result["patch_error"] and "fully_shard" in result["patch_error"]
        assert result["report"]["num_tokens"] == plain["num_tokens"]
        for name, m in plain["modules"].items():
            for key in ("global", "topk", "local", "score"):
                got_v = result["report"]["modules"][name][key]
                assert abs(got_v - m[key]) <= 1e-5 * abs(m[key]), (name, key)


@pytest.mark.parametrize("offload", ["disk", "cpu"])
def test_analyze_offloaded_model_equals_plain(tmp_path, offload):
    """A model whose weights accelerate keeps on disk / in CPU memory (meta tensors in the
    module, brought in per layer by its hooks) calibrates to the plain model's report."""
    accelerate = pytest.importorskip("accelerate")
    from tiny_models import MODELS, batches

    import slora

    plain = slora.analyze(MODELS["llama"](), batches("llama", n=3), progress=False).to_dict()
    model = MODELS["llama"]()
    if offload == "disk":
        accelerate.disk_offload(model, str(tmp_path), execution_device="cpu")
    else:
        accelerate.cpu_offload(model, execution_device="cpu")
    assert all(p.device.type == "meta" for p in model.model.layers[0].parameters())
    got = slora.analyze(model, batches("llama", n=3), progress=False).to_dict()
    assert got["num_tokens"] == plain["num_tokens"]
    assert got["modules"].keys() == plain["modules"].keys()
    for name, m in plain["modules"].items():
        for key in ("global", "topk", "effrank", "local", "score"):
            assert got["modules"][name][key] == pytest.approx(m[key], rel=1e-6), (name, key)


def test_distributed_md_recipes_run_and_agree(tmp_path):
    """The torchrun commands of docs/distributed.md, as written (FSDP2 and DDP with 2 gloo
    processes, then one process) on the embedded default: each writes a complete adapter,
    and the three agree (each step equals one process on the whole batch)."""
    import re
    import subprocess

    from safetensors.torch import load_file

    text = (HERE.parent / "docs" / "distributed.md").read_text()
    blocks = re.findall(r"```bash\n(.*?)```", text, flags=re.S)
    commands = [ln for b in blocks for ln in b.splitlines() if "train_distributed.py" in ln]
    assert len(commands) == 3, commands
    (tmp_path / "examples").symlink_to(HERE.parent / "examples")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    for command in commands:
        proc = subprocess.run(command, shell=True, cwd=tmp_path, env=env, capture_output=True,
                              text=True, timeout=600)  # fmt: skip
        assert proc.returncode == 0, f"{command}\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    outs = [re.search(r"--out (\S+)", c).group(1) for c in commands]
    adapters = [load_file(str(tmp_path / o / "adapter_model.safetensors")) for o in outs]
    runs = [json.loads((tmp_path / o / "run.json").read_text()) for o in outs]
    assert [r["world"] for r in runs] == [2, 2, 1]
    assert runs[0]["ranks"] == runs[1]["ranks"] == runs[2]["ranks"]
    for got in adapters[:2]:
        assert got.keys() == adapters[2].keys() and len(got) > 0
        for key, want in adapters[2].items():
            # AdamW's first steps move every entry by about lr whatever its gradient's size,
            # so round-off in near-zero gradients shows at ~1e-6 here; a missing or doubled
            # gradient reduction moves entries by ~lr = 1e-3
            torch.testing.assert_close(got[key], want, rtol=0, atol=2e-5, msg=key)


def _qlora_model(base: str):
    """The 4-bit (nf4) base from ``base``, patched with fixed ranks and random non-zero A, B."""
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig
    from transformers.utils import logging

    import slora
    from slora.core.patch import lora_layers, plan_for_ranks
    from slora.core.targets import find_targets

    logging.set_verbosity_error()
    config = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                bnb_4bit_compute_dtype=torch.float32)  # fmt: skip
    model = AutoModelForCausalLM.from_pretrained(base, quantization_config=config, device_map="cpu")
    names = list(find_targets(model))
    slora.patch(model, plan_for_ranks(model, {n: 1 + i % 3 for i, n in enumerate(names)}))
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for layer in lora_layers(model).values():
            for p in (layer.lora_A.weight, layer.lora_B.weight):
                p.copy_(torch.randn(p.shape, generator=g) * 0.2)
    return model


def _qlora_fsdp2_worker(rank: int, world: int, port: int, base: str, out: str) -> None:
    sys.path.insert(0, str(HERE))
    import torch.distributed as dist
    from tiny_models import batches

    import slora

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        from torch.distributed.fsdp import fully_shard

        model = _qlora_model(base)
        batch = batches("llama", n=1, batch=4, pad=False)[0]
        with torch.no_grad():
            before = model(**batch).logits
        for layer in model.model.layers:
            fully_shard(layer)
        fully_shard(model)
        with torch.no_grad():
            after = model(**batch).logits
        err = float((after - before).abs().max() / before.abs().max())
        _sgd_step(model, {k: v[rank::world] for k, v in batch.items()})
        slora.save_adapter(model, Path(out, "qlora_fsdp2"))
        Path(out, f"qlora_rank{rank}.json").write_text(json.dumps({"sharded_logits_err": err}))
    finally:
        dist.destroy_process_group()


def test_qlora_base_under_fsdp2_equals_one_process(tmp_path):
    """A bitsandbytes 4-bit base patched by slora, then sharded with fully_shard: the sharded
    model computes the unsharded logits, and a step on two half-batches saved by every rank
    equals one process on the whole batch."""
    from tiny_models import bnb_cpu_reason

    reason = bnb_cpu_reason()
    if reason:
        pytest.skip(reason)
    from safetensors.torch import load_file
    from tiny_models import batches, save_quantizable_llama

    import slora

    save_quantizable_llama(tmp_path / "base")
    mp.spawn(_qlora_fsdp2_worker, args=(2, _free_port(), str(tmp_path / "base"), str(tmp_path)),
             nprocs=2, join=True)  # fmt: skip
    for rank in range(2):
        result = json.loads((tmp_path / f"qlora_rank{rank}.json").read_text())
        assert result["sharded_logits_err"] <= 1e-6, result
    single = _qlora_model(str(tmp_path / "base"))
    _sgd_step(single, batches("llama", n=1, batch=4, pad=False)[0])
    slora.save_adapter(single, tmp_path / "qlora_single")
    got = load_file(str(tmp_path / "qlora_fsdp2" / "adapter_model.safetensors"))
    want = load_file(str(tmp_path / "qlora_single" / "adapter_model.safetensors"))
    assert got.keys() == want.keys() and len(got) > 0
    for key in want:
        torch.testing.assert_close(got[key], want[key], rtol=1e-4, atol=1e-6, msg=key)
