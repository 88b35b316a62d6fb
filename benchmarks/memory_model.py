"""Training memory of a PhiClip recipe, computed from its shapes, and the same quantities measured on a live model.

:func:`predict` gives, in bytes, what one training step holds for a recipe (LM config, tower
config, LoRA, quantization, batch, ``max_length``, compute dtype): the frozen weights (NF4 or
not), the trainable weights with their gradients and AdamW's two states, and the activations the
forward pass saves for the backward pass, with and without activation checkpointing. Sources:
bitsandbytes' NF4 layout (4 bits a weight, one absmax byte per 64 weights with double
quantization, one float32 per 256 absmaxes), PEFT's float32 LoRA weights
(``autocast_adapter_dtype``), ``prepare_model_for_kbit_training`` (every unquantized LM weight in
float32), and what PyTorch's autograd keeps for each operation of a Phi-3/Llama decoder layer with
LoRA on its linears (listed in :func:`layer_saved`).

:func:`measure_static` and :class:`SavedTensors` read the same quantities off a model: bytes of its
parameters by part, of its gradients and optimizer states, and of every tensor autograd saves
during a forward pass (``torch.autograd.graph.saved_tensors_hooks``; storages counted once,
parameters left out). ``real_shape.py`` prints both side by side.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

GB = 2**30


@dataclass(frozen=True)
class Recipe:
    """What decides a training step's memory. Sizes from the LM's and tower's configs."""

    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    vocab: int
    vision_hidden: int
    vision_intermediate: int
    vision_layers: int
    image_size: int
    patch_size: int
    image_tokens: int  # positions one image takes in the LM (576 for CLIP-L/336 without its class token)
    batch: int
    max_length: int
    supervised: int  # LM positions per sample whose logits the loss reads (train.loss_only_compute)
    lora_rank: int  # 0: no LoRA (stage 1)
    quantized: bool  # NF4 base (QLoRA)
    checkpointing: bool
    dtype_bytes: int  # compute dtype: 2 for bfloat16, 4 for float32

    @classmethod
    def from_configs(cls, lm: dict, vision: dict, image_tokens: int, **rest) -> Recipe:
        return cls(hidden=lm["hidden_size"], intermediate=lm["intermediate_size"], layers=lm["num_hidden_layers"],
                   heads=lm["num_attention_heads"], kv_heads=lm.get("num_key_value_heads") or lm["num_attention_heads"],
                   vocab=lm["vocab_size"], vision_hidden=vision["hidden_size"],
                   vision_intermediate=vision["intermediate_size"], vision_layers=vision["num_hidden_layers"],
                   image_size=vision["image_size"], patch_size=vision["patch_size"], image_tokens=image_tokens, **rest)

    def linears(self) -> list[tuple[int, int]]:
        """(in, out) of one decoder layer's linears: fused qkv, o, fused gate_up, down (Phi-3's layout)."""
        h, i = self.hidden, self.intermediate
        kv = h * self.kv_heads // self.heads
        return [(h, h + 2 * kv), (h, h), (h, 2 * i), (i, h)]


def nf4_bytes(n: int) -> float:
    """bitsandbytes NF4 with double quantization: 4 bits a weight + a uint8 absmax per 64 + a float32 per 256 blocks."""
    return n / 2 + n / 64 + 4 * n / (64 * 256)


