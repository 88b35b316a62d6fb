"""PhiClip: a causal chat LM that sees, through a CLIP/SigLIP tower and a Linear-GELU-Linear projector.

Layout, top to bottom:

1. ``PhiClipProjector``: vision features -> LM embeddings.
2. ``PhiClipForCausalLM``: image features, the splice (each ``<image>`` token in ``input_ids`` is
   replaced by that image's projected features, between the text before and after it), the
   forward, and ``generate()``: greedy and sampled decoding by a manual loop over embeddings with a
   KV cache, beam search by the LM's own ``generate()`` over the spliced embeddings; every
   GenerationConfig field is honoured or refused by name.
3. Loading and saving: the base LM and the tower are loaded by name; ``projector.safetensors``
   and the LoRA adapter (PEFT, in ``adapter/``) are the repository's own weights.

Text-only generation runs the base LM with the adapter switched off (``text_only_base_lm``),
so a LoRA trained on short visual answers does not change the LM's text replies; in a batch
that mixes image and text-only rows, each row takes its own route.
"""

from __future__ import annotations

import contextlib
import copy
import inspect
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn
from transformers import (
    AutoModelForCausalLM,
    CLIPVisionModel,
    CLIPVisionModelWithProjection,
    DynamicCache,
    EpsilonLogitsWarper,
    EtaLogitsWarper,
    ExponentialDecayLengthPenalty,
    ForcedBOSTokenLogitsProcessor,
    ForcedEOSTokenLogitsProcessor,
    GenerationConfig,
    GenerationMixin,
    InfNanRemoveLogitsProcessor,
    LogitNormalization,
    LogitsProcessorList,
    MaxTimeCriteria,
    MinNewTokensLengthLogitsProcessor,
    MinPLogitsWarper,
    NoBadWordsLogitsProcessor,
    NoRepeatNGramLogitsProcessor,
    PrefixConstrainedLogitsProcessor,
    PreTrainedModel,
    RepetitionPenaltyLogitsProcessor,
    SequenceBiasLogitsProcessor,
    SiglipVisionModel,
    StoppingCriteriaList,
    StopStringCriteria,
    SuppressTokensAtBeginLogitsProcessor,
    SuppressTokensLogitsProcessor,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
    TypicalLogitsWarper,
)
from transformers.activations import ACT2FN
from transformers.generation import GenerateBeamDecoderOnlyOutput, GenerateDecoderOnlyOutput

try:
    from .configuration_phiclip import PhiClipConfig
except ImportError:
    from configuration_phiclip import PhiClipConfig

try:  # Hub files and checkpoints: dependencies of transformers, guarded all the same
    from huggingface_hub import HfApi, snapshot_download
    from safetensors.torch import load_file, save_file
except ImportError:
    HfApi = snapshot_download = load_file = save_file = None

try:  # needed only for models with a LoRA adapter
    from peft import PeftModel
except ImportError:
    PeftModel = None

PROJECTOR_FILE = "projector.safetensors"
VISION_FILE = "vision_tower.safetensors"
ADAPTER_DIR = "adapter"
CODE_FILES = ("configuration_phiclip.py", "modeling_phiclip.py", "processing_phiclip.py")
AUTO_MAP = {
    "AutoConfig": "configuration_phiclip.PhiClipConfig",
    "AutoModel": "modeling_phiclip.PhiClipForCausalLM",
    "AutoModelForCausalLM": "modeling_phiclip.PhiClipForCausalLM",
    "AutoModelForImageTextToText": "modeling_phiclip.PhiClipForCausalLM",
}
IGNORE_INDEX = -100

# How ``from_pretrained`` sorts the keywords transformers hands it (its own ``from_pretrained`` takes all of them).
HUB_ARGUMENTS = ("cache_dir", "force_download", "local_files_only", "token", "proxies")  # every file fetched
REPO_ARGUMENTS = ("revision", "subfolder")  # this repository only, never the base LM's or the tower's
OWN_ARGUMENTS = ("merge_adapter", "load_adapter", "generation_config")
# Plumbing about this repository's code and adapter, never forwarded to the base LM (nor are ``_``-prefixed flags).
CALLER_ARGUMENTS = ("trust_remote_code", "code_revision", "adapter_kwargs")
# Honoured by the base LM's own from_pretrained, never copied onto PhiClip's config.
LM_LOAD_ARGUMENTS = ("dtype", "device_map", "max_memory", "offload_folder", "offload_buffers", "quantization_config",
                     "attn_implementation", "low_cpu_mem_usage", "use_safetensors", "weights_only", "use_kernels")
REFUSED_ARGUMENTS = {
    "gguf_file": "PhiClip's weights are a projector and a LoRA adapter in safetensors, not a GGUF file",
    "state_dict": "PhiClip loads its projector strictly from projector.safetensors",
    "variant": "PhiClip's weight files have no variants",
    "key_mapping": "PhiClip's weights are loaded strictly, under their own names",
    "ignore_mismatched_sizes": "PhiClip's weights are loaded strictly: a mismatch is an error",
    "output_loading_info": "PhiClip's strict loading has no missing or unexpected keys to report",
    "from_tf": "PhiClip's weights are PyTorch safetensors",
    "from_flax": "PhiClip's weights are PyTorch safetensors",
    "tp_plan": "tensor parallelism is not supported by PhiClip's splice",
    "tp_size": "tensor parallelism is not supported by PhiClip's splice",
    "device_mesh": "tensor parallelism is not supported by PhiClip's splice",
}


class PhiClipProjector(nn.Module):
    """Linear -> activation -> Linear, from the tower's feature size to the LM's hidden size."""

    def __init__(self, in_features: int, out_features: int, act: str = "gelu") -> None:
        super().__init__()
        self.linear_1 = nn.Linear(in_features, out_features)
        self.act = ACT2FN[act]
        self.linear_2 = nn.Linear(out_features, out_features)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.linear_2(self.act(self.linear_1(features)))

    @torch.no_grad()
    def reset_parameters(self, std: float, only: nn.Linear | None = None) -> None:
        """Normal(0, std) weights and zero biases from fixed seeds: rebuilding a model gives the same projector."""
        for seed, linear in enumerate((self.linear_1, self.linear_2)):
            if only is None or linear is only:
                gen = torch.Generator().manual_seed(seed)
                linear.weight.copy_(torch.randn(linear.weight.shape, generator=gen) * std)
                linear.bias.zero_()


SIGLIP2_NAFLEX = (
    "vision tower of model type 'siglip2_vision_model' (SigLIP2 NaFlex) gives each image its own number of patches, "
    "and PhiClip feeds the LM a fixed number of image tokens: pick a fixed-resolution SigLIP2 checkpoint "
    "(model type 'siglip', e.g. google/siglip2-so400m-patch14-384)"
)


