import torch

from loratrace.config import LoraConfig, ModelConfig
from loratrace.data.datasets import LETTERS
from loratrace.training.model import add_lora, load_base, trainable_parameter_count


def test_tiny_preset_is_deterministic_and_offline():
    model_a, tok_a = load_base(ModelConfig())
    model_b, tok_b = load_base(ModelConfig())
    assert tok_a.get_vocab() == tok_b.get_vocab()
    for (name, a), (_, b) in zip(model_a.state_dict().items(), model_b.state_dict().items()):
        assert torch.equal(a, b), name
    other, _ = load_base(ModelConfig(tiny_seed=1))
    assert not torch.equal(other.lm_head.weight, model_a.lm_head.weight)


def test_answer_labels_are_single_tokens():
    _, tokenizer = load_base(ModelConfig())
    for letter in LETTERS:
        assert len(tokenizer.encode(" " + letter, add_special_tokens=False)) == 1


def test_qwen2_arch_and_lora_freeze_the_base():
    model, _ = load_base(ModelConfig(tiny_arch="qwen2"))
    assert type(model).__name__ == "Qwen2ForCausalLM"
    peft_model = add_lora(model, LoraConfig(r=4), seed=0)
    trainable = {n for n, p in peft_model.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n for n in trainable)
    # r=4 on q,k,v,o of 2 layers, hidden 64: A is r x in, B is out x r
    assert trainable_parameter_count(peft_model) > 0


def test_tiny_shape_builds_the_named_models_shape():
    from loratrace.config import CHOICES
    from loratrace.training.model import SHAPES, build_tiny_model

    assert set(CHOICES["model.tiny_shape"]) == {"none", *SHAPES}
    with torch.device("meta"):
        model = build_tiny_model(ModelConfig(tiny_shape="qwen2.5-0.5b"), vocab_size=1024)
    assert model.config.model_type == "qwen2"
    assert (model.config.vocab_size, model.config.hidden_size, model.config.num_hidden_layers) == (151936, 896, 24)
    assert 490e6 < sum(p.numel() for p in model.parameters()) < 500e6  # Qwen2.5-0.5B: 494M with tied embeddings


def test_tiny_preset_is_the_shipped_pretrained_base_unless_a_shape_key_is_set(monkeypatch):
    from safetensors.torch import load_file

    from loratrace.training.model import PRETRAINED_DIR

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    model, tokenizer = load_base(ModelConfig())
    shipped = load_file(PRETRAINED_DIR / "model.safetensors")
    for name, tensor in model.state_dict().items():
        assert torch.equal(tensor, shipped[name]), name
    # it knows the facts it was pre-trained on: "A whale is a" -> " mammal"
    ids = [tokenizer.bos_token_id, *tokenizer.encode("A whale is a", add_special_tokens=False)]
    with torch.no_grad():
        probs = model(torch.tensor([ids])).logits[0, -1].softmax(-1)
    assert probs[tokenizer.encode(" mammal", add_special_tokens=False)[0]] > 0.5
    for random_base in (ModelConfig(tiny_pretrained=False), ModelConfig(tiny_seed=1), ModelConfig(tiny_layers=3)):
        other, _ = load_base(random_base)
        assert not torch.equal(other.lm_head.weight[:10, :10], model.lm_head.weight[:10, :10])
    # the shape keys' defaults describe the shipped base
    assert (model.config.hidden_size, model.config.num_hidden_layers) == (ModelConfig().tiny_hidden_size,
                                                                          ModelConfig().tiny_layers)
