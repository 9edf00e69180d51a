"""Base model + tokenizer (hub id, local folder, or the offline `tiny` preset) wrapped with PEFT LoRA.

The `tiny` preset needs no network. By default it is the small Llama shipped in `sample/tiny_base/` (a few MB),
pre-trained once on a generated corpus of facts by `python -m loratrace.sample.pretrain_tiny`. Setting a shape key
(`model.tiny_arch`, `tiny_hidden_size`, `tiny_layers`, `tiny_seed`, `tiny_shape`) or `model.tiny_pretrained=false`
builds a random-initialised base instead, with a byte-level BPE tokenizer trained in memory on the bundled sample's
text; both are seeded, so the same `model.tiny_seed` gives the same model.
"""

from __future__ import annotations

from pathlib import Path

import torch
from peft import LoraConfig as PeftLoraConfig
from peft import get_peft_model

from loratrace.config import Config, LoraConfig, ModelConfig
from loratrace.data.datasets import LETTERS, SAMPLE_DIR, load_split
from loratrace.errors import CheckpointError, LoratraceError, first_line
from loratrace.training.checkpoints import read_checkpoint
from loratrace.training.module import lora_mismatch

PRETRAINED_DIR = Path(__file__).parents[1] / "sample" / "tiny_base"
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
TINY_VOCAB = 1024
SHAPES = {  # real models' configs, for random-weight stand-ins built offline (`model.tiny_shape`)
    "qwen2.5-0.5b": ("qwen2", {
        "vocab_size": 151936, "hidden_size": 896, "intermediate_size": 4864, "num_hidden_layers": 24,
        "num_attention_heads": 14, "num_key_value_heads": 2, "max_position_embeddings": 32768,
        "rope_theta": 1000000.0, "rms_norm_eps": 1e-6, "tie_word_embeddings": True,
    }),
}


class ModelError(LoratraceError):
    """A base model the user named, or a run's saved one, that cannot be loaded."""


def _tiny_corpus() -> list[str]:
    texts = []
    for split in ("train", "validation", "test"):
        if (SAMPLE_DIR / f"{split}.jsonl").is_file():
            texts += [e.prompt + " " + e.gold_label for e in load_split("arc-challenge", "sample", split)]
    # Every answer label as its own word, so " A" .. " J" are single tokens whatever the corpus.
    texts += [" ".join(f"Answer: {letter}" for letter in LETTERS)] * 200
    return texts


def build_tiny_tokenizer():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.BPE(unk_token=None))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=TINY_VOCAB, special_tokens=["<pad>", "<s>", "</s>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False,
    )
    tokenizer.train_from_iterator(_tiny_corpus(), trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, pad_token="<pad>", bos_token="<s>", eos_token="</s>", padding_side="right",
    )


def build_tiny_model(cfg: ModelConfig, vocab_size: int):
    from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

    shape = {
        "vocab_size": vocab_size, "hidden_size": cfg.tiny_hidden_size, "intermediate_size": cfg.tiny_hidden_size * 2,
        "num_hidden_layers": cfg.tiny_layers, "num_attention_heads": 4, "num_key_value_heads": 2,
        "max_position_embeddings": 1024, "pad_token_id": 0, "bos_token_id": 1, "eos_token_id": 2,
        "tie_word_embeddings": False,
    }
    arch = cfg.tiny_arch
    if cfg.tiny_shape != "none":
        arch, named = SHAPES[cfg.tiny_shape]
        shape = {**shape, **named}
    config_cls, model_cls = (LlamaConfig, LlamaForCausalLM) if arch == "llama" else (Qwen2Config, Qwen2ForCausalLM)
    state = torch.random.get_rng_state()
    torch.manual_seed(cfg.tiny_seed)
    try:
        model = model_cls(config_cls(**shape))
    finally:
        torch.random.set_rng_state(state)  # building the base must not move the training RNG
    return model.to(DTYPES[cfg.dtype])


def uses_pretrained_tiny(cfg: ModelConfig) -> bool:
    """The shipped base has the default shape: any shape key set away from its default asks for a random base."""
    shape_keys = ("tiny_arch", "tiny_seed", "tiny_hidden_size", "tiny_layers", "tiny_shape")
    default = ModelConfig()
    return cfg.name == "tiny" and cfg.tiny_pretrained and all(
        getattr(cfg, key) == getattr(default, key) for key in shape_keys)


