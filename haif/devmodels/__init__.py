"""Development models built offline from code and data shipped in the repository.

``build_tiny_llama`` writes a small, randomly initialised Llama checkpoint with its own
byte-level BPE tokenizer: a real ``LlamaForCausalLM`` directory that transformers and
vLLM load like any other, small enough for unit tests and CPU benchmarks;
``build_tiny_lora`` writes a PEFT LoRA adapter of it (seeded, non-zero weights). Its text is
noise; its shapes, tokenizer and chat template are real. Importing this package is
cheap: torch, transformers and tokenizers are imported only when a model is built.
"""

from __future__ import annotations

from haif.devmodels.tiny_llama import BUILD_MARKER, FORMAT_VERSION, build_tiny_llama, build_tiny_lora

__all__ = ["BUILD_MARKER", "FORMAT_VERSION", "build_tiny_llama", "build_tiny_lora"]
