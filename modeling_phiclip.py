"""PhiClip: a causal chat LM that sees, through a CLIP/SigLIP tower and a Linear-GELU-Linear projector.

Layout, top to bottom:

1. ``PhiClipProjector``: vision features -> LM embeddings.
2. ``PhiClipForCausalLM``: image features, the splice (each ``<image>`` token in ``input_ids`` is
   replaced by that image's projected features, between the text before and after it), the
   forward, and ``generate()``: a manual loop over embeddings with a KV cache.
3. Loading and saving: the base LM and the tower are loaded by name; ``projector.safetensors``
   and the LoRA adapter (PEFT, in ``adapter/``) are the repository's own weights.

Text-only generation runs the base LM with the adapter switched off (``text_only_base_lm``),
so a LoRA trained on short visual answers does not change the LM's text replies.
"""

from __future__ import annotations

import contextlib
import copy
import inspect
import shutil
from pathlib import Path
from typing import Any

import torch
from torch import nn
from transformers import (
    AutoModelForCausalLM,
    CLIPVisionModel,
    CLIPVisionModelWithProjection,
    DynamicCache,
    GenerationConfig,
    GenerationMixin,
    LogitsProcessorList,
    MinNewTokensLengthLogitsProcessor,
    PreTrainedModel,
    RepetitionPenaltyLogitsProcessor,
    SiglipVisionModel,
    StoppingCriteriaList,
    StopStringCriteria,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)
from transformers.activations import ACT2FN
from transformers.generation.utils import GenerateDecoderOnlyOutput

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


