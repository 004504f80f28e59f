"""LoRA adapters on the torch runtime: one copy of the base weights, each request's adapter
applied inside the batched forward.

A PEFT LoRA directory (``adapter_config.json``, ``adapter_model.safetensors``) holds, for
each target linear layer ``W`` (out x in) of the base model, two matrices ``A`` (r x in)
and ``B`` (out x r); the adapted layer computes ``W x + s * B A x`` with the scale
``s = lora_alpha / r`` (``lora_alpha / sqrt(r)`` with rsLoRA). ``read_adapter`` parses and
checks such a directory without torch (the CLI checks a directory before publishing it).

``BatchedLora`` replaces each targeted ``nn.Linear`` of the loaded base model by a
``LoraLinear`` around it (the first time an adapter targets it) and keeps the matrices of
every loaded adapter stacked per layer, zero-padded to the largest rank::

    A: (slots, in, r_max)    B: (slots, r_max, out)    (the scale folded into B)

Slot 0 is all zeros: the base. A batch carries one slot per row; each adapted layer gathers
its rows' ``A`` and ``B`` and adds ``bmm(bmm(x, A[rows]), B[rows])`` to the base output
(the batched LoRA of Punica / S-LoRA, here as a gathered ``bmm`` on any device). Requests
for different adapters and for the base share one batch and one pass over the base
weights; a batch without adapted rows does no extra work, and a model that never loaded
an adapter is left exactly as it was.

Adapters are loaded and unloaded between batches (on the runtime's worker thread), so the
stacks never change under a running forward.
"""

from __future__ import annotations

import contextlib
import json
import math
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from haif.exceptions import AdapterRejected

if TYPE_CHECKING:
    import torch
    from torch import nn

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
MAX_CONFIG_BYTES = 1024 * 1024
# base_model.model.<module path>.lora_A[.<adapter name>].weight, as PEFT saves them.
_KEY = re.compile(r"base_model\.model\.(?P<module>.+)\.lora_(?P<which>[AB])(?:\.[^.]+)?\.weight")


@dataclass(frozen=True)
class LoraSpec:
    """What ``adapter_config.json`` says about a LoRA adapter that HAIF can apply."""

    path: Path
    rank: int
    alpha: float
    target_modules: tuple[str, ...] | str  # names or suffixes, or one regular expression
    use_rslora: bool = False
    rank_pattern: dict[str, int] = field(default_factory=dict)
    alpha_pattern: dict[str, float] = field(default_factory=dict)

    def scale(self, module: str, rank: int) -> float:
        """The factor of ``B A x`` in ``module`` (PEFT's ``scaling``), whose rank is ``rank``."""
        alpha = next(
            (float(v) for k, v in self.alpha_pattern.items() if _matches(k, module)), self.alpha
        )
        return alpha / math.sqrt(rank) if self.use_rslora else alpha / rank


def _matches(pattern: str, module: str) -> bool:
    return re.fullmatch(rf"(.*\.)?{pattern}", module) is not None


def read_adapter(path: str | Path, name: str = "adapter") -> LoraSpec:
    """Parse and check a PEFT LoRA directory.

    Raises:
        AdapterRejected: not a LoRA directory, or one that needs what HAIF does not apply
            (DoRA, trained biases, modules saved whole, fan-in-fan-out layers).
    """
    root = Path(path)
    config_path, weights_path = root / CONFIG_FILE, root / WEIGHTS_FILE
    if not config_path.is_file() or not weights_path.is_file():
        raise AdapterRejected(
            f"adapter {name}: not a PEFT LoRA directory (it needs {CONFIG_FILE} and {WEIGHTS_FILE})"
        )
    try:
        if config_path.stat().st_size > MAX_CONFIG_BYTES:
            raise ValueError(f"larger than {MAX_CONFIG_BYTES} bytes")
        config = json.loads(config_path.read_text(encoding="utf-8"))
        if not isinstance(config, dict):
            raise ValueError("not a JSON object")
    except (OSError, ValueError) as exc:
        raise AdapterRejected(f"adapter {name}: {CONFIG_FILE} is unreadable: {exc}") from None
    if str(config.get("peft_type", "")).upper() != "LORA":
        raise AdapterRejected(f"adapter {name}: peft_type is {config.get('peft_type')!r}, not LORA")
    unsupported = [
        what for what, bad in (
            ("use_dora", bool(config.get("use_dora"))),
            ("fan_in_fan_out", bool(config.get("fan_in_fan_out"))),
            ("bias", config.get("bias", "none") not in (None, "none")),
            ("lora_bias", bool(config.get("lora_bias"))),
            ("modules_to_save", bool(config.get("modules_to_save"))),
            ("layer_replication", bool(config.get("layer_replication"))),
        ) if bad
    ]
    if unsupported:
        raise AdapterRejected(f"adapter {name}: HAIF does not apply LoRA with {', '.join(unsupported)}")
    rank, targets = config.get("r"), config.get("target_modules")
    alpha = config.get("lora_alpha", rank)
    if not isinstance(rank, int) or rank < 1 or not isinstance(alpha, int | float) or alpha <= 0:
        raise AdapterRejected(f"adapter {name}: r and lora_alpha must be positive numbers")
    if isinstance(targets, list) and targets and all(isinstance(t, str) for t in targets):
        target_modules: tuple[str, ...] | str = tuple(targets)
    elif isinstance(targets, str) and targets:
        target_modules = targets
    else:
        raise AdapterRejected(f"adapter {name}: target_modules must name the adapted layers")
    return LoraSpec(
        path=root,
        rank=rank,
        alpha=float(alpha),
        target_modules=target_modules,
        use_rslora=bool(config.get("use_rslora")),
        rank_pattern=dict(config.get("rank_pattern") or {}),
        alpha_pattern=dict(config.get("alpha_pattern") or {}),
    )


