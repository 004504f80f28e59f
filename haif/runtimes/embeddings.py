"""The embeddings runtime: a sentence-transformers encoder (BERT-style) on torch.

The model directory is a sentence-transformers export: the Hugging Face model and
tokenizer, ``modules.json`` (Transformer -> Pooling -> optional Normalize),
``sentence_bert_config.json`` (``max_seq_length``) and the pooling module's
``config.json``. Vectors match ``SentenceTransformer.encode`` for the same model.

Unlike sentence-transformers, an input longer than the model's ``max_seq_length``
(or the platform's ``max_prompt_tokens``) is rejected with ``PromptTooLong`` rather
than silently truncated: a vector of the first 256 tokens of a long document is not
what the client asked for.

Concurrent ``embed`` calls share forward passes through a dynamic batcher: inputs
that arrive within ``torch.max_wait_ms`` of the oldest waiting one are merged, sorted by
length to reduce padding and run in micro-batches of at most ``torch.max_batch_size``
inputs. The forward pass runs in a thread so that the worker's event loop stays free.
"""

from __future__ import annotations

import asyncio
import collections
import json
import threading
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np

from haif.exceptions import HaifError, ModelLoadFailed, ModelNotReady, PromptTooLong
from haif.runtimes import hf
from haif.runtimes.base import EmbeddingOutput, Prompt, Runtime, quiet_transformers

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

    from haif.runtimes.base import RuntimeContext

PoolingMode = Literal["mean", "cls", "max"]

# A round of the batcher takes at most this many micro-batches' worth of inputs from
# the queue and sorts them by length: wide enough to group similar lengths, narrow
# enough that a call arriving later does not wait behind an unbounded round.
SORT_WINDOW_BATCHES = 4

_ST_TRANSFORMER = "sentence_transformers.models.Transformer"
_ST_POOLING = "sentence_transformers.models.Pooling"
_ST_NORMALIZE = "sentence_transformers.models.Normalize"
_POOLING_KEYS: dict[str, PoolingMode] = {
    "pooling_mode_mean_tokens": "mean",
    "pooling_mode_cls_token": "cls",
    "pooling_mode_max_tokens": "max",
}
_UNSUPPORTED_POOLING_KEYS = (
    "pooling_mode_mean_sqrt_len_tokens",
    "pooling_mode_weightedmean_tokens",
    "pooling_mode_lasttoken",
)


@dataclass(frozen=True)
class EncoderSpec:
    """How token states become one vector, as the sentence-transformers export says."""

    pooling: PoolingMode = "mean"
    normalize: bool = False
    max_seq_length: int | None = None
    do_lower_case: bool = False


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise ModelLoadFailed(f"cannot read {path}: {exc}") from exc


def _read_pooling(path: Path) -> PoolingMode:
    config = _read_json(path)
    unsupported = [key for key in _UNSUPPORTED_POOLING_KEYS if config.get(key)]
    modes = [mode for key, mode in _POOLING_KEYS.items() if config.get(key)]
    if unsupported or len(modes) != 1:
        raise ModelLoadFailed(
            f"{path}: only one of mean, cls or max pooling is supported, "
            f"got {sorted(k for k, v in config.items() if k.startswith('pooling_mode') and v)}"
        )
    return modes[0]


def read_encoder_spec(model_dir: Path) -> EncoderSpec:
    """Read pooling, normalisation and sequence length from a sentence-transformers export.

    A plain Hugging Face directory (no ``modules.json``) gets mean pooling without
    normalisation and the tokenizer's own length limit.

    Raises:
        ModelLoadFailed: the export names a module or pooling mode this runtime lacks.
    """
    modules_path = model_dir / "modules.json"
    if not modules_path.is_file():
        return EncoderSpec()
    pooling: PoolingMode | None = None
    normalize = False
    for module in _read_json(modules_path):
        kind = str(module.get("type", ""))
        if kind == _ST_TRANSFORMER:
            continue
        if kind == _ST_POOLING:
            pooling = _read_pooling(model_dir / module.get("path", "") / "config.json")
        elif kind == _ST_NORMALIZE:
            normalize = True
        else:
            # A Dense or other head changes the vectors; serving without it would be wrong.
            raise ModelLoadFailed(f"{modules_path}: module {kind!r} is not supported")
    if pooling is None:
        raise ModelLoadFailed(f"{modules_path}: no Pooling module")
    st_config_path = model_dir / "sentence_bert_config.json"
    st_config = _read_json(st_config_path) if st_config_path.is_file() else {}
    max_seq_length = st_config.get("max_seq_length")
    return EncoderSpec(
        pooling=pooling,
        normalize=normalize,
        max_seq_length=int(max_seq_length) if max_seq_length else None,
        do_lower_case=bool(st_config.get("do_lower_case", False)),
    )


