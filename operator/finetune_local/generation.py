"""Real text generation for the local vLLM reference server: a base model plus LoRA adapters.

The executor gives every reference server (one per serving replica) a
:class:`TransformersGenerator`. Weights are loaded once per base model folder and shared
by every server of this process (the replicas serve the same files; loading them once
keeps the demo's memory flat). Adapters are attached to that shared model under a name
derived from their manifest digest, so two revisions rolled to the same folder never mix.

Generation is greedy and runs in a worker thread: the servers' event loop keeps
answering ``/health`` and ``/metrics`` while a completion is computed.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

from .vllm_reference import GenerationRequest

PathMapper = Callable[[str], str]

_models: dict[str, _LoadedModel] = {}
_models_lock = threading.Lock()


def adapter_key(adapter_dir: str) -> str:
    """A peft adapter name for a folder: its manifest digest, else its path and file times."""
    root = Path(adapter_dir)
    try:
        manifest = json.loads((root / "manifest.json").read_text(encoding="utf-8"))
        identity = str(manifest["digest"])
    except (OSError, ValueError, KeyError):
        stamps = sorted(f"{p.name}:{p.stat().st_mtime_ns}" for p in root.glob("*") if p.is_file())
        identity = f"{root.resolve()}|{'|'.join(stamps)}"
    # peft keys adapters in module dicts: no dots, start with a letter.
    return "a" + hashlib.sha256(identity.encode()).hexdigest()[:16]


class _LoadedModel:
    """One base model with its tokenizer; adapters are added on first use."""

    def __init__(self, model_dir: str) -> None:
        from transformers import AutoModelForCausalLM, AutoTokenizer
        from transformers.utils import logging as transformers_logging

        transformers_logging.disable_progress_bar()  # a server log, not a terminal

        self.model_dir = model_dir
        self.tokenizer = AutoTokenizer.from_pretrained(model_dir)
        if self.tokenizer.pad_token is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        self.base = AutoModelForCausalLM.from_pretrained(model_dir)
        self.base.eval()
        self.peft: Any = None
        self.adapters: set[str] = set()
        self.lock = threading.Lock()

    def _attach(self, adapter_dir: str) -> str:
        import warnings

        from peft import PeftModel

        key = adapter_key(adapter_dir)
        if key in self.adapters:
            return key
        # peft still calls transformers' deprecated checkpointing query while loading.
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            self._load_adapter(PeftModel, adapter_dir, key)
        return key

    def _load_adapter(self, peft_model: Any, adapter_dir: str, key: str) -> None:
        if self.peft is None:
            self.peft = peft_model.from_pretrained(self.base, adapter_dir, adapter_name=key)
        else:
            self.peft.load_adapter(adapter_dir, adapter_name=key)
        self.peft.eval()
        self.adapters.add(key)

    def generate(
        self, messages: list[dict[str, Any]], adapter_dir: str | None, max_tokens: int
    ) -> str:
        import torch

        tok = self.tokenizer
        text = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        ids = tok(text, return_tensors="pt", add_special_tokens=False)["input_ids"]
        eos = tok.eos_token_id
        with self.lock, torch.no_grad():
            model: Any = self.base
            scope: Any = contextlib.nullcontext()
            if adapter_dir is not None:
                key = self._attach(adapter_dir)
                self.peft.set_adapter(key)
                model = self.peft
            elif self.peft is not None:
                model, scope = self.peft, self.peft.disable_adapter()
            with scope:
                out = model.generate(
                    input_ids=ids,
                    attention_mask=torch.ones_like(ids),
                    max_new_tokens=max_tokens,
                    do_sample=False,
                    pad_token_id=tok.pad_token_id,
                    eos_token_id=eos,
                )
        new_tokens = out[0, ids.shape[1] :].tolist()
        if eos in new_tokens:
            new_tokens = new_tokens[: new_tokens.index(eos)]
        return str(tok.decode(new_tokens, skip_special_tokens=True)).strip()


def loaded_model(model_dir: str) -> _LoadedModel:
    """The shared model for a folder, loaded on first use."""
    key = str(Path(model_dir).resolve())
    with _models_lock:
        if key not in _models:
            _models[key] = _LoadedModel(key)
        return _models[key]


class TransformersGenerator:
    """A ``generator`` for :class:`ReferenceServer`: greedy decoding with transformers.

    ``map_path`` turns paths as the serving container sees them (``--model``, runtime
    ``lora_path``) into local folders.
    """

    def __init__(self, model_dir: str, map_path: PathMapper | None = None) -> None:
        self.map_path = map_path or (lambda p: p)
        self.model_dir = self.map_path(model_dir)

    def _complete(self, req: GenerationRequest) -> str:
        model = loaded_model(self.model_dir)
        adapter = self.map_path(req.adapter_path) if req.adapter_path else None
        return model.generate(req.messages, adapter, max(1, req.max_tokens))

    async def __call__(self, req: GenerationRequest) -> str:
        return await asyncio.to_thread(self._complete, req)
