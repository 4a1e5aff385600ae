"""slora's thin Python core: configuration, sensitivity math, allocation, model walking, I/O."""