def vision_tower_class(config: PhiClipConfig) -> type[PreTrainedModel]:
    kind = config.vision_config.model_type
    if kind == "siglip2_vision_model":
        raise ValueError(SIGLIP2_NAFLEX)
    if kind.startswith("siglip"):
        if config.image_features == "pooled":
            raise ValueError("image_features 'pooled' needs a CLIP tower (CLIP's projected image embedding)")
        return SiglipVisionModel
    if kind.startswith("clip"):
        return CLIPVisionModelWithProjection if config.image_features == "pooled" else CLIPVisionModel
    raise ValueError(f"vision tower of model type '{kind}' is not CLIP or SigLIP")


# Weights of a two-tower CLIP/SigLIP checkpoint that belong to its text half: a vision tower leaves them unused.
TEXT_HALF = ("text_model.", "text_projection.", "visual_projection.", "logit_scale", "logit_bias")


def load_vision_tower(config: PhiClipConfig, name: str, **kwargs: Any) -> PreTrainedModel:
    """The vision tower of the CLIP/SigLIP checkpoint ``name`` (Hub id or folder; ``kwargs`` go to
    ``from_pretrained``). The text half of a two-tower checkpoint is left out without a load report; a weight the
    tower needs and the checkpoint lacks raises ``ValueError`` naming it; any other unused weight is logged."""
    from transformers.utils import logging as hf_logging

    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # transformers would report the whole text half as UNEXPECTED
    try:
        tower, info = vision_tower_class(config).from_pretrained(name, output_loading_info=True, **kwargs)
    finally:
        hf_logging.set_verbosity(verbosity)
    if info["missing_keys"]:
        raise ValueError(f"vision tower {name}: the checkpoint lacks {', '.join(sorted(info['missing_keys']))}")
    unused = sorted(k for k in info["unexpected_keys"] if not k.startswith(TEXT_HALF))
    if unused:
        hf_logging.get_logger(__name__).warning(f"vision tower {name}: weights left unused: {', '.join(unused)}")
    return tower


