"""Check what `slora demo` wrote: results.json's schema, the PNG plots, the adapter (loaded with
PEFT on the embedded model, outputs equal to slora's own loader), and the native-build notice.

usage: python .ci/check_demo_outputs.py OUT_DIR [LOG_OF_THE_RUN]
"""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

RESULT_KEYS = {
    "model", "dataset", "seeds", "methods", "paired_vs_uniform", "majority_baseline", "n_train",
    "n_test", "targets", "calibration", "stability", "recipe", "timing",
}  # fmt: skip
METHOD_KEYS = {"accuracy", "top_class_share", "collapsed", "trainable_params", "lora_params"}
PLOTS = ("sensitivity_by_layer.png", "ranks.png", "accuracy.png")


def fail(message: str) -> None:
    print(f"check_demo_outputs: FAILED: {message}")
    raise SystemExit(1)


def check_results(out: Path) -> dict:
    doc = json.loads((out / "results.json").read_text())
    if missing := RESULT_KEYS - set(doc):
        fail(f"results.json lacks {sorted(missing)}")
    if set(doc["methods"]) != {"uniform", "sensitivity"}:
        fail(f"results.json methods are {sorted(doc['methods'])}")
    for name, entry in doc["methods"].items():
        if missing := METHOD_KEYS - set(entry):
            fail(f"results.json methods.{name} lacks {sorted(missing)}")
        acc = entry["accuracy"]
        if len(acc) != len(doc["seeds"]) or not all(0.0 <= a <= 1.0 for a in acc):
            fail(f"methods.{name}.accuracy = {acc} for seeds {doc['seeds']}")
    uni, sens = (doc["methods"][m]["lora_params"] for m in ("uniform", "sensitivity"))
    if not abs(uni - sens) <= 0.05 * uni:
        fail(f"uniform and Sensitivity-LoRA budgets differ: {uni} vs {sens}")
    json.loads((out / "sensitivity.json").read_text())
    return doc


def check_plots(out: Path) -> None:
    for name in PLOTS:
        data = (out / name).read_bytes()
        if not data.startswith(b"\x89PNG\r\n\x1a\n") or len(data) < 5000:
            fail(f"{name} is not a non-trivial PNG ({len(data)} bytes)")


def check_adapter(out: Path, doc: dict) -> None:
    """PEFT loads the adapter with the planned ranks; its outputs equal slora's loader's."""
    import torch
    from peft import PeftModel

    import slora
    from slora import embedded

    cfg = json.loads((out / "adapter" / "adapter_config.json").read_text())
    planned = {k: v for k, v in doc["methods"]["sensitivity"]["ranks"].items() if v > 0}
    if cfg["rank_pattern"] != planned:
        fail("adapter_config.json rank_pattern differs from results.json's Sensitivity-LoRA ranks")
    tok = embedded.load_tokenizer()
    batch = tok(["a thoughtful, funny film", "a tedious mess"], padding=True, return_tensors="pt")
    base = embedded.load_model().eval()
    with torch.no_grad():
        base_logits = base(**batch).logits
        peft_logits = PeftModel.from_pretrained(base, out / "adapter").eval()(**batch).logits
        ours = slora.load_adapter(embedded.load_model(), out / "adapter").eval()
        our_logits = ours(**batch).logits
    if not torch.isfinite(peft_logits).all():
        fail("the PEFT-loaded adapter gives non-finite logits")
    if not torch.allclose(peft_logits, our_logits, rtol=1e-4, atol=1e-5):
        fail(f"PEFT and slora disagree on the adapter: {peft_logits} vs {our_logits}")
    if torch.allclose(peft_logits, base_logits):
        fail("the adapter (with its trained head) does not change the base model's outputs")


def check_log(log: Path) -> None:
    """A native build, if one ran, was announced once; nothing else said 'building'."""
    text = log.read_text(errors="replace")
    if "ModuleNotFoundError" in text or "Traceback" in text:
        fail(f"{log} holds a traceback")
    starts = text.count("building the native C++ ops")
    if starts > 1 or starts != len(re.findall(r"native C\+\+ ops '\w+' built in", text)):
        fail(f"the native build was announced {starts} times in {log}")
    print(f"native build announced {starts} time(s) in the run")


def main(argv: list[str]) -> int:
    out = Path(argv[0])
    doc = check_results(out)
    check_plots(out)
    check_adapter(out, doc)
    if len(argv) > 1:
        check_log(Path(argv[1]))
    acc = {m: e["accuracy"] for m, e in doc["methods"].items()}
    print(f"check_demo_outputs: OK ({out}: results.json, {len(PLOTS)} PNGs, adapter; {acc})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