@dataclass
class _Rows:
    """The slot of each row of the running forward.

    A batch keeps its rows from one decode step to the next until some finish, so the
    layers gather their rows' matrices once per ``version`` (a new set of rows), not once
    per step."""

    active: bool = False  # a forward with adapted rows is running
    slots: tuple[int, ...] = ()
    index: torch.Tensor | None = None
    uniform: int | None = None  # every row has this slot: no gather needed
    version: int = 0


def _lora_linear_class() -> type:
    from torch import nn

    class LoraLinear(nn.Module):
        """A base ``nn.Linear`` plus the stacked LoRA matrices of every loaded adapter."""

        def __init__(self, base: nn.Linear, rows: _Rows) -> None:
            super().__init__()
            self.base = base
            self.rows = rows
            self.lora_a: torch.Tensor | None = None  # (slots, in, r_max)
            self.lora_b: torch.Tensor | None = None  # (slots, r_max, out), scale folded in
            self._gathered: tuple[int, torch.Tensor, torch.Tensor] | None = None

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            out = self.base(x)
            rows, a, b = self.rows, self.lora_a, self.lora_b
            if not rows.active or a is None or b is None:
                return out
            flat = x.dim() == 2
            h = x.unsqueeze(1) if flat else x  # (batch, tokens, in)
            out3 = out.unsqueeze(1) if flat else out
            if rows.uniform is not None:  # one adapter for the whole batch: no gather
                out3.add_((h @ a[rows.uniform]) @ b[rows.uniform])
            else:
                if self._gathered is None or self._gathered[0] != rows.version:
                    index = rows.index
                    self._gathered = (rows.version, a.index_select(0, index), b.index_select(0, index))
                _, a_rows, b_rows = self._gathered
                out3.baddbmm_(h @ a_rows, b_rows)  # out += (x A) B, row by row
            return out

    return LoraLinear


@dataclass
class _Adapter:
    name: str
    spec: LoraSpec
    # module name -> (A^T: in x r, scaled B^T: r x out), on the model's device and dtype
    layers: dict[str, tuple[torch.Tensor, torch.Tensor]]

    @property
    def rank(self) -> int:
        return max(a.shape[1] for a, _ in self.layers.values())


