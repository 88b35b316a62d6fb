"""Answers constrained to JSON (OpenAI's ``response_format``) through llguidance, as vLLM does.

llguidance compiles a JSON schema into a grammar and, at each step, gives the tokens that keep
the answer valid; :class:`JsonGrammar` is the logits processor that masks every other token
for one row (end-of-turn is allowed once the JSON is complete). The JSON is compact (no free
whitespace between tokens), so a small model cannot wander off into blank lines. llguidance
is an optional dependency (``pip install 'phiclip[serve]'``).
"""

from __future__ import annotations

import threading

import numpy as np
import torch
from transformers import LogitsProcessor

try:
    import llguidance
    import llguidance.hf
except ImportError:
    llguidance = None

COMPILE_OPTIONS = {"whitespace_flexible": False}
_tokenizers: dict[tuple[int, tuple[int, ...]], tuple[object, object]] = {}
_tokenizers_lock = threading.Lock()


def available() -> bool:
    return llguidance is not None


def compile_schema(schema: dict) -> str:
    """The llguidance grammar for a JSON schema; ``ValueError`` naming what is wrong with the schema."""
    if llguidance is None:
        raise ImportError("JSON answers need llguidance: pip install 'phiclip[serve]' (or pip install llguidance)")
    if not isinstance(schema, dict):
        raise ValueError(f"a JSON schema must be an object, got {type(schema).__name__}")
    try:
        grammar = llguidance.LLMatcher.grammar_from_json_schema(schema, defaults=COMPILE_OPTIONS)
    except (ValueError, TypeError) as err:
        raise ValueError(f"invalid JSON schema: {err}") from err
    error = llguidance.LLMatcher.validate_grammar(grammar)
    if error:
        raise ValueError(f"the JSON schema cannot be used: {error}")
    return grammar


def _grammar_tokenizer(tokenizer, eos: tuple[int, ...]):
    """llguidance's view of the tokenizer (built once per tokenizer, ~0.3 s)."""
    key = (id(tokenizer), eos)
    with _tokenizers_lock:
        if key not in _tokenizers:
            _tokenizers[key] = (tokenizer, llguidance.hf.from_tokenizer(tokenizer, eos_token=list(eos)))
        return _tokenizers[key][1]


class JsonGrammar(LogitsProcessor):
    """One row's JSON constraint: masks tokens the grammar does not allow; :meth:`consume` takes the chosen one."""

    def __init__(self, schema: dict, tokenizer, eos: tuple[int, ...]) -> None:
        self.matcher = llguidance.LLMatcher(_grammar_tokenizer(tokenizer, eos), compile_schema(schema))
        if self.matcher.is_error():
            raise ValueError(f"the JSON schema cannot be used: {self.matcher.get_error()}")

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        bits = np.unpackbits(np.frombuffer(self.matcher.compute_bitmask(), dtype=np.uint8), bitorder="little")
        vocab = scores.shape[-1]
        allowed = torch.zeros(vocab, dtype=torch.bool)
        n = min(vocab, bits.size)
        allowed[:n] = torch.from_numpy(bits[:n].astype(bool))
        return scores.masked_fill(~allowed.to(scores.device), float("-inf"))

    def consume(self, token: int) -> None:
        self.matcher.consume_token(token)