class PhiClipForCausalLM(PreTrainedModel, GenerationMixin):
    config_class = PhiClipConfig
    base_model_prefix = ""
    main_input_name = "input_ids"
    supports_gradient_checkpointing = True
    _supports_sdpa = True
    _supports_flash_attn = True

    def __init__(
        self,
        config: PhiClipConfig,
        language_model: nn.Module | None = None,
        vision_tower: nn.Module | None = None,
    ) -> None:
        """Build from the configs (random weights), or around an LM and a tower loaded by the caller."""
        super().__init__(config)
        self.vision_tower = vision_tower if vision_tower is not None else vision_tower_class(config)(config.vision_config)
        self.language_model = (
            language_model if language_model is not None else AutoModelForCausalLM.from_config(config.text_config)
        )
        vision = config.vision_config
        if config.image_features == "pooled":
            in_features = vision.projection_dim
        else:
            layers = config.vision_feature_layer
            in_features = vision.hidden_size * (len(layers) if isinstance(layers, list) else 1)
        self.projector = PhiClipProjector(in_features, config.text_config.hidden_size, config.projector_hidden_act)
        self.post_init()

    def _init_weights(self, module: nn.Module) -> None:
        # LM and tower are pretrained models that initialise themselves; only the projector is ours.
        # transformers initialises leaf modules (a container without parameters of its own is skipped).
        projector = getattr(self, "projector", None)
        if projector is not None and any(module is linear for linear in (projector.linear_1, projector.linear_2)):
            projector.reset_parameters(self.config.projector_init_std, only=module)

    def get_input_embeddings(self) -> nn.Module:
        return self.language_model.get_input_embeddings()

    def set_input_embeddings(self, value: nn.Module) -> None:
        self.language_model.set_input_embeddings(value)

    def get_output_embeddings(self) -> nn.Module | None:
        return self.language_model.get_output_embeddings()

    @property
    def has_adapter(self) -> bool:
        return PeftModel is not None and isinstance(self.language_model, PeftModel)

    def adapter_disabled(self) -> contextlib.AbstractContextManager:
        """Context in which the LM runs without its LoRA adapter (a no-op when there is none)."""
        return self.language_model.disable_adapter() if self.has_adapter else contextlib.nullcontext()

    # ---- images -------------------------------------------------------------------------------

    def get_image_features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """Projected features, ``(n_images, tokens_per_image, lm_hidden)``."""
        param = next(self.vision_tower.parameters())
        pixel_values = pixel_values.to(param.device, param.dtype)  # (n_images, 3, side, side)
        if self.config.image_features == "pooled":
            features = self.vision_tower(pixel_values=pixel_values).image_embeds[:, None, :]  # (n_images, 1, proj)
        else:
            out = self.vision_tower(pixel_values=pixel_values, output_hidden_states=True)
            layers = self.config.vision_feature_layer
            layers = layers if isinstance(layers, list) else [layers]
            n = len(out.hidden_states)
            for layer in layers:
                if not -n <= layer < n:
                    raise ValueError(f"vision_feature_layer {layer}: the tower has hidden states 0..{n - 1}")
            # (n_images, patches [+ 1 class token], vision_hidden * len(layers))
            features = torch.cat([out.hidden_states[layer] for layer in layers], dim=-1)
            if self.config.vision_feature_select_strategy == "default":
                features = features[:, 1:]  # the class token dropped
        return self.projector(features)  # (n_images, tokens_per_image, lm_hidden)

    @torch.no_grad()
    def image_token_count(self) -> int:
        """How many LM positions one image takes, measured by running the tower on a blank image."""
        size = self.config.vision_config.image_size
        param = next(self.vision_tower.parameters())
        blank = torch.zeros(1, 3, size, size, device=param.device, dtype=param.dtype)  # (1, 3, side, side)
        return self.get_image_features(blank).shape[1]

    @staticmethod
    def spliced_length(n_ids: int, n_images: int, image_tokens: int) -> int:
        """LM positions of a row of ``n_ids`` ids holding ``n_images`` ``<image>`` tokens, once each is replaced by
        its ``image_tokens`` features (:meth:`image_token_count`): the one formula every length check uses."""
        return n_ids + (image_tokens - 1) * n_images

    def splice(
        self,
        input_ids: torch.LongTensor,
        image_features: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        labels: torch.LongTensor | None = None,
        padding_side: str = "right",
    ) -> dict[str, torch.Tensor]:
        """Embed ``input_ids`` with each image's features in place of its ``<image>`` token.

        Images are taken in order, row by row. Rows are re-padded on ``padding_side`` to the
        longest spliced row; labels get -100 over image positions and padding. Returns
        ``inputs_embeds``, ``attention_mask``, ``position_ids`` and, with labels, ``labels``.
        """
        batch, length = input_ids.shape  # input_ids: (rows, positions)
        device = input_ids.device
        token, token_id = self.config.image_token, self.config.image_token_id
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        keep = attention_mask.bool()  # (rows, positions)
        is_image = (input_ids == token_id) & keep  # (rows, positions)
        counts = is_image.sum(1).tolist()  # <image> tokens per row
        n_images = 0 if image_features is None else image_features.shape[0]
        if sum(counts) != n_images:
            rows = ", ".join(f"row {r}: {c}" for r, c in enumerate(counts))
            if image_features is None:
                raise ValueError(f"input_ids hold {sum(counts)} {token} token(s) ({rows}) but no pixel_values were given")
            if sum(counts) == 0:
                raise ValueError(f"pixel_values hold {n_images} image(s) but no row of input_ids has a {token} token")
            raise ValueError(f"input_ids hold {sum(counts)} {token} token(s) ({rows}) but pixel_values hold {n_images} image(s)")

        text = self.get_input_embeddings()(input_ids.masked_fill(input_ids == token_id, 0))  # (rows, positions, hidden)
        hidden = text.shape[-1]
        per_image = 0 if image_features is None else image_features.shape[1]
        # One bank of vectors to gather from: every text position, then every image feature, then a zero pad vector.
        bank = [text.reshape(batch * length, hidden)]  # (rows * positions, hidden)
        if image_features is not None:
            bank.append(image_features.reshape(-1, hidden).to(text.dtype))  # (images * per_image, hidden)
        bank.append(text.new_zeros(1, hidden))  # (1, hidden)
        bank = torch.cat(bank)  # (rows * positions + images * per_image + 1, hidden)
        pad_index = bank.shape[0] - 1

        rows, seen = [], 0  # rows: each spliced row's bank indices; seen: images of earlier rows
        for b in range(batch):
            pos = keep[b].nonzero().squeeze(1)  # (kept,) this row's unpadded positions
            img = is_image[b, pos]  # (kept,) which of them are <image>
            reps = torch.where(img, per_image, 1)  # (kept,) bank entries each position becomes
            index = torch.repeat_interleave(b * length + pos, reps)  # (spliced,) text indices, <image> repeated
            if img.any():
                expanded = torch.repeat_interleave(img, reps)  # (spliced,) inside an image's span
                # (spliced,) 0..per_image-1 within each image's span: position minus the span's first index
                offset = torch.arange(index.numel(), device=device) - torch.repeat_interleave(reps.cumsum(0) - reps, reps)
                ordinal = torch.repeat_interleave(img.long().cumsum(0) - 1, reps) + seen  # (spliced,) image number
                index = torch.where(expanded, batch * length + ordinal * per_image + offset, index)
                seen += int(img.sum())
            rows.append(index)

        longest = max(row.numel() for row in rows)
        index = torch.full((batch, longest), pad_index, dtype=torch.long, device=device)  # (rows, longest)
        mask = torch.zeros((batch, longest), dtype=attention_mask.dtype, device=device)  # (rows, longest)
        for b, row in enumerate(rows):
            span = slice(longest - row.numel(), longest) if padding_side == "left" else slice(0, row.numel())
            index[b, span] = row
            mask[b, span] = 1
        out = {
            "inputs_embeds": bank[index],  # (rows, longest, hidden)
            "attention_mask": mask,
            "position_ids": (mask.long().cumsum(-1) - 1).clamp(min=0),
        }
        if labels is not None:
            label_bank = torch.cat(
                [labels.reshape(-1), torch.full((n_images * per_image + 1,), IGNORE_INDEX, device=device)]
            )
            out["labels"] = label_bank[index]
        return out

    # ---- forward ------------------------------------------------------------------------------

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        pixel_values: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
        labels: torch.LongTensor | None = None,
        **kwargs: Any,
    ):
        """The LM's forward on the spliced sequence; labels are passed unshifted to the LM's loss.

        Logits (and the loss) are over the spliced sequence: each ``<image>`` position becomes
        ``image_token_count()`` positions, and rows keep their padding side (left or right).
        """
        if pixel_values is not None and pixel_values.shape[0] == 0:  # text-only rows from the processor
            pixel_values = None
        has_images = pixel_values is not None or (
            input_ids is not None and bool((input_ids == self.config.image_token_id).any())
        )
        if has_images:
            if inputs_embeds is not None:
                raise ValueError("pass input_ids with <image> tokens, not inputs_embeds, together with pixel_values")
            features = self.get_image_features(pixel_values) if pixel_values is not None else None
            left = attention_mask is not None and bool((attention_mask[:, -1] == 1).all()) and not bool(
                attention_mask[:, 0].all()
            )
            spliced = self.splice(input_ids, features, attention_mask, labels, "left" if left else "right")
            return self.language_model(**spliced, **kwargs)
        return self.language_model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            inputs_embeds=inputs_embeds,
            labels=labels,
            **kwargs,
        )

    # ---- generation ---------------------------------------------------------------------------

    # GenerationConfig fields, sorted three ways. Any field in none of them (such as one a later transformers
    # adds) is refused as soon as it is set, so that no setting is silently ignored.
    GENERATION_HONOURED = frozenset({
        "max_length", "max_new_tokens", "min_length", "min_new_tokens", "max_time", "stop_strings", "eos_token_id",
        "pad_token_id", "do_sample", "num_beams", "num_return_sequences", "length_penalty", "early_stopping",
        "temperature", "top_k", "top_p", "min_p", "typical_p", "epsilon_cutoff", "eta_cutoff", "repetition_penalty",
        "no_repeat_ngram_size", "bad_words_ids", "sequence_bias", "suppress_tokens", "begin_suppress_tokens",
        "forced_bos_token_id", "forced_eos_token_id", "exponential_decay_length_penalty", "remove_invalid_values",
        "renormalize_logits", "watermarking_config", "output_scores", "output_logits", "return_dict_in_generate",
    })
    # Fields that cannot change what generate() returns: the cache is always on, generation always starts from
    # input_ids (bos_token_id only starts an empty prompt), nothing is compiled, no cache is returned.
    GENERATION_NO_EFFECT = frozenset({
        "use_cache", "bos_token_id", "disable_compile", "return_legacy_cache", "transformers_version",
    })
    # Refused fields: the value that leaves each one off (besides None and GenerationConfig()'s own default), and why.
    GENERATION_REFUSED = {
        "num_beam_groups": (1, "group (diverse) beam search is not implemented"),
        "diversity_penalty": (0.0, "group (diverse) beam search is not implemented"),
        "constraints": (None, "constrained beam search is not implemented"),
        "force_words_ids": (None, "constrained beam search is not implemented"),
        "penalty_alpha": (None, "contrastive search is not implemented"),
        "dola_layers": (None, "DoLa decoding is not implemented"),
        "top_h": (None, "top-H sampling is not implemented"),
        "guidance_scale": (1.0, "classifier-free guidance is not implemented"),
        "token_healing": (False, "token healing is not implemented"),
        "low_memory": (False, "sequential beam search is not implemented"),
        "output_attentions": (False, "attentions are not returned"),
        "output_hidden_states": (False, "hidden states are not returned"),
        "encoder_repetition_penalty": (1.0, "an encoder-decoder setting"),
        "encoder_no_repeat_ngram_size": (0, "an encoder-decoder setting"),
        "decoder_start_token_id": (None, "an encoder-decoder setting"),
        "cache_implementation": (None, "generation runs on a DynamicCache"),
        "cache_config": (None, "generation runs on a DynamicCache"),
        "max_cache_len": (None, "generation runs on a DynamicCache"),
        "compile_config": (None, "generation is not compiled"),
        "prefill_chunk_size": (None, "the prompt is prefilled in one pass"),
        "continuous_batching_config": (None, "continuous batching is not implemented"),
        "is_assistant": (False, "assisted generation is not implemented"),
        "num_assistant_tokens": (20, "assisted generation is not implemented"),
        "num_assistant_tokens_schedule": ("constant", "assisted generation is not implemented"),
        "assistant_confidence_threshold": (0.4, "assisted generation is not implemented"),
        "assistant_lookbehind": (10, "assisted generation is not implemented"),
        "target_lookbehind": (10, "assisted generation is not implemented"),
        "assistant_early_exit": (None, "assisted generation is not implemented"),
        "assistant_ensemble_weight": (None, "assisted generation is not implemented"),
        "prompt_lookup_num_tokens": (None, "prompt lookup decoding is not implemented"),
        "max_matching_ngram_size": (None, "prompt lookup decoding is not implemented"),
        "speculation_type": (None, "speculative decoding is not implemented"),
        "use_mtp": (False, "multi-token prediction is not implemented"),
    }
    # transformers' generate() arguments that are not GenerationConfig fields and that PhiClip refuses.
    GENERATE_ARGUMENTS_REFUSED = {
        "assistant_model": "assisted generation is not implemented",
        "assistant_tokenizer": "assisted generation is not implemented",
        "negative_prompt_ids": "classifier-free guidance is not implemented",
        "negative_prompt_attention_mask": "classifier-free guidance is not implemented",
        "custom_generate": "custom generation methods are not supported",
        "synced_gpus": "generation runs on one process",
    }

    @torch.no_grad()
    def generate(
        self,
        input_ids: torch.LongTensor | None = None,
        pixel_values: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        generation_config: GenerationConfig | None = None,
        logits_processor: LogitsProcessorList | None = None,
        stopping_criteria: StoppingCriteriaList | None = None,
        streamer: Any | None = None,
        tokenizer: Any | None = None,
        prefix_allowed_tokens_fn: Callable[[int, torch.Tensor], list[int]] | None = None,
        **kwargs: Any,
    ) -> torch.LongTensor | GenerateDecoderOnlyOutput | GenerateBeamDecoderOnlyOutput:
        """The prompt ids followed by the new ids, ``(batch * num_return_sequences, prompt + new)``, padded after EOS.

        Greedy and sampled decoding run our own loop: the spliced prompt once, then each new token
        through the LM with a ``DynamicCache``; rows stop independently. Beam search runs the LM's
        own ``generate()`` over the spliced embeddings. Each row is answered as it would be alone: in
        a batch that mixes image rows and text-only rows, the text-only rows run on the base LM (when
        ``config.text_only_base_lm`` and there is an adapter) and the image rows with the adapter.

        Honoured, as a ``GenerationConfig`` or as keywords, with transformers' meaning and defaults
        (``GENERATION_HONOURED``): lengths (``max_new_tokens``, ``max_length``, ``min_new_tokens``,
        ``min_length``; lengths count ``input_ids`` as given), ``max_time``, ``stop_strings`` (needs
        ``tokenizer=``), ``eos_token_id`` (int or list), ``pad_token_id``; ``do_sample`` with
        ``temperature``, ``top_k``, ``top_p``, ``min_p``, ``typical_p``, ``epsilon_cutoff``, ``eta_cutoff``;
        ``num_beams``, ``length_penalty``, ``early_stopping``, ``num_return_sequences``;
        ``repetition_penalty``, ``no_repeat_ngram_size``, ``bad_words_ids``, ``sequence_bias``,
        ``suppress_tokens``, ``begin_suppress_tokens``, ``forced_bos_token_id``, ``forced_eos_token_id``,
        ``exponential_decay_length_penalty``, ``remove_invalid_values``, ``renormalize_logits``,
        ``watermarking_config``; ``return_dict_in_generate`` with ``output_scores`` / ``output_logits``
        (a ``GenerateDecoderOnlyOutput``, or a ``GenerateBeamDecoderOnlyOutput`` for beam search).
        Also ``logits_processor``, ``stopping_criteria``, ``prefix_allowed_tokens_fn`` and a
        ``streamer`` (TextStreamer's put/end protocol; not with beam search).

        Raises:
            ValueError: a setting that is not honoured (``GENERATION_REFUSED``, any GenerationConfig
                field not listed here, ``GENERATE_ARGUMENTS_REFUSED``) is set, naming it;
                ``inputs_embeds`` is given; the settings contradict each other.
            TypeError: an argument that is neither a GenerationConfig field nor a generate() argument.
        """
        if kwargs.get("inputs_embeds") is not None:
            raise ValueError(
                "generate(inputs_embeds=...) is not supported: PhiClip builds the embeddings itself from input_ids "
                "(one <image> token per image) and pixel_values. To continue from embeddings of your own, call "
                "model.language_model.generate(inputs_embeds=...)"
            )
        kwargs.pop("inputs_embeds", None)
        if input_ids is None:
            raise ValueError("generate() needs input_ids (with one <image> token per image in pixel_values)")
        gen = self._generation_config(generation_config, kwargs)
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        beams = (gen.num_beams or 1) > 1
        if (gen.output_scores or gen.output_logits) and not gen.return_dict_in_generate:
            raise ValueError("output_scores and output_logits need return_dict_in_generate=True")
        if streamer is not None and beams:
            raise ValueError("a streamer cannot be used with beam search (num_beams > 1)")
        if gen.stop_strings and tokenizer is None:
            raise ValueError("stop_strings needs the tokenizer: generate(..., tokenizer=processor.tokenizer)")

        if pixel_values is not None and pixel_values.shape[0] == 0:  # text-only rows from the processor
            pixel_values = None
        has_image = ((input_ids == self.config.image_token_id) & attention_mask.bool()).any(1)
        routes = [has_image.nonzero().squeeze(1), (~has_image).nonzero().squeeze(1)]
        base_lm_for_text = self.config.text_only_base_lm and self.has_adapter
        if not (base_lm_for_text and routes[0].numel() and routes[1].numel()):
            out = self._generate_rows(
                input_ids, pixel_values, attention_mask, gen, self.config.text_only_base_lm and not has_image.any(),
                logits_processor, stopping_criteria, streamer, tokenizer, prefix_allowed_tokens_fn,
            )
            return out if gen.return_dict_in_generate else out.sequences
        # Text-only rows and image rows take different routes: run each group as a batch of its own.
        if streamer is not None:
            raise ValueError("a streamer needs a batch of one route: all rows with images, or all text-only rows")
        n_markers = int(((input_ids == self.config.image_token_id) & attention_mask.bool()).sum())
        n_images = 0 if pixel_values is None else pixel_values.shape[0]
        if n_markers != n_images:
            raise ValueError(f"input_ids hold {n_markers} {self.config.image_token} token(s) (rows "
                             f"{routes[0].tolist()}) but pixel_values hold {n_images} image(s)")
        parts = []
        for rows, pixels, base_lm in ((routes[0], pixel_values, False), (routes[1], None, True)):
            prefix_fn = prefix_allowed_tokens_fn
            if prefix_fn is not None:  # it is asked about the row's place in the whole batch
                prefix_fn = lambda row, ids, rows=rows.tolist(): prefix_allowed_tokens_fn(rows[row], ids)
            parts.append(self._generate_rows(
                input_ids[rows], pixels, attention_mask[rows], gen, base_lm,
                logits_processor, stopping_criteria, None, tokenizer, prefix_fn,
            ))
        groups = [r.tolist() for r in routes]
        out = self._merge_row_groups(parts, groups, input_ids.shape[0], self._pad_id(gen), gen.num_beams or 1)
        return out if gen.return_dict_in_generate else out.sequences

    def _generation_config(
        self, generation_config: GenerationConfig | None, kwargs: dict[str, Any]
    ) -> GenerationConfig:
        """A copy of ``generation_config`` (or the model's) updated with ``kwargs``, once every setting is known.

        Raises ValueError naming a field that is set but not honoured, TypeError naming unknown arguments.
        """
        gen = copy.deepcopy(generation_config if generation_config is not None else self.generation_config)
        for name, value in kwargs.items():
            if name in self.GENERATE_ARGUMENTS_REFUSED and value is not None and value is not False:
                raise ValueError(f"generate() does not support {name}: {self.GENERATE_ARGUMENTS_REFUSED[name]}")
        known = set(vars(gen)) | set(self.GENERATE_ARGUMENTS_REFUSED)
        unknown = sorted(name for name in kwargs if name not in known)
        if unknown:
            raise TypeError(f"generate() got unexpected arguments: {', '.join(unknown)}")
        settings = {**vars(gen), **{k: v for k, v in kwargs.items() if hasattr(gen, k)}}
        defaults = vars(GenerationConfig())
        for name, value in settings.items():
            if name.startswith("_") or name in self.GENERATION_HONOURED or name in self.GENERATION_NO_EFFECT:
                continue
            off, why = self.GENERATION_REFUSED.get(name, (None, "PhiClip's generate() does not implement it"))
            if value is None or value == off or value == defaults.get(name):
                continue
            raise ValueError(f"generate() does not support {name}={value!r}: {why}")
        gen.update(**{k: v for k, v in kwargs.items() if hasattr(gen, k)})
        return gen

    @staticmethod
    def _pad_id(gen: GenerationConfig) -> int:
        """``pad_token_id``, else the first EOS id, else 0."""
        eos = gen.eos_token_id
        eos = [eos] if isinstance(eos, int) else list(eos or [])
        return gen.pad_token_id if gen.pad_token_id is not None else (eos[0] if eos else 0)

    def _cache_kwargs(self, cache: DynamicCache) -> dict[str, DynamicCache]:
        """transformers 5.24+ names the cache argument ``cache``; earlier releases ``past_key_values``."""
        lm = self.language_model.get_base_model() if self.has_adapter else self.language_model
        name = "cache" if "cache" in inspect.signature(lm.forward).parameters else "past_key_values"
        return {name: cache}

    def _generate_rows(
        self,
        input_ids: torch.LongTensor,
        pixel_values: torch.Tensor | None,
        attention_mask: torch.Tensor,
        gen: GenerationConfig,
        base_lm: bool,
        logits_processor: LogitsProcessorList | None,
        stopping_criteria: StoppingCriteriaList | None,
        streamer: Any | None,
        tokenizer: Any | None,
        prefix_allowed_tokens_fn: Callable[[int, torch.Tensor], list[int]] | None,
    ) -> GenerateDecoderOnlyOutput | GenerateBeamDecoderOnlyOutput:
        """generate() for rows that share one route (``base_lm``: the LM with its adapter disabled)."""
        eos = gen.eos_token_id if gen.eos_token_id is not None else []
        eos = [eos] if isinstance(eos, int) else list(eos)
        pad = self._pad_id(gen)
        prompt_length = input_ids.shape[1]
        max_length = gen.max_length if gen.max_length is not None else 20  # transformers' default
        max_new = gen.max_new_tokens if gen.max_new_tokens is not None else max_length - prompt_length
        if max_new < 1:
            raise ValueError(f"max_length={max_length} leaves no room for new tokens after a prompt of "
                             f"{prompt_length} ids: set max_new_tokens")
        min_new = gen.min_new_tokens
        if min_new is None:
            min_new = max((gen.min_length or 0) - prompt_length, 0)
        num_beams, per_prompt = gen.num_beams or 1, gen.num_return_sequences or 1
        criteria = StoppingCriteriaList(stopping_criteria or [])
        if gen.stop_strings:
            criteria.append(StopStringCriteria(tokenizer, gen.stop_strings))
        if gen.max_time is not None:
            criteria.append(MaxTimeCriteria(gen.max_time))

        with self.adapter_disabled() if base_lm else contextlib.nullcontext():
            features = self.get_image_features(pixel_values) if pixel_values is not None else None
            spliced = self.splice(input_ids, features, attention_mask, labels=input_ids, padding_side="left")
            # The ids the logits processors and stopping criteria see: the spliced rows, with pad_token_id over
            # image features and padding (both labelled IGNORE_INDEX), one id per LM position.
            labels = spliced.pop("labels")
            seen = labels.masked_fill(labels == IGNORE_INDEX, pad)
            padding = (spliced["attention_mask"] == 0).sum(1).repeat_interleave(max(num_beams, per_prompt))
            processors = self._logits_processors(
                gen, seen.shape[1], padding, eos, max_new, min_new, max(num_beams, per_prompt),
                logits_processor, prefix_allowed_tokens_fn, input_ids.device,
            )
            if num_beams > 1:
                out = self._beam_search(spliced, seen, gen, processors, criteria, max_new, eos, pad)
            else:
                if streamer is not None:
                    streamer.put(input_ids.cpu())
                out = self._decode(spliced, seen, gen, processors, criteria, streamer, per_prompt, max_new, eos, pad)
                if streamer is not None:
                    streamer.end()
        out.sequences = torch.cat([input_ids.repeat_interleave(per_prompt, 0), out.sequences], dim=1)
        return out

    def _logits_processors(
        self,
        gen: GenerationConfig,
        length: int,
        padding: torch.Tensor,
        eos: list[int],
        max_new: int,
        min_new: int,
        rows_per_prompt: int,
        extra: LogitsProcessorList | None,
        prefix_allowed_tokens_fn: Callable[[int, torch.Tensor], list[int]] | None,
        device: torch.device,
    ) -> LogitsProcessorList:
        """transformers' public processors for ``gen``, in the order its own generate() applies them.

        ``length``: the spliced prompt length the processors see; ``padding``: left padding of each
        row (prompt rows repeated ``rows_per_prompt`` times), which the repetition penalty skips
        under transformers 5. The user's ``extra`` processors run before the sampling warpers.
        """
        processors = LogitsProcessorList()
        if gen.sequence_bias is not None:
            processors.append(SequenceBiasLogitsProcessor(gen.sequence_bias))
        if gen.repetition_penalty is not None and gen.repetition_penalty != 1.0:
            penalty = float(gen.repetition_penalty)
            try:  # transformers 5 skips each row's padding; 4.x takes one length (and penalises padding, as it does)
                processors.append(RepetitionPenaltyLogitsProcessor(penalty, prompt_ignore_length=padding))
            except ValueError:
                processors.append(RepetitionPenaltyLogitsProcessor(penalty))
        if gen.no_repeat_ngram_size:
            processors.append(NoRepeatNGramLogitsProcessor(gen.no_repeat_ngram_size))
        if gen.bad_words_ids is not None:
            processors.append(NoBadWordsLogitsProcessor(gen.bad_words_ids, eos or None))
        if min_new > 0 and eos:
            processors.append(MinNewTokensLengthLogitsProcessor(length, min_new, eos, device=device))
        if prefix_allowed_tokens_fn is not None:
            processors.append(PrefixConstrainedLogitsProcessor(prefix_allowed_tokens_fn, rows_per_prompt))
        if gen.forced_bos_token_id is not None:
            processors.append(ForcedBOSTokenLogitsProcessor(gen.forced_bos_token_id))
        if gen.forced_eos_token_id is not None:
            processors.append(ForcedEOSTokenLogitsProcessor(length + max_new, gen.forced_eos_token_id, device=device))
        if gen.remove_invalid_values:
            processors.append(InfNanRemoveLogitsProcessor())
        if gen.exponential_decay_length_penalty is not None:
            processors.append(ExponentialDecayLengthPenalty(gen.exponential_decay_length_penalty, eos, length))
        if gen.suppress_tokens is not None:
            processors.append(SuppressTokensLogitsProcessor(gen.suppress_tokens, device=device))
        if gen.begin_suppress_tokens is not None:
            processors.append(SuppressTokensAtBeginLogitsProcessor(gen.begin_suppress_tokens, length, device=device))
        processors.extend(extra or [])
        if gen.do_sample:
            # beam sampling keeps one token more than there are EOS ids, so that a beam can always go on
            keep = len(eos) + 1 if (gen.num_beams or 1) > 1 else 1
            if gen.temperature is not None and gen.temperature != 1.0:
                processors.append(TemperatureLogitsWarper(gen.temperature))
            top_k = gen.top_k if gen.top_k is not None else 50  # transformers' default
            if top_k != 0:
                processors.append(TopKLogitsWarper(top_k, min_tokens_to_keep=keep))
            if gen.top_p is not None and gen.top_p < 1.0:
                processors.append(TopPLogitsWarper(gen.top_p, min_tokens_to_keep=keep))
            if gen.min_p is not None:
                processors.append(MinPLogitsWarper(gen.min_p, min_tokens_to_keep=keep))
            if gen.typical_p is not None and gen.typical_p < 1.0:
                processors.append(TypicalLogitsWarper(gen.typical_p, min_tokens_to_keep=keep))
            if gen.epsilon_cutoff is not None and 0.0 < gen.epsilon_cutoff < 1.0:
                processors.append(EpsilonLogitsWarper(gen.epsilon_cutoff, min_tokens_to_keep=keep))
            if gen.eta_cutoff is not None and 0.0 < gen.eta_cutoff < 1.0:
                processors.append(EtaLogitsWarper(gen.eta_cutoff, min_tokens_to_keep=keep, device=device))
        if gen.watermarking_config is not None:
            vocab = self.get_output_embeddings().weight.shape[0]
            processors.append(gen.watermarking_config.construct_processor(vocab, device))
        if gen.renormalize_logits:
            processors.append(LogitNormalization())
        return processors

    def _decode(
        self,
        spliced: dict[str, torch.Tensor],
        seen: torch.LongTensor,
        gen: GenerationConfig,
        processors: LogitsProcessorList,
        criteria: StoppingCriteriaList,
        streamer: Any | None,
        per_prompt: int,
        max_new: int,
        eos: list[int],
        pad: int,
    ) -> GenerateDecoderOnlyOutput:
        """Greedy or sampled decoding with a KV cache; ``sequences`` are the new ids, ``(rows * per_prompt, steps)``.

        The spliced prompts run once; each prompt's cache is then repeated for its ``per_prompt``
        samples (``DynamicCache.batch_repeat_interleave``). ``scores`` (processed) and ``logits``
        (raw) hold one ``(rows, vocab)`` tensor per step when asked for.
        """
        mask, positions = spliced["attention_mask"], spliced["position_ids"]
        cache = DynamicCache()
        cache_kwargs = self._cache_kwargs(cache)
        out = self.language_model(
            inputs_embeds=spliced["inputs_embeds"], attention_mask=mask, position_ids=positions,
            use_cache=True, logits_to_keep=1, **cache_kwargs,
        )
        logits = out.logits[:, -1, :].float()  # (rows, vocab)
        if per_prompt > 1:
            cache.batch_repeat_interleave(per_prompt)
            logits, mask, positions, seen = (
                t.repeat_interleave(per_prompt, 0) for t in (logits, mask, positions, seen)
            )
        eos_ids = torch.tensor(eos, device=seen.device, dtype=torch.long)
        done = torch.zeros(seen.shape[0], dtype=torch.bool, device=seen.device)  # (rows,) row finished
        new_tokens: list[torch.Tensor] = []
        all_scores: list[torch.Tensor] = []
        all_logits: list[torch.Tensor] = []
        for step in range(max_new):
            scores = processors(seen, logits)
            if gen.output_scores:
                all_scores.append(scores)
            if gen.output_logits:
                all_logits.append(logits)
            if gen.do_sample:
                next_tokens = torch.multinomial(scores.softmax(-1), num_samples=1).squeeze(1)
            else:
                next_tokens = scores.argmax(-1)
            next_tokens = torch.where(done, torch.full_like(next_tokens, pad), next_tokens)  # (rows,)
            seen = torch.cat([seen, next_tokens[:, None]], dim=1)  # (rows, prompt ids + steps so far)
            new_tokens.append(next_tokens)
            if streamer is not None:
                streamer.put(next_tokens.cpu())
            done |= torch.isin(next_tokens, eos_ids)
            if criteria:
                done |= criteria(seen, scores)
            if bool(done.all()) or step == max_new - 1:
                break
            mask = torch.cat([mask, mask.new_ones(mask.shape[0], 1)], dim=1)  # (rows, spliced + steps)
            positions = positions[:, -1:] + 1  # (rows, 1)
            out = self.language_model(
                inputs_embeds=self.get_input_embeddings()(next_tokens[:, None]), attention_mask=mask,
                position_ids=positions, use_cache=True, **cache_kwargs,
            )
            logits = out.logits[:, -1, :].float()
        return GenerateDecoderOnlyOutput(
            sequences=torch.stack(new_tokens, dim=1),
            scores=tuple(all_scores) if gen.output_scores else None,
            logits=tuple(all_logits) if gen.output_logits else None,
        )

    def _beam_search(
        self,
        spliced: dict[str, torch.Tensor],
        seen: torch.LongTensor,
        gen: GenerationConfig,
        processors: LogitsProcessorList,
        criteria: StoppingCriteriaList,
        max_new: int,
        eos: list[int],
        pad: int,
    ) -> GenerateBeamDecoderOnlyOutput:
        """Beam search by the LM's own ``generate()`` over the spliced embeddings; ``sequences`` are the new ids.

        transformers' beam search (the candidate pool, finished hypotheses, length penalty, the
        early-stopping rules, reordering the cache with ``Cache.reorder_cache``) is long and subtle:
        a second copy here could drift from it, so the LM runs it. It is given ``seen`` as
        ``input_ids`` (what its processors and criteria read) and the spliced embeddings for the
        prompt; our processors and criteria; and a configuration holding only the search settings,
        so that neither the LM's own generation config nor transformers' defaults add anything.
        """
        lm = self.language_model.get_base_model() if self.has_adapter else self.language_model
        search = GenerationConfig(
            num_beams=gen.num_beams, num_return_sequences=gen.num_return_sequences, do_sample=bool(gen.do_sample),
            length_penalty=gen.length_penalty, early_stopping=gen.early_stopping, top_k=0 if gen.do_sample else None,
            max_new_tokens=max_new, eos_token_id=eos or None, pad_token_id=pad,
            return_dict_in_generate=True, output_scores=gen.output_scores, output_logits=gen.output_logits,
        )
        own, lm.generation_config = lm.generation_config, GenerationConfig()
        try:
            out = lm.generate(
                input_ids=seen, inputs_embeds=spliced["inputs_embeds"], attention_mask=spliced["attention_mask"],
                generation_config=search, logits_processor=processors, stopping_criteria=criteria,
            )
        finally:
            lm.generation_config = own
        return GenerateBeamDecoderOnlyOutput(
            sequences=out.sequences[:, seen.shape[1]:],
            sequences_scores=out.sequences_scores,
            scores=out.scores,
            logits=out.logits,
            beam_indices=out.beam_indices,
        )

    @staticmethod
    def _merge_row_groups(
        parts: list[GenerateDecoderOnlyOutput | GenerateBeamDecoderOnlyOutput],
        groups: list[list[int]],
        batch: int,
        pad: int,
        num_beams: int,
    ) -> GenerateDecoderOnlyOutput | GenerateBeamDecoderOnlyOutput:
        """The outputs of row groups as one, rows back in the batch's order (``groups[g]``: the rows of ``parts[g]``).

        New ids are right-padded with ``pad``; a group's per-step ``scores`` / ``logits`` after it
        stopped are -inf; ``beam_indices`` are renumbered to the whole batch's beams (-1 past the end).
        """

        def place(tensors: list[torch.Tensor], fill: float) -> torch.Tensor:
            """Rows of each group's tensor (the same number per batch row) at their batch rows, right-padded."""
            per_row = tensors[0].shape[0] // len(groups[0])
            out = tensors[0].new_full((batch * per_row, max(t.shape[1] for t in tensors)), fill)
            for rows, tensor in zip(groups, tensors):
                index = torch.tensor(rows, device=out.device)[:, None] * per_row
                out[(index + torch.arange(per_row, device=out.device)).flatten(), : tensor.shape[1]] = tensor
            return out

        merged = {"sequences": place([p.sequences for p in parts], pad)}
        for name in ("scores", "logits"):
            steps = [getattr(p, name) for p in parts]
            if steps[0] is not None:
                longest = max(len(s) for s in steps)
                past_end = [torch.full_like(s[0], float("-inf")) for s in steps]
                merged[name] = tuple(
                    place([s[i] if i < len(s) else end for s, end in zip(steps, past_end)], float("-inf"))
                    for i in range(longest)
                )
        if isinstance(parts[0], GenerateBeamDecoderOnlyOutput):
            if parts[0].sequences_scores is not None:
                merged["sequences_scores"] = place([p.sequences_scores[:, None] for p in parts], 0.0)[:, 0]
            renumbered = []
            for rows, part in zip(groups, parts):
                index, rows = part.beam_indices.long(), torch.tensor(rows, device=part.beam_indices.device)
                batch_beam = rows[index.clamp(min=0) // num_beams] * num_beams + index % num_beams
                renumbered.append(torch.where(index >= 0, batch_beam, -1))
            merged["beam_indices"] = place(renumbered, -1)
        return type(parts[0])(**merged)

    # ---- loading and saving -------------------------------------------------------------------

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: str | Path, *model_args: Any, config=None, **kwargs: Any):
        """Load the base LM and tower by name, then the projector (strictly) and the LoRA adapter.

        Takes every keyword transformers' own ``PreTrainedModel.from_pretrained`` takes, sorted by
        ``_sort_load_arguments``: download arguments (``cache_dir``, ``token``, ``proxies``,
        ``local_files_only``, ``force_download``) reach every file PhiClip fetches (this repository,
        the base LM and the tower); ``revision`` and ``subfolder`` locate this repository only; model
        arguments (``dtype`` or ``torch_dtype``, ``device_map``, ``attn_implementation``,
        ``quantization_config`` for a 4-bit NF4 base, ``max_memory``…) are honoured through the base
        LM's own ``from_pretrained``; a config attribute overrides the saved config.
        ``merge_adapter=True`` merges the LoRA weights into the LM; ``load_adapter=False`` skips them.

        Raises:
            TypeError: a setting that would change the model and that PhiClip cannot honour
                (``gguf_file``, ``state_dict``, ``variant``…), named.
        """
        if model_args:
            raise TypeError(f"{cls.__name__}.from_pretrained takes no extra positional arguments")
        repo, hub, lm_kwargs, own = _sort_load_arguments(cls.__name__, kwargs)
        folder = Path(pretrained_model_name_or_path)
        if not folder.is_dir():
            folder = Path(snapshot_download(str(pretrained_model_name_or_path), revision=repo.get("revision"),
                                            **hub))
        folder = folder / repo.get("subfolder", "")
        if config is None:
            config = PhiClipConfig.from_pretrained(folder)
        for key in [k for k in lm_kwargs if hasattr(config, k) and k not in LM_LOAD_ARGUMENTS]:
            setattr(config, key, lm_kwargs.pop(key))
        lm_kwargs.setdefault("attn_implementation", getattr(config, "_attn_implementation_internal", None))
        lm_kwargs = {k: v for k, v in lm_kwargs.items() if v is not None}
        lm_kwargs.setdefault("dtype", "auto")

        language_model = AutoModelForCausalLM.from_pretrained(
            config.text_model, revision=config.text_revision, **hub, **lm_kwargs
        )
        device = language_model.get_input_embeddings().weight.device
        param_dtype = language_model.get_input_embeddings().weight.dtype
        if not param_dtype.is_floating_point:
            param_dtype = torch.float32
        if config.vision_weights:
            tower = vision_tower_class(config)(config.vision_config)
        else:
            tower = load_vision_tower(config, config.vision_model, revision=config.vision_revision, **hub)
        model = cls(config, language_model=language_model, vision_tower=tower)
        model.vision_tower.to(device=device, dtype=param_dtype)
        model.projector.to(device=device, dtype=param_dtype)
        model.load_strict(model.projector, folder / PROJECTOR_FILE, "projector")
        if config.vision_weights:
            model.load_strict(model.vision_tower, folder / config.vision_weights, "vision tower")
        load_adapter, merge_adapter = own.get("load_adapter", True), own.get("merge_adapter", False)
        if config.adapter_subfolder and load_adapter:
            if PeftModel is None:
                raise ImportError(f"{folder} has a LoRA adapter: loading it needs peft (pip install peft)")
            model.language_model = PeftModel.from_pretrained(language_model, str(folder / config.adapter_subfolder))
            if merge_adapter:
                model.language_model = model.language_model.merge_and_unload()
        if not load_adapter or merge_adapter:
            model.config.adapter_subfolder = None
        if own.get("generation_config") is not None:
            model.generation_config = own["generation_config"]
        elif (folder / "generation_config.json").is_file():
            model.generation_config = GenerationConfig.from_pretrained(folder)
        model.name_or_path = str(pretrained_model_name_or_path)
        return model.eval()

    @staticmethod
    def load_strict(module: nn.Module, path: Path, what: str) -> None:
        """Every tensor present, none extra, each of the right shape: a mismatch names the file."""
        if not path.is_file():
            raise FileNotFoundError(f"{what} weights missing: {path}")
        state = _match_prefix(load_file(str(path)), module.state_dict().keys())
        param = next(module.parameters())
        try:
            module.load_state_dict({k: v.to(param.device, param.dtype) for k, v in state.items()}, strict=True)
        except RuntimeError as err:
            raise ValueError(f"{path}: {what} weights do not match the model: {err}") from err

    def save_pretrained(
        self,
        save_directory: str | Path,
        *,
        processor: Any | None = None,
        model_card: str | None = None,
        is_main_process: bool = True,
        **kwargs: Any,
    ) -> None:
        """Write config, code, generation config, ``projector.safetensors``, ``adapter/`` and a model card.

        The base LM and the tower are referenced by name, never written (a trained tower is,
        as ``vision_tower.safetensors``). With ``processor`` its files are written too.
        """
        if not is_main_process:
            return
        out = Path(save_directory)
        out.mkdir(parents=True, exist_ok=True)
        config = copy.deepcopy(self.config)
        config.auto_map = dict(AUTO_MAP)
        config.architectures = [type(self).__name__]
        config.adapter_subfolder = ADAPTER_DIR if self.has_adapter else None
        config.save_pretrained(out)
        self.generation_config.save_pretrained(out)
        save_file(_cpu_state(self.projector), str(out / PROJECTOR_FILE), metadata={"format": "pt"})
        if config.vision_weights:
            save_file(_cpu_state(self.vision_tower), str(out / config.vision_weights), metadata={"format": "pt"})
        if self.has_adapter:
            self.language_model.save_pretrained(str(out / ADAPTER_DIR))
        here = Path(__file__).parent
        for name in CODE_FILES:
            if (here / name).is_file() and (here / name).resolve() != (out / name).resolve():
                shutil.copyfile(here / name, out / name)
        if processor is not None:
            processor.save_pretrained(out)
        if model_card is not None:
            (out / "README.md").write_text(model_card, encoding="utf-8")
        elif not (out / "README.md").is_file():
            (out / "README.md").write_text(_minimal_card(config), encoding="utf-8")

    def push_to_hub(
        self,
        repo_id: str,
        *,
        processor: Any | None = None,
        model_card: str | None = None,
        commit_message: str = "Upload PhiClip (projector + LoRA adapter)",
        private: bool | None = None,
        token: str | None = None,
        revision: str | None = None,
        extra_files: dict[str, str | Path] | None = None,
        **kwargs: Any,
    ):
        """Save into a temporary folder (plus ``extra_files``: repo path -> local file) and upload it as one commit.

        Returns the commit info (``.oid`` is the commit sha to pin with ``revision=``).
        """
        import tempfile

        api = HfApi(token=token)
        api.create_repo(repo_id, private=private, exist_ok=True)
        with tempfile.TemporaryDirectory() as tmp:
            self.save_pretrained(tmp, processor=processor, model_card=model_card)
            for name, path in (extra_files or {}).items():
                (Path(tmp) / name).parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(path, Path(tmp) / name)
            return api.upload_folder(
                repo_id=repo_id, folder_path=tmp, commit_message=commit_message, revision=revision
            )


