"""Integrations for people who keep their own training stack: `accelerate` (components from an
Accelerator's prepared objects) and `hf` (a transformers TrainerCallback). Each imports its
library only when the submodule itself is imported (``pip install async_ckpt[accelerate]`` or
``async_ckpt[hf]``); importing async_ckpt imports neither."""