def layer_saved(r: Recipe, tokens: int) -> float:
    """Bytes autograd saves for one decoder layer's backward over ``tokens`` positions (no checkpointing).

    Each RMSNorm: its input in float32, the per-position rsqrt, the normalised output. Attention:
    the fused qkv output, q and k after RoPE, RoPE's cos and sin, SDPA's output and its float32
    log-sum-exp. The SiLU-gated MLP: the fused gate_up output, SiLU's output and the product. Frozen
    linears save nothing (their weights are parameters); each LoRA saves its float32 (dropped-out)
    input and the rank-r activation between A and B, and ``o_proj``'s input is kept for it.
    (Checked tensor by tensor against ``SavedTensors`` on a Phi-3 layer; ``real_shape.py`` prints both.)
    """
    a, h, i = r.dtype_bytes, r.hidden, r.intermediate
    kv = h * r.kv_heads // r.heads
    per_token = 2 * (h * 4 + 4 + h * a)  # two RMSNorms
    per_token += (h + 2 * kv) * a + (h + kv) * a + 2 * (h // r.heads) * a  # qkv, roped q and k, cos and sin
    per_token += h * a + r.heads * 4  # attention output, log-sum-exp
    per_token += 4 * i * a  # gate_up, silu(gate), silu(gate) * up
    if r.lora_rank:
        per_token += h * a + sum((n_in + r.lora_rank) * 4 for n_in, _ in r.linears())
    return per_token * tokens


@dataclass
class Memory:
    """Bytes by part; ``peak`` adds the largest transient term (one layer recomputed, or the loss) to the rest."""

    parts: dict[str, float] = field(default_factory=dict)
    transient: dict[str, float] = field(default_factory=dict)

    @property
    def held(self) -> float:
        return sum(self.parts.values())

    @property
    def peak(self) -> float:
        return self.held + max(self.transient.values(), default=0.0)


def predict(r: Recipe) -> Memory:
    """The memory of one training step of ``r`` (see the module notes for the sources)."""
    a, h = r.dtype_bytes, r.hidden
    m = Memory()
    n_linear = r.layers * sum(n_in * n_out for n_in, n_out in r.linears())
    m.parts["LM linears"] = nf4_bytes(n_linear) if r.quantized else n_linear * a
    other = 2 * r.vocab * h + (2 * r.layers + 1) * h  # embeddings, head, norms
    m.parts["LM embeddings, head, norms"] = other * (4 if r.quantized else a)
    dv, iv = r.vision_hidden, r.vision_intermediate
    patches = (r.image_size // r.patch_size) ** 2
    tower = 3 * r.patch_size**2 * dv + (patches + 2) * dv + 4 * dv
    tower += r.vision_layers * (4 * (dv * dv + dv) + 2 * dv * iv + iv + dv + 4 * dv)
    m.parts["vision tower"] = tower * a
    projector = dv * h + h + h * h + h
    m.parts["projector + grads + AdamW"] = projector * a * 4
    if r.lora_rank:
        lora = r.layers * sum(r.lora_rank * (n_in + n_out) for n_in, n_out in r.linears())
        m.parts["LoRA + grads + AdamW (fp32)"] = lora * 4 * 4
    tokens = r.batch * r.max_length
    image = r.batch * r.image_tokens
    m.parts["activations: projector"] = image * (dv + 2 * h) * a
    if r.checkpointing:
        m.parts["activations: layer inputs (checkpointed)"] = r.layers * tokens * h * a
        m.transient["one layer recomputed"] = layer_saved(r, tokens)
    else:
        m.parts["activations: every layer"] = r.layers * layer_saved(r, tokens)
    supervised = r.batch * r.supervised
    # final RMSNorm; the head's input at supervised positions; the float32 log-softmax the loss keeps
    m.parts["activations: final norm, head, loss"] = tokens * (h * 4 + 4 + h * a) + supervised * (h * a + r.vocab * 4)
    m.transient["logits gradient"] = supervised * r.vocab * (4 + a)
    return m


def _bytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def measure_static(model: torch.nn.Module) -> dict[str, int]:
    """Bytes of ``model``'s parameters and buffers by part (NF4 weights with their quantization state)."""
    out: dict[str, int] = {}
    seen: set[int] = set()

    def add(part: str, t: torch.Tensor) -> None:
        ptr = t.untyped_storage().data_ptr()
        if ptr in seen:
            return
        seen.add(ptr)
        out[part] = out.get(part, 0) + t.untyped_storage().nbytes()

    for name, p in list(model.named_parameters()) + list(model.named_buffers()):
        if "lora_" in name:
            part = "LoRA"
        elif name.startswith("projector"):
            part = "projector"
        elif name.startswith("vision_tower"):
            part = "vision tower"
        elif p.dtype == torch.uint8:
            part = "LM linears"
        else:
            part = "LM embeddings, head, norms"
        add(part, p)
        state = getattr(p, "quant_state", None)
        if state is not None:
            for t in (state.absmax, state.code, getattr(state.state2, "absmax", None),
                      getattr(state.state2, "code", None)):
                if t is not None:
                    add("LM linears", t)
    return out


def trainable_state_bytes(model: torch.nn.Module, optimizer: torch.optim.Optimizer | None) -> tuple[int, int]:
    """Bytes of the trainable parameters' gradients, and of the optimizer's state tensors."""
    grads = sum(_bytes(p.grad) for p in model.parameters() if p.grad is not None)
    states = 0
    if optimizer is not None:
        for state in optimizer.state.values():
            states += sum(_bytes(t) for t in state.values() if isinstance(t, torch.Tensor) and t.dim() > 0)
    return grads, states


class SavedTensors:
    """Bytes of the tensors autograd saves while the context is open (each storage once, parameters excluded).

    ``layers``: checkpointed modules whose inputs count too (non-reentrant checkpointing keeps a layer's
    inputs for its recomputation without passing them through autograd's saved-tensor hooks).
    """

    def __init__(self, model: torch.nn.Module, layers: list[torch.nn.Module] = ()) -> None:
        self.exclude = {p.untyped_storage().data_ptr() for p in model.parameters()}
        self.exclude |= {b.untyped_storage().data_ptr() for b in model.buffers()}
        self.storages: dict[int, int] = {}
        self._hooks = torch.autograd.graph.saved_tensors_hooks(self._pack, lambda t: t)
        self._layers = list(layers)
        self._handles: list = []

    def _layer_input(self, module, args, kwargs) -> None:
        for t in [*args, *kwargs.values()]:
            if isinstance(t, torch.Tensor) and t.is_floating_point():
                self._pack(t)

    def _pack(self, t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        if storage.device.type != "meta" and storage.data_ptr() not in self.exclude:
            self.storages[storage.data_ptr()] = storage.nbytes()
        return t

    @property
    def total(self) -> int:
        return sum(self.storages.values())

    def __enter__(self) -> SavedTensors:
        self._hooks.__enter__()
        self._handles = [m.register_forward_pre_hook(self._layer_input, with_kwargs=True) for m in self._layers]
        return self

    def __exit__(self, *exc) -> None:
        self._hooks.__exit__(*exc)
        for handle in self._handles:
            handle.remove()