def _sort_load_arguments(
    owner: str, kwargs: dict[str, Any]
) -> tuple[dict[str, Any], dict[str, Any], dict[str, Any], dict[str, Any]]:
    """Split ``from_pretrained`` keywords into (repository, download, base-LM, PhiClip's own) arguments.

    Download arguments left at their defaults (``None``) are dropped; ``torch_dtype`` is the legacy
    name of ``dtype``. Everything not named above goes to the base LM's ``from_pretrained`` (or onto
    the config, when it names a config attribute), where this transformers release knows what it means.

    Raises:
        TypeError: an argument of ``REFUSED_ARGUMENTS`` set to anything but its default.
    """
    repo, hub, lm, own = {}, {}, {}, {}
    for key, value in kwargs.items():
        if key in REFUSED_ARGUMENTS:
            if value not in (None, False, "", {}):
                raise TypeError(f"{owner}.from_pretrained: '{key}' is not supported: {REFUSED_ARGUMENTS[key]}")
        elif key in REPO_ARGUMENTS:
            if value:
                repo[key] = value
        elif key in HUB_ARGUMENTS:
            if value is not None:
                hub[key] = value
        elif key in OWN_ARGUMENTS:
            own[key] = value
        elif key == "torch_dtype":
            lm.setdefault("dtype", value)
        elif key == "dtype":
            if value is not None:
                lm["dtype"] = value
        elif key not in CALLER_ARGUMENTS and not key.startswith("_"):
            lm[key] = value
    return repo, hub, lm, own


