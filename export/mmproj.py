"""The vision half of a GGUF export: ``mmproj-<name>-f16.gguf`` (tower + projector) for llama.cpp's ``mtmd``.

Written directly with the ``gguf`` package in the layout llama.cpp's CLIP loader reads for
projector type ``mlp`` (LLaVA-1.5's Linear-GELU-Linear): ``v.*`` tower tensors, ``mm.0`` / ``mm.2``
projector tensors and the ``clip.*`` hyper-parameters. llama.cpp's own converter cannot be used:
its LLaVA path expects transformers-4 module names and a projector file of its own layout.

What llama.cpp 0.3.36 computes for this projector type (``tools/mtmd/models/llava.cpp``,
``clip.cpp``), and what the writer does about it:

* The class embedding is concatenated AFTER the patch embeddings (``ggml_concat(inp,
  class_embedding, 1)``) while position rows are taken in order ``0..N`` — CLS-first order. A
  CLIP position table written as is gives every token its neighbour's position. Writing the rows
  rotated (``[p1 .. pN, p0]``) makes the tower exact (:data:`ROTATE_POSITIONS`).
* The rows handed to the projector are ``1..N`` of ``[patch_1 .. patch_N, CLS]`` (``patches[i] =
  i + patch_offset``, ``patch_offset = 1`` when a class embedding exists): the first patch is
  dropped and the class token kept. No key or projector type changes that for this graph, so
  PhiClip's ``default`` strategy (CLS in attention, then dropped) has no exact form, and a CLIP
  tower is refused unless the caller accepts an approximation (``--allow-approximate-vision``):
  then it is written WITHOUT its class embedding (patches attend to each other only, position
  rows ``p1 .. pN``): one token per patch, in PhiClip's order, close but not exact (minimum
  per-token cosine 0.994 measured on a shapes-trained CLIP tower), which the export measures and
  reports (:data:`CLASS_TOKEN_APPROXIMATED`).
* Towers without a class token (SigLIP) are exact with strategy ``full`` (the offline demo's).

Both llama.cpp behaviours are checked against the installed llama.cpp by the GGUF test tier, so
that a release that fixes them is noticed (``tests/test_gguf_llamacpp.py``).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from export.llamacpp import LLAMA_CPP_PYTHON_VERSION

PROJECTOR_TYPE = "mlp"
# llama.cpp 0.3.36 places CLS last but assigns positions CLS-first; rows are written rotated to compensate.
ROTATE_POSITIONS = True
# llama.cpp 0.3.36 keeps rows 1..N of [patches, CLS]; a CLIP tower is written without its class embedding.
CLASS_TOKEN_APPROXIMATED = True
# llama.cpp's fixed pad colour for projector type mlp (clip.cpp: image_pad_color = {122, 116, 104}).
LLAMACPP_PAD_COLOUR = (122, 116, 104)

_TOWER_ACTS = {"quick_gelu": False, "gelu": True, "gelu_pytorch_tanh": True}  # -> clip.use_gelu
_PROJECTOR_ACTS = ("gelu", "gelu_pytorch_tanh", "gelu_new")  # ggml_gelu (tanh form) stands for all three


class GGUFExportError(ValueError):
    """The model cannot be written as a llama.cpp GGUF pair; the message names the setting and why."""


@dataclass(frozen=True)
class VisionPlan:
    """How the tower maps onto llama.cpp's LLaVA graph.

    ``layers``: the hidden-state indices (non-negative, ascending) llama.cpp stacks;
    ``order``: for each of them, its position in PhiClip's ``vision_feature_layer`` list;
    ``has_class_token``: the tower has a CLS token (CLIP); ``exact``: llama.cpp computes PhiClip's
    features exactly (else the class token is left out, see the module notes).
    """

    layers: tuple[int, ...]
    order: tuple[int, ...]
    has_class_token: bool
    exact: bool
    note: str


def plan_vision(config, allow_approximate: bool = False) -> VisionPlan:
    """Check that llama.cpp can represent the model's image path; raise :class:`GGUFExportError` naming what not.

    ``config``: a ``PhiClipConfig``. Refused: ``image_features: pooled``; a tower that is not CLIP or
    SigLIP; ``vision_feature_select_strategy: full`` with a CLIP tower (llama.cpp emits one token per
    patch); ``default`` with a SigLIP tower (PhiClip drops the first patch, llama.cpp keeps it);
    ``default`` with a CLIP tower unless ``allow_approximate`` (llama.cpp cannot keep the class
    token in attention and then drop it: the plan leaves it out, see the module notes); repeated
    feature layers; a tower or projector activation ggml does not have.
    """
    if config.image_features != "patches":
        raise GGUFExportError(
            f"image_features is '{config.image_features}': this model feeds the LM one pooled CLIP embedding; "
            "llama.cpp's mtmd emits one token per image patch and has no pooled variant for this projector."
        )
    vision = config.vision_config
    kind = vision.model_type
    if not (kind.startswith("clip") or kind.startswith("siglip")):
        raise GGUFExportError(f"vision tower model_type '{kind}': only CLIP and SigLIP towers are exported to GGUF")
    act = getattr(vision, "hidden_act", None)
    if act not in _TOWER_ACTS:
        raise GGUFExportError(
            f"vision_config.hidden_act '{act}': llama.cpp's CLIP graph runs quick_gelu or gelu only"
        )
    if config.projector_hidden_act not in _PROJECTOR_ACTS:
        raise GGUFExportError(
            f"projector_hidden_act '{config.projector_hidden_act}': llama.cpp's mlp projector applies GELU "
            "between its two linears"
        )
    has_cls = kind.startswith("clip")
    strategy = config.vision_feature_select_strategy
    if has_cls and strategy == "full":
        raise GGUFExportError(
            "vision_feature_select_strategy 'full': the LM was trained on the CLS token plus one token per patch; "
            "llama.cpp's LLaVA graph emits exactly one token per patch, so the trained input cannot be reproduced. "
            "Train with 'default' (drop CLS) to export to GGUF."
        )
    if not has_cls and strategy == "default":
        raise GGUFExportError(
            "vision_feature_select_strategy 'default' with a SigLIP tower: PhiClip drops the first patch token "
            "(SigLIP has no CLS), llama.cpp keeps every patch. Train with 'full' to export to GGUF."
        )
    n_layers = int(vision.num_hidden_layers)
    wanted = config.vision_feature_layer if isinstance(config.vision_feature_layer, list) else [
        config.vision_feature_layer]
    absolute = [layer + n_layers + 1 if layer < 0 else layer for layer in wanted]
    for given, layer in zip(wanted, absolute):
        if not 0 <= layer <= n_layers:
            raise GGUFExportError(f"vision_feature_layer {given}: the tower has hidden states 0..{n_layers}")
    if len(set(absolute)) != len(absolute):
        raise GGUFExportError(
            f"vision_feature_layer {wanted}: a layer listed twice; llama.cpp stacks each layer once"
        )
    layers = tuple(sorted(absolute))
    order = tuple(absolute.index(layer) for layer in layers)
    if has_cls and CLASS_TOKEN_APPROXIMATED:
        if not allow_approximate:
            raise GGUFExportError(
                "vision_feature_select_strategy 'default' with a CLIP tower: llama.cpp "
                f"{LLAMA_CPP_PYTHON_VERSION} (llama-cpp-python) cannot reproduce it exactly. Its LLaVA graph appends "
                "the class token after the patches and keeps rows 1..N, so it drops the first patch and keeps the "
                "class token; no projector type or key keeps CLIP's class token in attention and then drops it. "
                "To export it without the class token (close, not exact: the export measures and reports the "
                "per-token cosine), pass --allow-approximate-vision to `phiclip export --format gguf` (then push "
                "that folder with `phiclip push FOLDER REPO --gguf`); for an exact export, train with a SigLIP "
                "tower and vision_feature_select_strategy 'full'."
            )
        note = ("approximate: llama.cpp's LLaVA graph cannot keep CLIP's class token in attention and then drop it "
                "(it drops the first patch instead), so the mmproj leaves the class token out")
        return VisionPlan(layers, order, True, False, note)
    return VisionPlan(layers, order, has_cls, True, "exact")


def _tower_state(tower: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The tower's tensors without a leading ``vision_model.`` (transformers 4 and 5 layouts)."""
    return {key.removeprefix("vision_model."): value.detach().float().cpu()
            for key, value in tower.state_dict().items()}


