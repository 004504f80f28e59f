"""Constrained decoding for the torch runtime, with xgrammar (the engine vLLM uses).

A ``Guide`` (``response_format``, or a tool call that ``tool_choice`` forces) is compiled
once into a grammar over the model's vocabulary and kept in a bounded LRU; each sequence
of a batch that follows one gets its own matcher, which masks the logits of the tokens
the grammar does not allow at this step and accepts each token sampled. JSON is generated
without free whitespace (so that a model cannot pad its way to ``max_tokens``), and schemas
in strict mode: no properties or items the schema does not name.

Schema features that xgrammar would ignore (and so not guarantee) are refused with a 400
that names them, before any work. xgrammar is imported only when a model loads.
"""

from __future__ import annotations

import collections
import json
import re
import threading
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

from haif.exceptions import InvalidRequest

if TYPE_CHECKING:
    import torch

    from haif.runtimes.base import Guide

GRAMMAR_CACHE_ENTRIES = 64
SEPARATORS = (",", ":")  # compact JSON, as vLLM writes it without free whitespace
# String formats xgrammar's JSON-schema converter turns into a grammar.
_FORMATS = frozenset({
    "email", "date", "time", "date-time", "duration", "ipv4", "ipv6", "hostname", "uuid", "uri",
    "uri-reference", "uri-template", "json-pointer", "relative-json-pointer",
})
# Keywords xgrammar's converter skips without a word: a schema that uses them is not enforced.
_IGNORED = frozenset({"not", "if", "then", "else", "dependentSchemas", "dependentRequired"})
_LOCATION = re.compile(r"^\[[^\]]*\] \S+:\d+: ")  # xgrammar's "[time] file.cc:123: " prefix


def unsupported_feature(schema: Any, path: str = "$") -> str | None:
    """The first keyword of ``schema`` that xgrammar cannot enforce, with where it is; None
    when it can enforce all of it."""
    if isinstance(schema, list):
        for i, item in enumerate(schema):
            found = unsupported_feature(item, f"{path}[{i}]")
            if found:
                return found
        return None
    if not isinstance(schema, dict):
        return None
    types = schema.get("type")
    kinds = {types} if isinstance(types, str) else set(types) if isinstance(types, list) else set()
    bad: str | None = None
    if kinds & {"integer", "number"} and "multipleOf" in schema:
        bad = "multipleOf"
    elif "array" in kinds and (set(schema) & {"uniqueItems", "contains", "minContains", "maxContains"}):
        bad = sorted(set(schema) & {"uniqueItems", "contains", "minContains", "maxContains"})[0]
    elif "string" in kinds and "format" in schema and not (
        isinstance(schema["format"], str) and schema["format"] in _FORMATS
    ):
        bad = f"format {schema['format']!r}"
    elif "string" in kinds and ({"pattern", "format"} & set(schema)) and ({"minLength", "maxLength"} & set(schema)):
        bad = "minLength/maxLength together with pattern/format"
    elif "propertyNames" in schema or "patternProperties" in schema:
        bad = "propertyNames" if "propertyNames" in schema else "patternProperties"
    elif isinstance(schema.get("allOf"), list) and len(schema["allOf"]) > 1:
        bad = "allOf with several branches"
    elif set(schema) & _IGNORED:
        bad = sorted(set(schema) & _IGNORED)[0]
    if bad is not None:
        return f"{bad} (at {path})"
    for key, value in schema.items():
        if key in ("enum", "const", "default", "examples"):
            continue  # values, not schemas
        found = unsupported_feature(value, f"{path}.{key}")
        if found:
            return found
    return None


# The characters xgrammar 0.2.8 lets into a JSON string, and what goes in their place: its
# length-bounded strings (minLength/maxLength) let raw control characters through, and both
# classes let UTF-16 surrogates through, encoded as UTF-8 (invalid UTF-8, which decodes to
# U+FFFD and breaks maxLength). The JSON string character: no control character, no quote
# or backslash (escapes are a rule of their own), no surrogate.
_STRING_CHARS = ('[^\\"\\\\\\r\\n]', '[^\\0-\\x1f\\"\\\\\\r\\n]')
JSON_STRING_CHAR = '[^\\0-\\x1f\\"\\\\\\uD800-\\uDFFF]'


