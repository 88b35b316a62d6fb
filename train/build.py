"""Assemble a ``transformers.LlavaForConditionalGeneration`` from a vision tower and a causal LM.

The model class is the ecosystem's own, so ``generate()``, PEFT and the Llava loaders of
other tools work on it. We only add what the Llava class leaves to its user: the ``<image>``
token, a deliberate projector initialisation, and the image-token count measured from the
tower itself.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers import (
    AutoConfig,
    AutoImageProcessor,
    AutoModelForCausalLM,
    AutoTokenizer,
    CLIPVisionModel,
    CLIPVisionModelWithProjection,
    LlavaConfig,
    LlavaForConditionalGeneration,
    PreTrainedTokenizerBase,
    SiglipVisionModel,
)
from transformers.models.llava.modeling_llava import LlavaMultiModalProjector

from train.config import LoraConfig, ModelConfig
from demo import offline
from train.pooled import use_pooled_features

IMAGE_TOKEN = "<image>"


@dataclass
class Built:
    """A freshly assembled model with what is needed to feed it."""

    model: LlavaForConditionalGeneration
    tokenizer: PreTrainedTokenizerBase
    image_processor: object
    n_image_tokens: int

    @property
    def image_token_id(self) -> int:
        return self.model.config.image_token_id


def pick_dtype(name: str, device: torch.device) -> torch.dtype:
    """float32 on CPU (bf16 matmuls are very slow without AVX-512); bf16 on GPUs that have it."""
    if name != "auto":
        return getattr(torch, name)
    if device.type == "cuda" and torch.cuda.is_bf16_supported():
        return torch.bfloat16
    return torch.float32


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _vision_classes(path: str):
    config = AutoConfig.from_pretrained(path)
    kind = config.model_type
    if kind in ("clip", "clip_vision_model"):
        return CLIPVisionModel, config
    if kind in ("siglip", "siglip_vision_model"):
        return SiglipVisionModel, config
    raise ValueError(f"vision tower {path}: model type '{kind}' is not CLIP or SigLIP")


def load_tokenizer(lm_path: str) -> PreTrainedTokenizerBase:
    tokenizer = AutoTokenizer.from_pretrained(lm_path)
    if tokenizer.chat_template is None:
        raise ValueError(f"{lm_path}: tokenizer has no chat template; phiclip renders conversations with it")
    if IMAGE_TOKEN not in tokenizer.get_vocab():
        tokenizer.add_special_tokens({"additional_special_tokens": [IMAGE_TOKEN]})
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def _fit_embeddings(lm: torch.nn.Module, n_tokens: int) -> None:
    """Give the ``<image>`` token an embedding row, deterministically.

    Many LMs already have spare rows (vocab padded to a multiple of 64); otherwise the
    matrix grows and the new rows take the mean of the old ones, so rebuilding the model
    from its names gives identical weights and the run directory need not store them.
    """
    embed = lm.get_input_embeddings()
    old = embed.weight.shape[0]
    if n_tokens <= old:
        return
    lm.resize_token_embeddings(n_tokens, mean_resizing=False)
    with torch.no_grad():
        weight = lm.get_input_embeddings().weight
        weight[old:] = weight[:old].mean(0, keepdim=True)
        head = lm.get_output_embeddings()
        if head is not None and head.weight is not weight:
            head.weight[old:] = head.weight[:old].mean(0, keepdim=True)


def _quantization(lora: LoraConfig, dtype: torch.dtype):
    if lora.quantize == "none":
        return None
    if lora.quantize != "nf4":
        raise ValueError(f"lora.quantize: '{lora.quantize}' is not one of none, nf4")
    from transformers import BitsAndBytesConfig

    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=dtype,
        llm_int8_skip_modules=["lm_head"],
    )


def count_image_tokens(tower: torch.nn.Module, image_processor, layer: int | list[int], strategy: str) -> int:
    """Run the tower once on a blank image: the count is whatever it yields, never assumed."""
    from PIL import Image

    size = getattr(tower.config, "image_size", 224)
    pixels = image_processor(images=Image.new("RGB", (size, size)), return_tensors="pt")["pixel_values"]
    param = next(tower.parameters())
    with torch.no_grad():
        out = tower(pixels.to(param.device, param.dtype), output_hidden_states=True)
    first = layer if isinstance(layer, int) else layer[0]
    n = out.hidden_states[first].shape[1]
    return n - 1 if strategy == "default" else n


def _negative_layers(layer: int | list[int], n_layers: int) -> int | list[int]:
    """Count layers from the end: Llava asks the tower for hidden states only when the index is truthy,
    so layer 0 (the embeddings) must be spelled ``-(n_layers + 1)``."""
    if isinstance(layer, int):
        if not -(n_layers + 1) <= layer <= n_layers:
            raise ValueError(f"model.vision_feature_layer {layer}: the tower has {n_layers} layers")
        return layer - (n_layers + 1) if layer >= 0 else layer
    return [_negative_layers(one, n_layers) for one in layer]


def init_projector(projector: torch.nn.Module, std: float, seed: int = 0) -> None:
    """Normal(0, std) weights and zero biases, from a fixed seed.

    Features then enter the LM at roughly the scale of its token embeddings, instead of
    whatever the meta-device construction of the Llava class left in memory.
    """
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for linear in (projector.linear_1, projector.linear_2):
            linear.weight.copy_(torch.randn(linear.weight.shape, generator=gen) * std)
            if linear.bias is not None:
                linear.bias.zero_()


def build_model(cfg: ModelConfig, lora: LoraConfig | None = None, device: torch.device | None = None) -> Built:
    """Load the tower and the LM by name or path and put them in one Llava model."""
    if cfg.image_features not in ("patches", "pooled"):
        raise ValueError(f"model.image_features: '{cfg.image_features}' is not 'patches' or 'pooled'")
    if cfg.vision_feature_select_strategy not in ("default", "full"):
        raise ValueError("model.vision_feature_select_strategy must be 'default' (drop CLS) or 'full'")
    lora = lora or LoraConfig(enabled=False)
    device = device or default_device()
    dtype = pick_dtype(cfg.dtype, device)
    lm_path = offline.resolve(cfg.lm)
    vision_path = offline.resolve(cfg.vision)

    tokenizer = load_tokenizer(lm_path)
    vision_cls, _ = _vision_classes(vision_path)
    if cfg.image_features == "pooled":
        if vision_cls is not CLIPVisionModel:
            raise ValueError("model.image_features: pooled needs a CLIP tower (it uses CLIP's projected embedding)")
        vision_cls = CLIPVisionModelWithProjection
    tower = vision_cls.from_pretrained(vision_path, dtype=dtype).to(device)
    if vision_cls is SiglipVisionModel and cfg.vision_feature_select_strategy == "default":
        raise ValueError("SigLIP towers have no CLS token: set model.vision_feature_select_strategy: full")
    image_processor = AutoImageProcessor.from_pretrained(vision_path)

    quant = _quantization(lora, dtype)
    lm_kwargs = {"dtype": dtype, "attn_implementation": cfg.attn_implementation}
    if quant is not None:
        lm_kwargs["quantization_config"] = quant
        lm_kwargs["device_map"] = {"": device.index or 0} if device.type == "cuda" else {"": "cpu"}
    lm = AutoModelForCausalLM.from_pretrained(lm_path, **lm_kwargs)
    if quant is None:
        lm = lm.to(device)
    _fit_embeddings(lm, len(tokenizer))

    layer = _negative_layers(cfg.vision_feature_layer, tower.config.num_hidden_layers)
    if cfg.image_features == "pooled":
        n_image_tokens = 1
    else:
        n_image_tokens = count_image_tokens(tower, image_processor, layer, cfg.vision_feature_select_strategy)
    config = LlavaConfig(
        vision_config=tower.config,
        text_config=lm.config,
        image_token_id=tokenizer.convert_tokens_to_ids(IMAGE_TOKEN),
        image_seq_length=n_image_tokens,
        projector_hidden_act="gelu",
        vision_feature_layer=layer,
        vision_feature_select_strategy=cfg.vision_feature_select_strategy,
        tie_word_embeddings=bool(getattr(lm.config, "tie_word_embeddings", False)),
    )
    with torch.device("meta"):
        model = LlavaForConditionalGeneration(config)
    model.model.vision_tower = tower
    model.model.language_model = lm.model
    model.lm_head = lm.lm_head
    model.model.multi_modal_projector = LlavaMultiModalProjector(config).to(device=device, dtype=dtype)
    if cfg.image_features == "pooled":
        use_pooled_features(model, tower)
    init_projector(model.model.multi_modal_projector, cfg.projector_init_std)
    model.generation_config = lm.generation_config
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    if quant is not None:
        # The shell inherits the LM's quantizer so Trainer and PEFT treat it as the QLoRA model it is.
        model.hf_quantizer = lm.hf_quantizer
        model.is_quantized = True
        model.is_loaded_in_4bit = True
        model.config.quantization_config = lm.config.quantization_config
    model.config.use_cache = True
    model.requires_grad_(False)
    return Built(model=model, tokenizer=tokenizer, image_processor=image_processor, n_image_tokens=n_image_tokens)