class BatchedLora:
    """The LoRA adapters loaded on one base model, applied per row of a batch."""

    def __init__(self, model: nn.Module) -> None:
        self._model = model
        self._rows = _Rows()
        self._layers: dict[str, Any] = {}  # module name -> LoraLinear
        self._adapters: dict[str, _Adapter] = {}  # in slot order: slot i + 1
        self._slots: dict[str, int] = {}

    def names(self) -> list[str]:
        return list(self._adapters)

    def __contains__(self, name: object) -> bool:
        return name in self._adapters

    def load(self, name: str, path: str | Path) -> None:
        """Load the adapter in ``path`` under ``name`` (again: replaced).

        Raises:
            AdapterRejected: it does not fit the base model (a layer it names is not a
                linear layer of the base, or its matrices have other shapes).
        """
        spec = read_adapter(path, name)
        layers = self._read_weights(name, spec)
        for module in layers:
            self._wrap(module)
        self._adapters.pop(name, None)
        self._adapters[name] = _Adapter(name, spec, layers)
        self._restack()

    def unload(self, name: str) -> None:
        if self._adapters.pop(name, None) is not None:
            self._restack()

    @contextlib.contextmanager
    def rows(self, adapters: Sequence[str | None], device: torch.device) -> Iterator[None]:
        """Apply ``adapters[i]`` (None: the base) to row i of the forwards inside the block.

        Raises:
            AdapterRejected: an adapter is not loaded.
        """
        slots = []
        for name in adapters:
            slot = 0 if name is None else self._slots.get(name)
            if slot is None:
                raise AdapterRejected(f"adapter {name} is not loaded")
            slots.append(slot)
        if not any(slots):
            yield
            return
        rows = self._rows
        if tuple(slots) != rows.slots:  # new rows: the layers gather again
            import torch

            rows.slots, rows.version = tuple(slots), rows.version + 1
            rows.index = torch.tensor(slots, dtype=torch.long, device=device)
            rows.uniform = slots[0] if all(s == slots[0] for s in slots) else None
        rows.active = True
        try:
            yield
        finally:
            rows.active = False

    # --- internals ----------------------------------------------------------------

    def _base_linear(self, module: str) -> Any:
        from torch import nn

        wrapped = self._layers.get(module)
        if wrapped is not None:
            return wrapped.base
        found = dict(self._model.named_modules()).get(module)
        return found if isinstance(found, nn.Linear) else None

    def _read_weights(self, name: str, spec: LoraSpec) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            tensors = load_file(str(spec.path / WEIGHTS_FILE))
        except (OSError, SafetensorError) as exc:
            raise AdapterRejected(f"adapter {name}: {WEIGHTS_FILE} is unreadable: {exc}") from None
        pairs: dict[str, dict[str, torch.Tensor]] = {}
        for key, tensor in tensors.items():
            match = _KEY.fullmatch(key)
            if match is None:
                raise AdapterRejected(
                    f"adapter {name}: HAIF does not apply tensor {key!r} "
                    "(only lora_A / lora_B of linear layers)"
                )
            pairs.setdefault(match["module"], {})[match["which"]] = tensor
        if not pairs:
            raise AdapterRejected(f"adapter {name}: {WEIGHTS_FILE} holds no LoRA matrices")
        layers = {}
        for module, ab in sorted(pairs.items()):
            layers[module] = self._layer_weights(name, spec, module, ab)
        return layers

    def _layer_weights(
        self, name: str, spec: LoraSpec, module: str, ab: dict[str, torch.Tensor]
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if set(ab) != {"A", "B"}:
            raise AdapterRejected(f"adapter {name}: {module} has lora_{''.join(ab)} without its pair")
        base = self._base_linear(module)
        if base is None:
            raise AdapterRejected(f"adapter {name}: {module} is not a linear layer of the base model")
        a, b = ab["A"], ab["B"]
        rank = a.shape[0] if a.dim() == 2 else -1
        if a.shape != (rank, base.in_features) or b.shape != (base.out_features, rank):
            raise AdapterRejected(
                f"adapter {name}: {module} has lora_A {tuple(a.shape)} and lora_B {tuple(b.shape)}; "
                f"the base layer is {base.out_features} x {base.in_features} (trained on another base?)"
            )
        weight = base.weight
        scale = spec.scale(module, rank)
        a_t = a.t().to(device=weight.device, dtype=weight.dtype).contiguous()
        b_t = (b.t().float() * scale).to(device=weight.device, dtype=weight.dtype).contiguous()
        return a_t, b_t

    def _wrap(self, module: str) -> None:
        if module in self._layers:
            return
        parent_name, _, child = module.rpartition(".")
        parent = self._model.get_submodule(parent_name) if parent_name else self._model
        wrapped = _lora_linear_class()(getattr(parent, child), self._rows)
        setattr(parent, child, wrapped)
        self._layers[module] = wrapped

    def _restack(self) -> None:
        """Rebuild every layer's stacks from the loaded adapters (slot 0: the base, zeros)."""
        import torch

        self._slots = {name: i + 1 for i, name in enumerate(self._adapters)}
        self._rows.slots, self._rows.version = (), self._rows.version + 1  # gathered: stale
        slots = len(self._adapters) + 1
        for module, layer in self._layers.items():
            mine = [
                (self._slots[a.name], a.layers[module])
                for a in self._adapters.values() if module in a.layers
            ]
            if not mine:
                layer.lora_a = layer.lora_b = None
                continue
            base = layer.base
            r_max = max(a_t.shape[1] for _, (a_t, _) in mine)
            like = {"dtype": base.weight.dtype, "device": base.weight.device}
            stack_a = torch.zeros((slots, base.in_features, r_max), **like)
            stack_b = torch.zeros((slots, r_max, base.out_features), **like)
            for slot, (a_t, b_t) in mine:
                stack_a[slot, :, : a_t.shape[1]] = a_t
                stack_b[slot, : b_t.shape[0], :] = b_t
            layer.lora_a, layer.lora_b = stack_a, stack_b
