"""Serve a batch of requests, each with its own LoRA adapter, on one base model.

    python examples/serve_adapters.py

Builds a tiny Llama (random weights, no download), makes three adapters of different ranks
and module subsets in the PEFT format (two with ``slora.patch`` + ``slora.save_adapter``, one
with PEFT's ``rank_pattern``/``alpha_pattern``/rsLoRA when PEFT is installed), loads them into an
``AdapterPool`` and generates for a left-padded batch that mixes them (``None`` = base model).
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import torch
from transformers import LlamaConfig, LlamaForCausalLM

import slora
from slora.core.patch import lora_layers, plan_for_ranks
from slora.core.targets import find_targets


def tiny_llama() -> LlamaForCausalLM:
    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
    )  # fmt: skip
    return LlamaForCausalLM(cfg).eval()


def make_adapter(path: Path, ranks_by_suffix: dict[str, int], seed: int) -> Path:
    """A "fine-tuned" adapter: slora.patch with the given ranks, random B, saved as PEFT."""
    model = tiny_llama()
    ranks = {
        name: next((r for sfx, r in ranks_by_suffix.items() if name.endswith(sfx)), 0)
        for name in find_targets(model)
    }
    slora.patch(model, plan_for_ranks(model, ranks))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in lora_layers(model).values():
            layer.lora_B.weight.copy_(torch.randn(layer.lora_B.weight.shape, generator=g) * 0.2)
    return slora.save_adapter(model, path)


def make_peft_adapter(path: Path) -> Path | None:
    try:
        from peft import LoraConfig, get_peft_model
    except ImportError:
        return None
    torch.manual_seed(3)
    config = LoraConfig(
        r=16, lora_alpha=32, target_modules=["q_proj", "v_proj", "up_proj"],
        rank_pattern={"up_proj": 4}, alpha_pattern={"v_proj": 8}, use_rslora=True,
        init_lora_weights=False,
    )  # fmt: skip
    get_peft_model(tiny_llama(), config).save_pretrained(str(path))
    return path


def main() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        dirs = {
            "support": make_adapter(root / "support", {"q_proj": 8, "v_proj": 8}, seed=1),
            "legal": make_adapter(root / "legal", {"proj": 32}, seed=2),  # every linear, r=32
        }
        peft_dir = make_peft_adapter(root / "peft")
        if peft_dir is not None:
            dirs["summaries"] = peft_dir

        model = tiny_llama()
        pool = slora.AdapterPool(model, max_adapters=8)  # hooks the target layers once
        for name, path in dirs.items():
            pool.load(name, path)
        for name, info in pool.adapters.items():
            ranks = sorted(set(info.ranks.values()))
            print(f"loaded {name:<10} ranks {ranks}, {len(info.ranks)} modules, "
                  f"{info.nbytes / 1024:.1f} KiB")  # fmt: skip
        print(f"pool holds {pool.memory_bytes() / 1024:.1f} KiB of adapters")

        # Four requests, left-padded to one batch; each names its adapter (None = base model).
        g = torch.Generator().manual_seed(5)
        prompts = [torch.randint(1, 128, (n,), generator=g) for n in (6, 3, 5, 4)]
        wanted = ["support", "legal", None, "summaries" if "summaries" in dirs else None]
        width = max(len(p) for p in prompts)
        ids = torch.zeros(len(prompts), width, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for b, p in enumerate(prompts):
            ids[b, width - len(p) :], mask[b, width - len(p) :] = p, 1

        with torch.no_grad(), pool.use(wanted):
            out = model.generate(
                input_ids=ids, attention_mask=mask, max_new_tokens=8, do_sample=False,
                pad_token_id=0,
            )  # fmt: skip
        base = model.generate(
            input_ids=ids, attention_mask=mask, max_new_tokens=8, do_sample=False, pad_token_id=0
        )  # outside use(): the plain base model
        for b, name in enumerate(wanted):
            new = out[b, width:].tolist()
            same = "same as base" if new == base[b, width:].tolist() else "differs from base"
            print(f"request {b} adapter={name!s:<10} -> {new} ({same})")

        pool.unload("legal")  # the other adapters are not touched
        print(f"after unload: {pool.loaded}")


if __name__ == "__main__":
    main()
