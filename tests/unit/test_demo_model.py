"""The embedded demo model builds deterministically and loads as a real HF checkout."""

from pathlib import Path

from serving.demo_model import build_demo_model, is_built

CORPUS = Path(__file__).resolve().parents[2] / "models" / "demo-tiny" / "corpus.txt"


def test_build_is_deterministic_and_loadable(tmp_path):
    from transformers import AutoConfig, AutoTokenizer

    a = build_demo_model(tmp_path / "a", CORPUS)
    b = build_demo_model(tmp_path / "b", CORPUS)
    for name in ("model.safetensors", "tokenizer.json", "config.json"):
        assert (a / name).read_bytes() == (b / name).read_bytes(), name
    assert is_built(a, CORPUS)
    tok = AutoTokenizer.from_pretrained(a)
    assert tok.vocab_size <= 2048 + 8
    prompt = tok.apply_chat_template([{"role": "user", "content": "hello"}], tokenize=False, add_generation_prompt=True)
    assert prompt.endswith("<|start|>assistant\n")
    cfg = AutoConfig.from_pretrained(a)
    assert cfg.hidden_size // cfg.num_attention_heads == 64  # vLLM's CPU kernels need head_dim 64