def _cpu_state(module: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().contiguous().cpu() for k, v in module.state_dict().items()}


def _match_prefix(state: dict[str, torch.Tensor], expected) -> dict[str, torch.Tensor]:
    """Tower weights with or without the ``vision_model.`` level that transformers 4.x keeps and 5.x drops."""
    expected, prefix = set(expected), "vision_model."
    if set(state) == expected:
        return state
    if all(k.startswith(prefix) for k in state) and not any(k.startswith(prefix) for k in expected):
        return {k[len(prefix):]: v for k, v in state.items()}
    if not any(k.startswith(prefix) for k in state) and all(k.startswith(prefix) for k in expected):
        return {prefix + k: v for k, v in state.items()}
    return state


def _minimal_card(config: PhiClipConfig) -> str:
    return (
        "---\n"
        "library_name: transformers\n"
        "pipeline_tag: image-text-to-text\n"
        "tags:\n- phiclip\n- custom_code\n"
        f"base_model:\n- {config.text_model}\n- {config.vision_model}\n"
        "---\n\n"
        "# PhiClip\n\n"
        "```python\n"
        "from transformers import AutoModelForCausalLM, AutoProcessor\n"
        "model = AutoModelForCausalLM.from_pretrained(REPO, trust_remote_code=True)\n"
        "processor = AutoProcessor.from_pretrained(REPO, trust_remote_code=True)\n"
        "```\n"
    )