def vision_tower_class(config: PhiClipConfig) -> type[PreTrainedModel]:
    kind = config.vision_config.model_type
    if kind.startswith("siglip"):
        if config.image_features == "pooled":
            raise ValueError("image_features 'pooled' needs a CLIP tower (CLIP's projected image embedding)")
        return SiglipVisionModel
    if kind.startswith("clip"):
        return CLIPVisionModelWithProjection if config.image_features == "pooled" else CLIPVisionModel
    raise ValueError(f"vision tower of model type '{kind}' is not CLIP or SigLIP")


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
        pixel_values = pixel_values.to(param.device, param.dtype)
        if self.config.image_features == "pooled":
            features = self.vision_tower(pixel_values=pixel_values).image_embeds[:, None, :]
        else:
            out = self.vision_tower(pixel_values=pixel_values, output_hidden_states=True)
            layers = self.config.vision_feature_layer
            layers = layers if isinstance(layers, list) else [layers]
            n = len(out.hidden_states)
            for layer in layers:
                if not -n <= layer < n:
                    raise ValueError(f"vision_feature_layer {layer}: the tower has hidden states 0..{n - 1}")
            features = torch.cat([out.hidden_states[layer] for layer in layers], dim=-1)
            if self.config.vision_feature_select_strategy == "default":
                features = features[:, 1:]
        return self.projector(features)

    @torch.no_grad()
    def image_token_count(self) -> int:
        """How many LM positions one image takes, measured by running the tower on a blank image."""
        size = self.config.vision_config.image_size
        param = next(self.vision_tower.parameters())
        blank = torch.zeros(1, 3, size, size, device=param.device, dtype=param.dtype)
        return self.get_image_features(blank).shape[1]

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
        batch, length = input_ids.shape
        device = input_ids.device
        token, token_id = self.config.image_token, self.config.image_token_id
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        keep = attention_mask.bool()
        is_image = (input_ids == token_id) & keep
        counts = is_image.sum(1).tolist()
        n_images = 0 if image_features is None else image_features.shape[0]
        if sum(counts) != n_images:
            rows = ", ".join(f"row {r}: {c}" for r, c in enumerate(counts))
            if image_features is None:
                raise ValueError(f"input_ids hold {sum(counts)} {token} token(s) ({rows}) but no pixel_values were given")
            if sum(counts) == 0:
                raise ValueError(f"pixel_values hold {n_images} image(s) but no row of input_ids has a {token} token")
            raise ValueError(f"input_ids hold {sum(counts)} {token} token(s) ({rows}) but pixel_values hold {n_images} image(s)")

        text = self.get_input_embeddings()(input_ids.masked_fill(input_ids == token_id, 0))
        hidden = text.shape[-1]
        per_image = 0 if image_features is None else image_features.shape[1]
        bank = [text.reshape(batch * length, hidden)]
        if image_features is not None:
            bank.append(image_features.reshape(-1, hidden).to(text.dtype))
        bank.append(text.new_zeros(1, hidden))
        bank = torch.cat(bank)
        pad_index = bank.shape[0] - 1

        rows, seen = [], 0
        for b in range(batch):
            pos = keep[b].nonzero().squeeze(1)
            img = is_image[b, pos]
            reps = torch.where(img, per_image, 1)
            index = torch.repeat_interleave(b * length + pos, reps)
            if img.any():
                expanded = torch.repeat_interleave(img, reps)
                offset = torch.arange(index.numel(), device=device) - torch.repeat_interleave(reps.cumsum(0) - reps, reps)
                ordinal = torch.repeat_interleave(img.long().cumsum(0) - 1, reps) + seen
                index = torch.where(expanded, batch * length + ordinal * per_image + offset, index)
                seen += int(img.sum())
            rows.append(index)

        longest = max(row.numel() for row in rows)
        index = torch.full((batch, longest), pad_index, dtype=torch.long, device=device)
        mask = torch.zeros((batch, longest), dtype=attention_mask.dtype, device=device)
        for b, row in enumerate(rows):
            span = slice(longest - row.numel(), longest) if padding_side == "left" else slice(0, row.numel())
            index[b, span] = row
            mask[b, span] = 1
        out = {
            "inputs_embeds": bank[index],
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

    def _cache_kwargs(self, cache: DynamicCache) -> dict[str, DynamicCache]:
        """transformers 5.24+ names the cache argument ``cache``; earlier releases ``past_key_values``."""
        lm = self.language_model.get_base_model() if self.has_adapter else self.language_model
        name = "cache" if "cache" in inspect.signature(lm.forward).parameters else "past_key_values"
        return {name: cache}

    def _logits_processors(self, gen: GenerationConfig, prompt_length: int, extra) -> LogitsProcessorList:
        processors = LogitsProcessorList()
        if gen.repetition_penalty is not None and gen.repetition_penalty != 1.0:
            processors.append(RepetitionPenaltyLogitsProcessor(gen.repetition_penalty))
        eos = gen.eos_token_id
        if gen.min_new_tokens and eos is not None:
            processors.append(MinNewTokensLengthLogitsProcessor(prompt_length, gen.min_new_tokens, eos))
        if gen.do_sample:
            if gen.temperature is not None and gen.temperature != 1.0:
                processors.append(TemperatureLogitsWarper(gen.temperature))
            if gen.top_k is not None and gen.top_k != 0:
                processors.append(TopKLogitsWarper(gen.top_k))
            if gen.top_p is not None and gen.top_p < 1.0:
                processors.append(TopPLogitsWarper(gen.top_p))
        processors.extend(extra or [])
        return processors

    @torch.no_grad()
    def generate(
        self,
        input_ids: torch.LongTensor,
        pixel_values: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        generation_config: GenerationConfig | None = None,
        logits_processor: LogitsProcessorList | None = None,
        stopping_criteria: StoppingCriteriaList | None = None,
        streamer: Any | None = None,
        tokenizer: Any | None = None,
        **kwargs: Any,
    ) -> torch.LongTensor | GenerateDecoderOnlyOutput:
        """Greedy or sampled generation; returns the prompt ids followed by the new ids (padded after EOS).

        The prompt is spliced and run once; then each new token goes through the LM with the
        KV cache. Rows of a left- or right-padded batch stop independently. Accepts a
        ``GenerationConfig`` and its fields as keywords (``max_new_tokens``, ``do_sample``,
        ``temperature``, ``top_p``, ``top_k``, ``repetition_penalty``, ``min_new_tokens``,
        ``eos_token_id`` (int or list), ``stop_strings`` (needs ``tokenizer=``),
        ``return_dict_in_generate``), plus logits processors, stopping criteria and a streamer.
        """
        gen = copy.deepcopy(generation_config if generation_config is not None else self.generation_config)
        kwargs.pop("use_cache", None)
        unused = gen.update(**kwargs)
        if unused:
            raise TypeError(f"generate() got unexpected arguments: {', '.join(sorted(unused))}")
        batch, prompt_length = input_ids.shape
        max_length = gen.max_length if gen.max_length is not None else 20  # transformers' default
        max_new = gen.max_new_tokens if gen.max_new_tokens is not None else max(max_length - prompt_length, 0)
        eos = gen.eos_token_id if gen.eos_token_id is not None else []
        eos = torch.tensor([eos] if isinstance(eos, int) else list(eos), device=input_ids.device, dtype=torch.long)
        pad = gen.pad_token_id if gen.pad_token_id is not None else (int(eos[0]) if eos.numel() else 0)
        processors = self._logits_processors(gen, prompt_length, logits_processor)
        criteria = StoppingCriteriaList(stopping_criteria or [])
        if gen.stop_strings:
            if tokenizer is None:
                raise ValueError("stop_strings needs the tokenizer: generate(..., tokenizer=processor.tokenizer)")
            criteria.append(StopStringCriteria(tokenizer, gen.stop_strings))

        text_only = pixel_values is None and not bool((input_ids == self.config.image_token_id).any())
        route = self.adapter_disabled() if text_only and self.config.text_only_base_lm else contextlib.nullcontext()
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        # Ids the logits processors see: the image marker may lie outside the LM's vocabulary.
        sequences = input_ids.masked_fill(input_ids == self.config.image_token_id, pad)
        done = torch.zeros(batch, dtype=torch.bool, device=input_ids.device)
        new_tokens: list[torch.Tensor] = []
        if streamer is not None:
            streamer.put(input_ids.cpu())
        with route:
            features = self.get_image_features(pixel_values) if pixel_values is not None else None
            spliced = self.splice(input_ids, features, attention_mask, padding_side="left")
            mask, positions = spliced["attention_mask"], spliced["position_ids"]
            cache_kwargs = self._cache_kwargs(DynamicCache())
            out = self.language_model(
                inputs_embeds=spliced["inputs_embeds"], attention_mask=mask, position_ids=positions,
                use_cache=True, logits_to_keep=1, **cache_kwargs,
            )
            for step in range(max_new):
                scores = processors(sequences, out.logits[:, -1, :].float())
                if gen.do_sample:
                    next_tokens = torch.multinomial(scores.softmax(-1), num_samples=1).squeeze(1)
                else:
                    next_tokens = scores.argmax(-1)
                next_tokens = torch.where(done, torch.full_like(next_tokens, pad), next_tokens)
                sequences = torch.cat([sequences, next_tokens[:, None]], dim=1)
                new_tokens.append(next_tokens)
                if streamer is not None:
                    streamer.put(next_tokens.cpu())
                done |= torch.isin(next_tokens, eos)
                if criteria:
                    done |= criteria(sequences, scores)
                if bool(done.all()) or step == max_new - 1:
                    break
                mask = torch.cat([mask, mask.new_ones(batch, 1)], dim=1)
                positions = positions[:, -1:] + 1
                out = self.language_model(
                    inputs_embeds=self.get_input_embeddings()(next_tokens[:, None]), attention_mask=mask,
                    position_ids=positions, use_cache=True, **cache_kwargs,
                )
        if streamer is not None:
            streamer.end()
        result = torch.cat([input_ids, *(t[:, None] for t in new_tokens)], dim=1)
        return GenerateDecoderOnlyOutput(sequences=result) if gen.return_dict_in_generate else result

    # ---- loading and saving -------------------------------------------------------------------

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: str | Path, *model_args: Any, config=None, **kwargs: Any):
        """Load the base LM and tower by name, then the projector (strictly) and the LoRA adapter.

        Honours ``dtype`` (or ``torch_dtype``), ``device_map``, ``attn_implementation`` and
        ``quantization_config`` (applied to the LM: a 4-bit NF4 base gives QLoRA inference).
        ``merge_adapter=True`` merges the LoRA weights into the LM; ``load_adapter=False`` skips them.
        """
        revision = kwargs.pop("revision", None)
        hub = {k: kwargs.pop(k) for k in ("cache_dir", "token", "local_files_only", "force_download") if k in kwargs}
        dtype = kwargs.pop("dtype", None) or kwargs.pop("torch_dtype", None)
        kwargs.pop("torch_dtype", None)
        device_map = kwargs.pop("device_map", None)
        quantization_config = kwargs.pop("quantization_config", None)
        attn_implementation = kwargs.pop("attn_implementation", None)
        merge_adapter = kwargs.pop("merge_adapter", False)
        load_adapter = kwargs.pop("load_adapter", True)
        for ignored in ("trust_remote_code", "_from_auto", "_from_pipeline", "adapter_kwargs", "code_revision",
                        "low_cpu_mem_usage", "use_safetensors", "_commit_hash"):
            kwargs.pop(ignored, None)
        if model_args:
            raise TypeError(f"{cls.__name__}.from_pretrained takes no extra positional arguments")

        folder = Path(pretrained_model_name_or_path)
        if not folder.is_dir():
            folder = Path(snapshot_download(str(pretrained_model_name_or_path), revision=revision, **hub))
        if config is None:
            config = PhiClipConfig.from_pretrained(folder)
        for key, value in kwargs.items():
            if not hasattr(config, key):
                raise TypeError(f"{cls.__name__}.from_pretrained got an unexpected argument '{key}'")
            setattr(config, key, value)
        attn_implementation = attn_implementation or getattr(config, "_attn_implementation_internal", None)

        lm_kwargs: dict[str, Any] = {"revision": config.text_revision, "dtype": dtype or "auto"}
        for key, value in (("device_map", device_map), ("quantization_config", quantization_config),
                           ("attn_implementation", attn_implementation)):
            if value is not None:
                lm_kwargs[key] = value
        language_model = AutoModelForCausalLM.from_pretrained(config.text_model, **lm_kwargs)
        device = language_model.get_input_embeddings().weight.device
        param_dtype = language_model.get_input_embeddings().weight.dtype
        if not param_dtype.is_floating_point:
            param_dtype = torch.float32
        tower_class = vision_tower_class(config)
        if config.vision_weights:
            tower = tower_class(config.vision_config)
        else:
            tower = tower_class.from_pretrained(config.vision_model, revision=config.vision_revision)
        model = cls(config, language_model=language_model, vision_tower=tower)
        model.vision_tower.to(device=device, dtype=param_dtype)
        model.projector.to(device=device, dtype=param_dtype)
        model.load_strict(model.projector, folder / PROJECTOR_FILE, "projector")
        if config.vision_weights:
            model.load_strict(model.vision_tower, folder / config.vision_weights, "vision tower")
        if config.adapter_subfolder and load_adapter:
            if PeftModel is None:
                raise ImportError(f"{folder} has a LoRA adapter: loading it needs peft (pip install peft)")
            model.language_model = PeftModel.from_pretrained(language_model, str(folder / config.adapter_subfolder))
            if merge_adapter:
                model.language_model = model.language_model.merge_and_unload()
        if not load_adapter or merge_adapter:
            model.config.adapter_subfolder = None
        if (folder / "generation_config.json").is_file():
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