def load_pretrained_tiny(dtype: str = "float32"):
    """(model, tokenizer) of the shipped pre-trained tiny base, read from the package, offline."""
    from transformers import PreTrainedTokenizerFast

    if not (PRETRAINED_DIR / "model.safetensors").is_file():
        raise ModelError(f"the shipped tiny base is missing from {PRETRAINED_DIR}; reinstall loratrace or run "
                         "python -m loratrace.sample.pretrain_tiny (or set model.tiny_pretrained=false)")
    tokenizer = PreTrainedTokenizerFast.from_pretrained(PRETRAINED_DIR, local_files_only=True)
    tokenizer.padding_side = "right"
    model = load_small_model(PRETRAINED_DIR, dtype=DTYPES[dtype])
    return model, tokenizer


def load_small_model(directory: Path, **kwargs):
    """`AutoModelForCausalLM.from_pretrained` of a local few-MB model (the tiny base, a run's base_model/), without
    transformers' "Loading weights" bar: it takes no time, and the bar would only clutter eval and import output."""
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as transformers_logging

    bars = transformers_logging.is_progress_bar_enabled()
    transformers_logging.disable_progress_bar()
    try:
        return AutoModelForCausalLM.from_pretrained(directory, local_files_only=True, **kwargs)
    finally:
        if bars:
            transformers_logging.enable_progress_bar()


def load_base(cfg: ModelConfig):
    """(model, tokenizer) for `cfg.name`: tiny preset (shipped pre-trained or random), local folder or hub id."""
    if uses_pretrained_tiny(cfg):
        return load_pretrained_tiny(cfg.dtype)
    if cfg.name == "tiny":
        tokenizer = build_tiny_tokenizer()
        return build_tiny_model(cfg, len(tokenizer)), tokenizer
    from transformers import AutoModelForCausalLM, AutoTokenizer

    where = "local folder" if Path(cfg.name).exists() else "hub model"
    try:
        tokenizer = AutoTokenizer.from_pretrained(cfg.name, trust_remote_code=cfg.trust_remote_code)
        model = AutoModelForCausalLM.from_pretrained(cfg.name, dtype=DTYPES[cfg.dtype],
                                                     trust_remote_code=cfg.trust_remote_code)
    except (OSError, ValueError) as exc:
        first = first_line(exc)
        raise ModelError(f"could not load {where} {cfg.name!r}: {first}") from None
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "right"
    return model, tokenizer


def add_lora(model, cfg: LoraConfig, seed: int):
    """Freeze the base and add LoRA adapters; the adapters' init is seeded by the training seed."""
    names = {name.rsplit(".", 1)[-1] for name, _ in model.named_modules()}
    missing = [m for m in cfg.target_modules if m not in names]
    if missing:
        raise ModelError(f"lora.target_modules: the model has no module named {missing[0]!r}")
    torch.manual_seed(seed)
    peft_config = PeftLoraConfig(r=cfg.r, lora_alpha=cfg.alpha, lora_dropout=cfg.dropout,
                                 target_modules=list(cfg.target_modules), task_type="CAUSAL_LM")
    return get_peft_model(model, peft_config)


def trainable_parameter_count(model) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


# ------------------------------------------------------------------------------------ a finished run's model

def load_run_model(cfg: Config, run_dir: Path):
    """(peft_model, tokenizer) of a run: its base (the tiny preset's from the run's `base_model/`) with fresh LoRA
    adapters, for eval, export and influence to load each checkpoint's tensors into (`load_lora_weights`)."""
    from transformers import AutoTokenizer

    if cfg.model.name == "tiny":
        base_dir = Path(run_dir) / "base_model"
        if not base_dir.is_dir():
            raise ModelError(f"{run_dir} has no base_model/ (the tiny preset's base is saved there); copy the run "
                             "folder whole")
        model = load_small_model(base_dir)
        tokenizer = AutoTokenizer.from_pretrained(base_dir)
    else:
        model, tokenizer = load_base(cfg.model)
    return add_lora(model, cfg.lora, cfg.training.seed), tokenizer


def load_lora_weights(peft_model, checkpoint: Path) -> None:
    """Put a loratrace `.ckpt`'s LoRA tensors into `peft_model`; an unreadable file or a shape or name mismatch is
    one CheckpointError line."""
    state = read_checkpoint(checkpoint).get("state_dict", {})
    weights = {k.removeprefix("model."): v for k, v in state.items()}  # LoRAModule keeps the PEFT model as .model
    problem = lora_mismatch(peft_model, weights)
    if problem:
        raise CheckpointError(f"{checkpoint.name}: {problem}")
    peft_model.load_state_dict(weights, strict=False)
