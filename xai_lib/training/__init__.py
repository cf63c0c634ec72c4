"""Training loops: Stage 1 (detector) and Stage 2 (XAI module), single-process or torchrun."""
