"""Tiny transformers models built from configs (random weights, no download) and batches."""

from __future__ import annotations

import torch
from transformers import (
    BertConfig,
    BertForSequenceClassification,
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
)

VOCAB = 97


def tiny_bert(num_labels: int = 2, seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    cfg = BertConfig(
        vocab_size=VOCAB,
        hidden_size=24,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=40,
        num_labels=num_labels,
        max_position_embeddings=64,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
    )
    return BertForSequenceClassification(cfg).eval()


def tiny_llama(seed: int = 0, hidden: int = 32, intermediate: int = 48) -> torch.nn.Module:
    torch.manual_seed(seed)
    cfg = LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=hidden,
        intermediate_size=intermediate,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
    )
    return LlamaForCausalLM(cfg).eval()


def bnb_cpu_reason() -> str | None:
    """None when bitsandbytes runs 4-bit forward/backward here, else why not."""
    try:
        import bitsandbytes as bnb
    except Exception as exc:  # noqa: BLE001 - any import failure means "not available"
        return f"bitsandbytes is not importable ({exc})"
    try:
        layer = bnb.nn.Linear4bit(64, 64, compute_dtype=torch.float32, quant_type="nf4")
        layer = layer.to("cpu")
        x = torch.randn(2, 64, requires_grad=True)
        layer(x).sum().backward()
    except Exception as exc:  # noqa: BLE001
        return f"bitsandbytes has no working CPU backend ({type(exc).__name__}: {exc})"
    return None


def save_quantizable_llama(path) -> None:  # noqa: ANN001
    """A tiny Llama saved to ``path`` for quantized loading: hidden 64, since bitsandbytes' CPU
    4-bit kernels need at least one 64-wide quantization block per row."""
    tiny_llama(0, hidden=64, intermediate=128).save_pretrained(path)


def tiny_gpt2(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    cfg = GPT2Config(
        vocab_size=VOCAB,
        n_embd=24,
        n_layer=2,
        n_head=4,
        n_positions=64,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
        bos_token_id=0,
        eos_token_id=0,
    )
    return GPT2LMHeadModel(cfg).eval()


def batches(
    kind: str, n: int = 3, batch: int = 4, seq: int = 9, pad: bool = True, seed: int = 1
) -> list[dict[str, torch.Tensor]]:
    """Calibration batches with some right padding; labels fit the model kind."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        ids = torch.randint(1, VOCAB, (batch, seq), generator=g)
        mask = torch.ones(batch, seq, dtype=torch.long)
        if pad:
            lengths = torch.randint(2, seq + 1, (batch,), generator=g)
            lengths[0] = seq
            for i, length in enumerate(lengths.tolist()):
                mask[i, length:] = 0
        item = {"input_ids": ids, "attention_mask": mask}
        if kind == "bert":
            item["labels"] = torch.randint(0, 2, (batch,), generator=g)
        else:
            item["labels"] = ids.masked_fill(mask == 0, -100)
        out.append(item)
    return out


MODELS = {"bert": tiny_bert, "llama": tiny_llama, "gpt2": tiny_gpt2}