@dataclass(frozen=True)
class _Encoded:
    input_ids: list[list[int]]
    token_type_ids: list[list[int]] | None


@dataclass(eq=False)
class _Call:
    """One ``embed`` call waiting for its rows."""

    future: asyncio.Future[np.ndarray]
    rows: list[np.ndarray | None]
    remaining: int

    def set_row(self, index: int, row: np.ndarray) -> None:
        if self.future.done():
            return
        self.rows[index] = row
        self.remaining -= 1
        if self.remaining == 0:
            self.future.set_result(np.stack(self.rows).astype(np.float32, copy=False))

    def fail(self, exc: BaseException) -> None:
        if not self.future.done():
            self.future.set_exception(exc)


@dataclass(eq=False)
class _Item:
    """One input of one call, as the batcher queues it."""

    call: _Call
    index: int
    input_ids: list[int]
    token_type_ids: list[int] | None
    enqueued_at: float


@dataclass
class _BatcherStats:
    batches: int = 0
    inputs: int = 0
    max_batch_seen: int = 0


@dataclass
class _Batcher:
    """The queue and task of one event loop."""

    loop: asyncio.AbstractEventLoop
    queue: collections.deque[_Item] = field(default_factory=collections.deque)
    wakeup: asyncio.Event = field(default_factory=asyncio.Event)
    task: asyncio.Task[None] | None = None
    in_flight: list[_Item] = field(default_factory=list)  # the round being run


