"""``slora eval``: uniform LoRA, Sensitivity-LoRA with the library defaults, the random-allocation
control, PEFT AdaLoRA at a matched final budget and PEFT EVA, compared at the same trainable
parameter budget on paired seeds, on a user's CSV or on the published offline suite.

Built from the demo's pieces (slora/demo/: task, data order, methods, training loop); see
docs/method.md ("Evaluation") for the protocol and the suite's numbers.
"""
