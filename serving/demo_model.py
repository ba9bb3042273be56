"""Builds the embedded demo model: a tiny random-weight Llama with a BPE tokenizer.

Nothing can be downloaded from a model hub on our machines, so the default model is made
here, deterministically, from a corpus the repository ships. Its output is gibberish; its
mechanics (tokenizer, chat template, KV cache, sampling, streaming) are the real ones.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import tempfile
from pathlib import Path
from typing import Any

# head_dim 64: vLLM's CPU attention kernels reject head_dim 16.
LLAMA_SHAPE: dict[str, Any] = dict(  # LlamaConfig keywords of several types
    hidden_size=256,
    intermediate_size=512,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
)
VOCAB_SIZE = 2048
MAX_POSITIONS = 2048
SEED = 1234
SPECIAL_TOKENS = ["<|begin_of_text|>", "<|end_of_text|>", "<|pad|>", "<|start|>", "<|end|>"]
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "<|start|>{{ message['role'] }}\n{{ message['content'] }}<|end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|start|>assistant\n{% endif %}"
)
BUILD_MARKER = "keel-build.json"


def build_demo_model(out_dir: Path, corpus: Path) -> Path:
    """Write the model into out_dir (replaced atomically); return out_dir."""
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    out_dir = Path(out_dir)
    text = corpus.read_text(encoding="utf-8")
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    # One document per paragraph keeps training deterministic and the merges sensible.
    tok.train_from_iterator([p for p in text.split("\n\n") if p.strip()], trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<|begin_of_text|>",
        eos_token="<|end_of_text|>",
        pad_token="<|pad|>",
        model_max_length=MAX_POSITIONS,
    )
    fast.chat_template = CHAT_TEMPLATE

    torch.manual_seed(SEED)
    # torch_dtype: the name transformers >= 4.45 all read (5.x maps it to `dtype`; its typed signature lacks it)
    config = LlamaConfig(  # type: ignore[call-arg]
        vocab_size=len(fast),
        max_position_embeddings=MAX_POSITIONS,
        bos_token_id=fast.bos_token_id,
        eos_token_id=fast.eos_token_id,
        pad_token_id=fast.pad_token_id,
        tie_word_embeddings=False,
        torch_dtype="float32",
        **LLAMA_SHAPE,
    )
    model = LlamaForCausalLM(config)
    model.generation_config.eos_token_id = fast.eos_token_id

    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=out_dir.name + ".", dir=out_dir.parent))
    try:
        model.save_pretrained(tmp, safe_serialization=True)
        fast.save_pretrained(tmp)
        (tmp / BUILD_MARKER).write_text(
            json.dumps({"corpus_sha256": _sha256(corpus), "seed": SEED, **LLAMA_SHAPE}, indent=2)
        )
        if out_dir.exists():
            shutil.rmtree(out_dir)
        tmp.chmod(0o755)
        tmp.rename(out_dir)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)
    return out_dir


def is_built(out_dir: Path, corpus: Path) -> bool:
    marker = Path(out_dir) / BUILD_MARKER
    if not marker.is_file() or not (Path(out_dir) / "model.safetensors").is_file():
        return False
    return json.loads(marker.read_text()).get("corpus_sha256") == _sha256(corpus)


def _sha256(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()