def mmproj_tensors(model, plan: VisionPlan) -> dict[str, np.ndarray]:
    """GGUF tensor name -> array (float32; the writer stores matrices as float16).

    ``model``: a ``PhiClipForCausalLM``. Only the layers up to the deepest feature layer are kept.
    """
    state = _tower_state(model.vision_tower)
    vision = model.config.vision_config
    out: dict[str, np.ndarray] = {}

    def put(name: str, key: str) -> None:
        if key not in state:
            raise GGUFExportError(f"vision tower has no tensor '{key}' (needed for GGUF '{name}')")
        out[name] = state[key].numpy()

    put("v.patch_embd.weight", "embeddings.patch_embedding.weight")
    if "embeddings.patch_embedding.bias" in state:
        put("v.patch_embd.bias", "embeddings.patch_embedding.bias")
    positions = state["embeddings.position_embedding.weight"].numpy()
    n_patches = (int(vision.image_size) // int(vision.patch_size)) ** 2
    if plan.has_class_token:
        if positions.shape[0] != n_patches + 1:
            raise GGUFExportError(f"position embedding has {positions.shape[0]} rows, expected {n_patches + 1}")
        if plan.exact:  # class token kept: llama.cpp puts it last, so its row p0 goes last too
            out["v.class_embd"] = state["embeddings.class_embedding"].numpy()
            positions = np.concatenate([positions[1:], positions[:1]]) if ROTATE_POSITIONS else positions
        else:
            positions = positions[1:]
    out["v.position_embd.weight"] = positions
    if "pre_layrnorm.weight" in state:
        put("v.pre_ln.weight", "pre_layrnorm.weight")
        put("v.pre_ln.bias", "pre_layrnorm.bias")
    names = {"self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
             "self_attn.out_proj": "attn_out", "layer_norm1": "ln1", "layer_norm2": "ln2",
             "mlp.fc1": "ffn_up", "mlp.fc2": "ffn_down"}
    if int(vision.intermediate_size) == int(vision.hidden_size):
        # llama.cpp swaps ffn_up/ffn_down of "legacy" mlp files whose ffn_down has n_embd inputs
        # (clip.cpp, is_ffn_swapped); with n_ff == n_embd ours would be swapped too, so store them swapped.
        names["mlp.fc1"], names["mlp.fc2"] = "ffn_down", "ffn_up"
    for il in range(max(plan.layers)):
        for hf, gg in names.items():
            for part in ("weight", "bias"):
                put(f"v.blk.{il}.{gg}.{part}", f"encoder.layers.{il}.{hf}.{part}")
    proj = model.projector
    first = proj.linear_1.weight.detach().float().cpu().numpy()
    if len(plan.layers) > 1:  # llama.cpp stacks layers in ascending order; reorder the first linear's inputs to match
        width = int(vision.hidden_size)
        first = np.concatenate([first[:, i * width:(i + 1) * width] for i in plan.order], axis=1)
    out["mm.0.weight"] = first
    out["mm.0.bias"] = proj.linear_1.bias.detach().float().cpu().numpy()
    out["mm.2.weight"] = proj.linear_2.weight.detach().float().cpu().numpy()
    out["mm.2.bias"] = proj.linear_2.bias.detach().float().cpu().numpy()
    return out


def write_mmproj(model, image_processor, path: str | Path, *, name: str, plan: VisionPlan,
                 llama_cpp_version: str) -> Path:
    """Write the mmproj GGUF for ``model`` (a ``PhiClipForCausalLM``) to ``path``; returns ``path``.

    ``image_processor``: the model's image processor (its ``image_mean`` / ``image_std`` go into the
    file). 2-D and larger tensors are stored as float16, vectors as float32.
    """
    import gguf

    vision = model.config.vision_config
    path = Path(path)
    writer = gguf.GGUFWriter(str(path), arch="clip")
    writer.add_type("mmproj")
    writer.add_name(name)
    writer.add_description(f"PhiClip vision tower + projector for llama.cpp mtmd ({plan.note})")
    writer.add_file_type(gguf.LlamaFileType.MOSTLY_F16)
    writer.add_bool("clip.has_vision_encoder", True)
    writer.add_bool("clip.has_text_encoder", False)
    writer.add_bool("clip.has_llava_projector", True)
    writer.add_string("clip.projector_type", PROJECTOR_TYPE)
    writer.add_bool("clip.use_gelu", _TOWER_ACTS[vision.hidden_act])
    writer.add_uint32("clip.vision.image_size", int(vision.image_size))
    writer.add_uint32("clip.vision.patch_size", int(vision.patch_size))
    writer.add_uint32("clip.vision.embedding_length", int(vision.hidden_size))
    writer.add_uint32("clip.vision.feed_forward_length", int(vision.intermediate_size))
    writer.add_uint32("clip.vision.projection_dim", int(model.projector.linear_2.weight.shape[0]))
    writer.add_uint32("clip.vision.attention.head_count", int(vision.num_attention_heads))
    writer.add_float32("clip.vision.attention.layer_norm_epsilon", float(vision.layer_norm_eps))
    writer.add_uint32("clip.vision.block_count", int(max(plan.layers)))
    writer.add_array("clip.vision.feature_layer", [int(layer) for layer in plan.layers])
    writer.add_array("clip.vision.image_mean", [float(x) for x in image_processor.image_mean])
    writer.add_array("clip.vision.image_std", [float(x) for x in image_processor.image_std])
    writer.add_string("phiclip.llama_cpp_python", llama_cpp_version)
    writer.add_bool("phiclip.vision_exact", plan.exact)
    for tensor_name, array in mmproj_tensors(model, plan).items():
        dtype = np.float16 if array.ndim >= 2 else np.float32
        writer.add_tensor(tensor_name, np.ascontiguousarray(array.astype(dtype)))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path
