"""The built-in backend of ``specforge-mcore regenerate``: the target itself, through HF transformers.

For small targets and the CPU demo. Each call renders its contexts with the tokenizer's chat template
(``add_generation_prompt=True``, ``enable_thinking`` when set), pads them on the left into one batch and
runs ``model.generate`` with the KV cache. An answer ends at the first end-of-sequence id (the generation
config's, the tokenizer's, and the template's end-of-turn token): ``finish_reason`` "stop", or "length"
when ``max_new_tokens`` came first. The text is the decoded tokens before that id, untouched.

Sampling parameters other than temperature and top_p (top_k, min_p, ...) follow the model's
``generation_config.json``, as SGLang and vLLM do by default. A sampled batch is seeded from ``seed`` and
its first context, so the same batch samples the same way again; greedy answers do not depend on the
batch at all.
"""

from __future__ import annotations

import copy
import os
from typing import Optional

import torch
from jinja2 import TemplateError
from transformers import AutoModelForCausalLM, AutoTokenizer

from specforge_mcore.data.regen_backends import Reply, Settings
from specforge_mcore.data.tokenize import end_of_turn_marker, pad_token_id
from specforge_mcore.errors import UserError
from specforge_mcore.eval.speculative import eos_token_ids

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class LocalBackend:
    name = "local"
    workers = 1  # one batch at a time: the model uses every core it is given

    def __init__(self, model, tokenizer, settings: Settings, batch_size: int = 8, model_name: str = "",
                 max_context_tokens: Optional[int] = None):
        settings.check()
        if batch_size < 1:
            raise UserError(f"--batch-size {batch_size}: expected at least 1 conversation per batch")
        if max_context_tokens is not None and max_context_tokens < 1:
            raise UserError(f"--max-context-tokens {max_context_tokens}: expected a positive number of tokens")
        self.max_context_tokens = max_context_tokens
        self.model, self.tokenizer, self.settings, self.batch_size = model, tokenizer, settings, batch_size
        self.model_name = model_name or str(getattr(model, "name_or_path", "") or "model")
        self.pad_id = pad_token_id(tokenizer)
        self.stop_ids = eos_token_ids(model, tokenizer)
        marker = tokenizer.encode(end_of_turn_marker(tokenizer), add_special_tokens=False)
        if len(marker) == 1:
            self.stop_ids.add(int(marker[0]))
        if not self.stop_ids:
            raise UserError(f"{self.model_name}: neither the generation config nor the tokenizer names an "
                            f"end-of-sequence token; an answer would never end")
        config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
        self.max_positions: Optional[int] = getattr(config, "max_position_embeddings", None)
        self.generation_config = self._generation_config()

    @classmethod
    def from_dir(cls, target_dir: str, settings: Settings, batch_size: int = 8, dtype: str = "float32",
                 tokenizer_dir: Optional[str] = None, max_context_tokens: Optional[int] = None) -> "LocalBackend":
        if dtype not in DTYPES:
            raise UserError(f"--dtype {dtype!r}: expected one of {', '.join(DTYPES)}")
        if not os.path.isfile(os.path.join(target_dir, "config.json")):
            raise UserError(f"--target {target_dir}: no config.json (expected an HF model directory)")
        try:
            tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir or target_dir)
            model = AutoModelForCausalLM.from_pretrained(target_dir, dtype=DTYPES[dtype],
                                                         attn_implementation="sdpa").eval()
        except (OSError, ValueError) as exc:
            raise UserError(f"--target {target_dir}: cannot load the model or its tokenizer: {exc}") from None
        if not isinstance(tokenizer.chat_template, str) or not tokenizer.chat_template:
            raise UserError(f"--target {tokenizer_dir or target_dir}: the tokenizer has no chat template; "
                            f"regenerate renders every context with it")
        return cls(model, tokenizer, settings, batch_size, model_name=os.path.abspath(target_dir),
                   max_context_tokens=max_context_tokens)

    def _generation_config(self):
        s = self.settings
        config = copy.deepcopy(self.model.generation_config)
        if s.sampling:
            config.update(do_sample=True, temperature=s.temperature, top_p=s.top_p)
        else:
            config.update(do_sample=False, temperature=None, top_p=None, top_k=None, min_p=None)
        config.update(max_new_tokens=s.max_new_tokens, pad_token_id=self.pad_id,
                      eos_token_id=sorted(self.stop_ids), use_cache=True, num_return_sequences=1)
        return config

    def prompt_text(self, messages: list[dict]) -> str:
        """The context as the model sees it: the chat template with the generation prompt."""
        return self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True,
                                                  **self.settings.template_kwargs())

    def generate(self, contexts: list[list[dict]]) -> list[Reply]:
        replies: list[Optional[Reply]] = [None] * len(contexts)
        texts, rows = [], []
        for i, messages in enumerate(contexts):
            try:
                texts.append(self.prompt_text(messages))
                rows.append(i)
            except TemplateError as exc:  # e.g. raise_exception('roles must alternate')
                replies[i] = Reply(refused=f"chat template: {exc}")
        if texts:
            encoded = self.tokenizer(texts, add_special_tokens=False, padding=True, padding_side="left",
                                     return_tensors="pt")
            lengths = encoded["attention_mask"].sum(dim=1).tolist()
            keep = []
            for j, n in enumerate(lengths):
                if self.max_positions and n + self.settings.max_new_tokens > self.max_positions:
                    replies[rows[j]] = Reply(refused=f"prompt too long: {n} tokens plus --max-new-tokens "
                                                     f"{self.settings.max_new_tokens} exceed the model's "
                                                     f"{self.max_positions} positions")
                elif self.max_context_tokens and n > self.max_context_tokens:
                    replies[rows[j]] = Reply(refused=f"context too long: {n} tokens, --max-context-tokens "
                                                     f"{self.max_context_tokens}")
                else:
                    keep.append(j)
            if keep:
                for j, reply in zip(keep, self._run(encoded["input_ids"][keep], encoded["attention_mask"][keep],
                                                    contexts[rows[keep[0]]])):
                    replies[rows[j]] = reply
        return [r if r is not None else Reply(failed="no answer") for r in replies]

    @torch.no_grad()
    def _run(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, first: list[dict]) -> list[Reply]:
        # Rows dropped above leave columns of padding on the left of every remaining row: trim them.
        start = int((attention_mask.sum(dim=0) > 0).nonzero()[0])
        input_ids, attention_mask = input_ids[:, start:], attention_mask[:, start:]
        if self.settings.sampling:
            torch.manual_seed(self.settings.context_seed(first))
        device = next(self.model.parameters()).device
        output = self.model.generate(input_ids=input_ids.to(device), attention_mask=attention_mask.to(device),
                                     generation_config=self.generation_config)
        new = output[:, input_ids.shape[1]:].tolist()
        replies = []
        for tokens in new:
            end = next((k for k, t in enumerate(tokens) if t in self.stop_ids), None)
            answer = tokens if end is None else tokens[:end]
            replies.append(Reply(text=self.tokenizer.decode(answer, skip_special_tokens=False),
                                 finish_reason="length" if end is None else "stop",
                                 tokens=len(tokens) if end is None else end + 1))
        return replies
