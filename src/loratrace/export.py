"""final_adapter/ (PEFT) and final_model/ (base + LoRA merged, Hugging Face format, with the tokenizer).

    PeftModel.from_pretrained(base, "runs/x/final_adapter")       # base: the hub model, or runs/x/base_model
    AutoModelForCausalLM.from_pretrained("runs/x/final_model")
"""

from __future__ import annotations

from pathlib import Path


def save_base_model(model, tokenizer, directory: Path) -> None:
    """The tiny preset has no hub home: its base is saved in the run so the adapter can be applied to it."""
    model.save_pretrained(directory, safe_serialization=True)
    tokenizer.save_pretrained(directory)


def export_adapter(peft_model, tokenizer, directory: Path, base_path: Path | None = None) -> None:
    """`base_path`: where the base model lives when it has no hub id (the tiny preset's `base_model/`), recorded as
    `base_model_name_or_path` so `AutoPeftModelForCausalLM.from_pretrained(directory)` finds it."""
    if base_path is not None:
        for config in peft_model.peft_config.values():
            config.base_model_name_or_path = str(Path(base_path).resolve())
    peft_model.save_pretrained(directory, safe_serialization=True)
    tokenizer.save_pretrained(directory)


def export_merged(peft_model, tokenizer, directory: Path) -> None:
    """Merge in place (the run is over; a copy would double memory for large models) and save."""
    merged = peft_model.merge_and_unload()
    merged.save_pretrained(directory, safe_serialization=True)
    tokenizer.save_pretrained(directory)