class EmbeddingsRuntime(Runtime):
    name = "embeddings"
    capabilities = frozenset({"embed"})

    def __init__(self, ctx: RuntimeContext) -> None:
        super().__init__(ctx)
        self._model: PreTrainedModel | None = None
        self._tokenizer: PreTrainedTokenizerBase | None = None
        self._spec = EncoderSpec()
        self._max_seq_length = 0
        self._dim = 0
        self._pad_id = 0
        self._pad_type_id = 0
        # Fast tokenizers are not safe to call from several threads at once.
        self._tokenizer_lock = threading.Lock()
        self._batcher: _Batcher | None = None
        self._stats = _BatcherStats()

    # --- lifecycle -------------------------------------------------------------------

    async def load(self) -> None:
        if not self.ctx.model_dir:
            raise ModelLoadFailed(f"model {self.ctx.model.name!r} has no model directory")
        model_dir = Path(self.ctx.model_dir)
        try:
            await asyncio.to_thread(self._load_sync, model_dir)
        except HaifError:
            raise
        except Exception as exc:  # from_pretrained raises OSError, ValueError, RuntimeError...
            raise ModelLoadFailed(
                f"cannot load model {self.ctx.model.name!r} from {model_dir}: {exc}"
            ) from exc

    def _load_sync(self, model_dir: Path) -> None:
        import torch
        from transformers import AutoModel, AutoTokenizer

        if self.ctx.model.torch.threads:
            torch.set_num_threads(self.ctx.model.torch.threads)
        spec = read_encoder_spec(model_dir)
        quiet_transformers()
        tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
        dtype = getattr(torch, self.ctx.model.dtype)
        model = AutoModel.from_pretrained(str(model_dir), dtype=dtype)
        model.to(self.ctx.device)
        model.eval()

        limits = [spec.max_seq_length or tokenizer.model_max_length]
        max_positions = getattr(model.config, "max_position_embeddings", None)
        if isinstance(max_positions, int) and max_positions > 0:
            limits.append(max_positions)
        pad_id = tokenizer.pad_token_id
        if pad_id is None:
            raise ModelLoadFailed(f"tokenizer in {model_dir} has no pad token")

        self._spec = spec
        self._max_seq_length = int(min(limits))
        self._dim = int(model.config.hidden_size)
        self._pad_id = int(pad_id)
        self._pad_type_id = int(getattr(tokenizer, "pad_token_type_id", 0) or 0)
        self._tokenizer = tokenizer
        self._model = model

    async def unload(self) -> None:
        batcher, self._batcher = self._batcher, None
        if batcher is not None:
            self._fail_queued(batcher, ModelNotReady(f"model {self.ctx.model.name!r} was unloaded"))
            if batcher.task is not None:
                batcher.task.cancel()
        device = self.ctx.device
        self._model = None
        self._tokenizer = None
        if device.startswith("cuda"):
            import torch

            torch.cuda.empty_cache()

    # --- embeddings ------------------------------------------------------------------

    @property
    def max_input_tokens(self) -> int:
        """The most tokens (special tokens included) one input may have."""
        return min(self._max_seq_length, self.ctx.max_prompt_tokens)

    def stats(self) -> dict[str, int]:
        """Forward passes run, inputs embedded, and the largest forward pass so far."""
        return {
            "batches": self._stats.batches,
            "inputs": self._stats.inputs,
            "max_batch_seen": self._stats.max_batch_seen,
        }

    async def embed(self, texts: Sequence[Prompt]) -> EmbeddingOutput:
        """Embed texts, or token ids taken as they are (no special tokens added)."""
        if self._model is None:
            raise ModelNotReady(f"model {self.ctx.model.name!r} is not loaded")
        texts = list(texts)
        if not texts:
            return EmbeddingOutput(np.zeros((0, self._dim), dtype=np.float32), 0)
        vocab = int(self._model.get_input_embeddings().weight.shape[0])
        for index, given in enumerate(texts):
            if not isinstance(given, str):
                hf.check_token_ids(given, vocab, f"input {index}")
        encoded = await asyncio.to_thread(self._tokenize, texts)
        limit = self.max_input_tokens
        for index, ids in enumerate(encoded.input_ids):
            if len(ids) > limit:
                raise PromptTooLong(
                    f"input {index} has {len(ids)} tokens; model {self.ctx.model.name!r} "
                    f"accepts at most {limit} tokens per input"
                )

        batcher = self._current_batcher()
        call = _Call(batcher.loop.create_future(), [None] * len(texts), len(texts))
        now = batcher.loop.time()
        for index, ids in enumerate(encoded.input_ids):
            type_ids = encoded.token_type_ids[index] if encoded.token_type_ids else None
            batcher.queue.append(_Item(call, index, ids, type_ids, now))
        batcher.wakeup.set()
        # Cancelling this await cancels the future; the batcher then skips its inputs.
        vectors = await call.future
        prompt_tokens = sum(len(ids) for ids in encoded.input_ids)
        return EmbeddingOutput(vectors=vectors, prompt_tokens=prompt_tokens)

    def _tokenize(self, inputs: list[Prompt]) -> _Encoded:
        tokenizer = self._tokenizer
        if tokenizer is None:
            raise ModelNotReady(f"model {self.ctx.model.name!r} is not loaded")
        texts = [t for t in inputs if isinstance(t, str)]
        if self._spec.do_lower_case:
            texts = [text.lower() for text in texts]
        with_types = "token_type_ids" in tokenizer.model_input_names
        out: dict[str, list[list[int]]] = {"input_ids": [], "token_type_ids": []}
        if texts:
            with self._tokenizer_lock:
                out = tokenizer(
                    texts,
                    add_special_tokens=True,
                    truncation=False,
                    padding=False,
                    return_attention_mask=False,
                    return_token_type_ids=with_types,
                )
        encoded = iter(out["input_ids"])
        types = iter(out["token_type_ids"]) if with_types else None
        ids: list[list[int]] = []
        type_ids: list[list[int]] = []
        for given in inputs:  # token ids as they are, in the inputs' order
            if isinstance(given, str):
                ids.append(list(next(encoded)))
                type_ids.append(list(next(types)) if types is not None else [])
            else:
                ids.append(list(given))
                type_ids.append([0] * len(given))
        return _Encoded(input_ids=ids, token_type_ids=type_ids if with_types else None)

    # --- dynamic batcher -------------------------------------------------------------

    def _current_batcher(self) -> _Batcher:
        """The batcher of the running loop, started (or restarted) when needed."""
        loop = asyncio.get_running_loop()
        batcher = self._batcher
        alive = batcher is not None and batcher.task is not None and not batcher.task.done()
        if batcher is None or batcher.loop is not loop or not alive:
            batcher = _Batcher(loop=loop)
            batcher.task = loop.create_task(
                self._run(batcher), name=f"embed-batcher-{self.ctx.model.name}"
            )
            batcher.task.add_done_callback(lambda task, b=batcher: self._on_batcher_exit(b, task))
            self._batcher = batcher
        return batcher

    def _on_batcher_exit(self, batcher: _Batcher, task: asyncio.Task[None]) -> None:
        # The loop only ends by cancellation (unload, loop shutdown) or a bug; either way
        # no call may wait forever on a queue nobody serves.
        reason = "stopped" if task.cancelled() else f"failed: {task.exception()!r}"
        error = ModelNotReady(f"embedding batcher of {self.ctx.model.name!r} {reason}")
        for item in batcher.in_flight:
            item.call.fail(error)
        self._fail_queued(batcher, error)
        if self._batcher is batcher:
            self._batcher = None

    @staticmethod
    def _fail_queued(batcher: _Batcher, exc: HaifError) -> None:
        while batcher.queue:
            batcher.queue.popleft().call.fail(exc)

    async def _run(self, batcher: _Batcher) -> None:
        max_batch = self.ctx.model.torch.max_batch_size
        while True:
            await self._wait_for_batch(batcher)
            items = self._take_round(batcher, max_batch * SORT_WINDOW_BATCHES)
            batcher.in_flight = items
            # Sorting groups similar lengths into the same forward pass: less padding.
            items.sort(key=lambda item: len(item.input_ids))
            for start in range(0, len(items), max_batch):
                chunk = [
                    item
                    for item in items[start : start + max_batch]
                    if not item.call.future.done()  # skip calls cancelled meanwhile
                ]
                if chunk:
                    await self._run_chunk(chunk)
            batcher.in_flight = []

    async def _wait_for_batch(self, batcher: _Batcher) -> None:
        """Return once a full batch is queued or the oldest input waited ``torch.max_wait_ms``."""
        while not batcher.queue:
            batcher.wakeup.clear()
            await batcher.wakeup.wait()
        deadline = batcher.queue[0].enqueued_at + self.ctx.model.torch.max_wait_ms / 1000.0
        while len(batcher.queue) < self.ctx.model.torch.max_batch_size:
            remaining = deadline - batcher.loop.time()
            if remaining <= 0:
                return
            batcher.wakeup.clear()
            try:
                await asyncio.wait_for(batcher.wakeup.wait(), remaining)
            except TimeoutError:
                return

    @staticmethod
    def _take_round(batcher: _Batcher, limit: int) -> list[_Item]:
        items: list[_Item] = []
        while batcher.queue and len(items) < limit:
            item = batcher.queue.popleft()
            if not item.call.future.done():  # cancelled or already failed
                items.append(item)
        return items

    async def _run_chunk(self, chunk: list[_Item]) -> None:
        try:
            vectors = await asyncio.to_thread(self._forward, chunk)
        except Exception as exc:  # handed to every call of this batch; the batcher goes on
            for call in {id(item.call): item.call for item in chunk}.values():
                call.fail(exc)
            return
        self._stats.batches += 1
        self._stats.inputs += len(chunk)
        self._stats.max_batch_seen = max(self._stats.max_batch_seen, len(chunk))
        for item, row in zip(chunk, vectors, strict=True):
            item.call.set_row(item.index, row)

    def _forward(self, chunk: list[_Item]) -> np.ndarray:
        """Pad, encode, pool and normalise one micro-batch (runs in a worker thread)."""
        import torch
        import torch.nn.functional as F

        model = self._model
        if model is None:
            raise ModelNotReady(f"model {self.ctx.model.name!r} is not loaded")
        width = max(len(item.input_ids) for item in chunk)
        input_ids = np.full((len(chunk), width), self._pad_id, dtype=np.int64)
        attention = np.zeros((len(chunk), width), dtype=np.int64)
        type_ids = np.full((len(chunk), width), self._pad_type_id, dtype=np.int64)
        for row, item in enumerate(chunk):
            length = len(item.input_ids)
            input_ids[row, :length] = item.input_ids
            attention[row, :length] = 1
            if item.token_type_ids is not None:
                type_ids[row, :length] = item.token_type_ids
        device = self.ctx.device
        inputs = {
            "input_ids": torch.from_numpy(input_ids).to(device),
            "attention_mask": torch.from_numpy(attention).to(device),
        }
        if chunk[0].token_type_ids is not None:
            inputs["token_type_ids"] = torch.from_numpy(type_ids).to(device)

        with torch.inference_mode():
            hidden = model(**inputs).last_hidden_state
            pooled = _pool(hidden, inputs["attention_mask"], self._spec.pooling)
            if self._spec.normalize:
                pooled = F.normalize(pooled, p=2, dim=-1)
            return pooled.float().cpu().numpy()


def _pool(hidden: Any, attention_mask: Any, mode: PoolingMode) -> Any:
    """sentence-transformers' Pooling for one mode (right-padded batches)."""
    import torch

    if mode == "cls":
        return hidden[:, 0]
    mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
    if mode == "max":
        return hidden.masked_fill(mask == 0, float("-inf")).max(dim=1).values
    # Accumulate in float32 for half-precision weights, as sentence-transformers does.
    accumulate = torch.float32 if hidden.dtype in (torch.float16, torch.bfloat16) else hidden.dtype
    summed = (hidden * mask).sum(dim=1, dtype=accumulate)
    counts = torch.clamp(mask.sum(dim=1, dtype=accumulate), min=1e-9)
    return summed / counts
