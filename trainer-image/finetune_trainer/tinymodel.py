"""Build a tiny random causal LM with a real tokenizer and chat template, fully offline.

Used by the tests, the embedded demo and the benchmarks: nothing is downloaded. The model
is random but small enough to learn a synthetic task in seconds on a CPU.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerFast

CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "<|{{ message['role'] }}|>\n{{ message['content'] }}<|end|>\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)

SPECIAL_TOKENS = ["<|pad|>", "<|bos|>", "<|end|>", "<|system|>", "<|user|>", "<|assistant|>"]

# A small corpus so byte-level BPE learns common English and JSON pieces.
_CORPUS = [
    "The quick brown fox jumps over the lazy dog.",
    "Summarise the ticket and answer in JSON with the fields intent and priority.",
    '{"intent": "refund", "priority": "high"}',
    '{"intent": "question", "priority": "low"}',
    '{"answer": "yes", "confidence": 0.9}',
    "I can't help with that request. 죄송하지만 도와드릴 수 없습니다.",
    "Hello! How can I help you today? Please describe the problem.",
    "Translate to French: good morning. Bonjour.",
    "What is the capital of France? Paris is the capital of France.",
    "user assistant system instruction input output prompt completion",
    "0 1 2 3 4 5 6 7 8 9 10 100 1000 , . : ; ! ? ' \" { } [ ] ( ) - _ / \\",
]


def build_tokenizer(vocab_size: int = 512) -> PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer with chat special tokens and a chat template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_CORPUS * 4, trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<|bos|>",
        eos_token="<|end|>",
        pad_token="<|pad|>",
    )
    fast.chat_template = CHAT_TEMPLATE
    return fast


def build_tiny_model(
    path: str | Path,
    *,
    hidden_size: int = 64,
    layers: int = 2,
    heads: int = 4,
    kv_heads: int = 2,
    intermediate_size: int = 128,
    max_positions: int = 1024,
    seed: int = 0,
    initializer_range: float = 0.02,
) -> Path:
    """Write a tiny random Llama model and its tokenizer to ``path`` and return it.

    A larger ``initializer_range`` gives the frozen output head weights big enough for a
    LoRA adapter to reach confident (low-loss) predictions in a few dozen steps.
    """
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    out = Path(path)
    out.mkdir(parents=True, exist_ok=True)
    tokenizer = build_tokenizer()
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=intermediate_size,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        max_position_embeddings=max_positions,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=False,
        initializer_range=initializer_range,
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    return out