def guide_ebnf(guide: Guide) -> str:
    """The grammar of ``guide`` as xgrammar's EBNF (what both the torch runtime and vLLM's
    xgrammar backend compile), JSON without free whitespace.

    Raises:
        InvalidRequest: the schema is not JSON, uses a feature xgrammar cannot enforce, or
            xgrammar refuses it (the message says which and where).
    """
    import xgrammar as xgr

    if guide.kind == "json_object":
        text, strict = '{"type": "object"}', False
    else:
        text, strict = guide.schema or "{}", True
        try:
            schema = json.loads(text)
        except ValueError as exc:
            raise InvalidRequest(f"{guide.param}: the schema is not JSON: {exc}") from None
        bad = unsupported_feature(schema)
        if bad is not None:
            raise InvalidRequest(f"{guide.param}: the schema uses {bad}, which is not supported")
    # xgrammar's refusals of a schema (RuntimeError from its C++ checks, ValueError and
    # TypeError from its Python side, OverflowError for numbers out of its range) are the
    # client's: the schema cannot be served. The EBNF is parsed back so that what only the
    # parser sees (a negative minLength) is refused here too, not in an engine.
    try:
        grammar = xgr.Grammar.from_json_schema(
            text, any_whitespace=False, separators=SEPARATORS, strict_mode=strict
        )
        ebnf = str(grammar)
        for chars in _STRING_CHARS:
            ebnf = ebnf.replace(chars, JSON_STRING_CHAR)
        xgr.Grammar.from_ebnf(ebnf)
    except (RuntimeError, ValueError, TypeError, OverflowError) as exc:
        message = _LOCATION.sub("", str(exc).strip())
        raise InvalidRequest(f"{guide.param}: the schema is not supported: {message}") from None
    return ebnf


class GrammarCompiler:
    """Compiles guides for one model's vocabulary; compiled grammars are cached (LRU).

    Thread-safe: the event loop compiles (before a request is queued, so that a refused
    schema is a 400 at once) while the batch thread matches.
    """

    def __init__(
        self, tokenizer: Any, vocab_size: int, stop_ids: frozenset[int],
        max_entries: int = GRAMMAR_CACHE_ENTRIES,
    ) -> None:
        import xgrammar as xgr

        info = xgr.TokenizerInfo.from_huggingface(
            tokenizer, vocab_size=vocab_size, stop_token_ids=sorted(stop_ids)
        )
        self.vocab_size = vocab_size
        self._compiler = xgr.GrammarCompiler(info, max_threads=1, cache_enabled=False)
        self._cache: collections.OrderedDict[tuple[str, str | None], Any] = collections.OrderedDict()
        self._max_entries = max_entries
        self._lock = threading.Lock()
        self.compiled = 0  # compilations done (cache misses), for tests and stats

    def cached(self, guide: Guide) -> Any | None:
        key = (guide.kind, guide.schema)
        with self._lock:
            found = self._cache.get(key)
            if found is not None:
                self._cache.move_to_end(key)
            return found

    def compile(self, guide: Guide) -> Any:
        """The compiled grammar of ``guide``, from the cache when it is there.

        Raises:
            InvalidRequest: the schema is not JSON, uses a feature xgrammar cannot
                enforce, or xgrammar refuses it (the message says which and where).
        """
        found = self.cached(guide)
        if found is not None:
            return found
        compiled = self._compile(guide)
        with self._lock:
            self._cache[(guide.kind, guide.schema)] = compiled
            self.compiled += 1
            while len(self._cache) > self._max_entries:
                self._cache.popitem(last=False)
        return compiled

    def _compile(self, guide: Guide) -> Any:
        return self._compiler.compile_grammar(guide_ebnf(guide))

    def matcher(self, compiled: Any) -> Matcher:
        return Matcher(compiled)


class Matcher:
    """One sequence's progress through its grammar (the batch thread only)."""

    def __init__(self, compiled: Any) -> None:
        import xgrammar as xgr

        self._matcher = xgr.GrammarMatcher(compiled)

    @property
    def terminated(self) -> bool:
        """The grammar has accepted a stop token: the output is complete."""
        return bool(self._matcher.is_terminated())

    def fill(self, bitmask: torch.Tensor, row: int) -> None:
        self._matcher.fill_next_token_bitmask(bitmask, row)

    def accept(self, token_id: int) -> bool:
        return bool(self._matcher.accept_token(token_id))


class BatchMask:
    """The token mask of a batch's guided rows, one bitmask for them all."""

    def __init__(self, rows: int, vocab_size: int) -> None:
        import xgrammar as xgr

        self._bitmask = xgr.allocate_token_bitmask(rows, vocab_size)
        self.vocab_size = vocab_size

    def apply(self, logits: torch.Tensor, matchers: Iterator[tuple[int, Matcher]]) -> None:
        """Mask, in place, the logits of every row ``matchers`` names (row index, matcher)."""
        import xgrammar as xgr

        rows: list[int] = []
        for row, matcher in matchers:
            matcher.fill(self._bitmask, row)
            rows.append(row)
        if not rows:
            return
        bitmask = self._bitmask if logits.device.type == "cpu" else self._bitmask.to(logits.device)
        xgr.apply_token_bitmask_inplace(logits, bitmask[: logits.shape[0]], vocab_size=self.vocab_size,
                                        indices=rows)
