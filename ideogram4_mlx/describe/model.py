"""Describe: image -> text with the checkpoint's whole Qwen3-VL (MODEL_NOTES#vision-tower).

``text_encoder/model.safetensors`` holds all of ``Qwen3VLModel``: the vision tower
(``visual.*``) and the language model (``language_model.*``); the prompt-enhancer ``lm_head``
(the magic prompt's, ``magic.model.resolve_head``) turns its hidden states into tokens.
The modules are mlx-vlm's (``mlx_vlm.models.qwen3_vl``: ``VisionModel`` and the text
``Qwen3VLModel`` with interleaved MRoPE and DeepStack), filled by our loader, so their
parameter names equal the checkpoint keys. mlx-vlm is the optional ``describe`` extra; only
this module imports it.

Memory: the language model is loaded on its own (not shared with a loaded text encoder):
16.4 GB in bf16 (less quantized), plus the vision tower (0.58 B params, 1.2 GB in bf16, kept
float by ``convert``) and the head (1.2 GB).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from mlx_lm.sample_utils import make_sampler
from mlx_lm.tokenizer_utils import TokenizerWrapper
from mlx_vlm.models.cache import KVCache
from mlx_vlm.models.qwen3_vl.config import TextConfig as VLMTextConfig
from mlx_vlm.models.qwen3_vl.config import VisionConfig as VLMVisionConfig
from mlx_vlm.models.qwen3_vl.language import Qwen3VLModel
from mlx_vlm.models.qwen3_vl.vision import VisionModel
from PIL import Image

from ideogram4_mlx.config import CheckpointError, read_json
from ideogram4_mlx.describe.vision import (
    MAX_PIXELS,
    VISION_DTYPE_RULE,
    VISION_PREFIX,
    VISION_PREFIXES,
    VisionConfig,
    prepare_image,
    sanitize_visual,
)
from ideogram4_mlx.errors import InputError
from ideogram4_mlx.magic.constrain import hf_tokenizer
from ideogram4_mlx.magic.model import (
    check_final_norm,
    load_head,
    magic_tokenizer,
    model_args,
    resolve_head,
)
from ideogram4_mlx.magic.options import MAX_TOKENS_LIMIT
from ideogram4_mlx.prompt import render_chat
from ideogram4_mlx.text_encoder import (
    LM_PREFIXES,
    UNUSED_PREFIXES,
    Qwen3VLTextEncoder,
    TextEncoderConfig,
)
from ideogram4_mlx.weights import (
    SAFETENSORS_DTYPES,
    DtypeRule,
    check_raw_dtypes,
    checked_config,
    component_files,
    conversion_record,
    dequantize_fp8_weights,
    load_component,
    load_strict,
    read_component,
    strip_prefixes,
    tensor_headers,
)

IMAGE_PAD = "<|image_pad|>"
VISION_START = "<|vision_start|>"
VISION_END = "<|vision_end|>"


@dataclass(frozen=True)
class TokenIds:
    """The chat's special tokens, from ``text_encoder/config.json`` (Qwen3-VL's ids)."""

    image: int
    vision_start: int
    vision_end: int


class VisionTower(VisionModel):
    """mlx-vlm's Qwen3-VL ``VisionModel`` read from ``text_encoder/``'s ``visual.*`` keys."""

    def sanitize(self, weights: dict[str, mx.array]) -> dict[str, mx.array]:
        """Checkpoint tensors -> parameters (pure, idempotent): ``visual.*`` only, prefix
        stripped, fp8 dequantized, the patch kernel in MLX layout."""
        visual = sanitize_visual(weights, self.config.in_channels)
        return {k[len(VISION_PREFIX) :]: v for k, v in visual.items()}


class LanguageBody(Qwen3VLModel):
    """mlx-vlm's Qwen3-VL text model (MRoPE, DeepStack) read from ``language_model.*``."""

    dtype_rule: ClassVar[DtypeRule] = Qwen3VLTextEncoder.dtype_rule

    def sanitize(self, weights: dict[str, mx.array]) -> dict[str, mx.array]:
        """As ``magic.model.TextBody.sanitize``: the vision tower and any head dropped, the
        prefix stripped, the final norm kept, fp8 dequantized."""
        kept = {k: v for k, v in weights.items() if not k.startswith(UNUSED_PREFIXES)}
        return dequantize_fp8_weights(strip_prefixes(kept, LM_PREFIXES))


def vlm_text_config(config: TextEncoderConfig, mrope_section: list[int]) -> VLMTextConfig:
    args = model_args(config)
    return VLMTextConfig(
        model_type="qwen3_vl",
        num_hidden_layers=args.num_hidden_layers,
        hidden_size=args.hidden_size,
        intermediate_size=args.intermediate_size,
        num_attention_heads=args.num_attention_heads,
        rms_norm_eps=args.rms_norm_eps,
        vocab_size=args.vocab_size,
        num_key_value_heads=args.num_key_value_heads,
        head_dim=args.head_dim,
        rope_theta=args.rope_theta,
        max_position_embeddings=args.max_position_embeddings,
        rope_scaling={"type": "default", "mrope_section": list(mrope_section)},
    )


def vlm_vision_config(config: VisionConfig) -> VLMVisionConfig:
    return VLMVisionConfig(
        model_type="qwen3_vl",
        depth=config.depth,
        hidden_size=config.hidden_size,
        intermediate_size=config.intermediate_size,
        out_hidden_size=config.out_hidden_size,
        num_heads=config.num_heads,
        patch_size=config.patch_size,
        in_channels=config.in_channels,
        spatial_merge_size=config.spatial_merge_size,
        temporal_patch_size=config.temporal_patch_size,
        num_position_embeddings=config.num_position_embeddings,
        deepstack_visual_indexes=list(config.deepstack_visual_indexes),
    )


def mrope_positions(ids: list[int], image_id: int, grid: tuple[int, int, int], merge: int):
    """Qwen3-VL's ``get_rope_index`` for one image: ``(positions (3, T) int, delta)``.

    Text before the image counts 0..s-1 on all three axes; the image's tokens get
    ``s + (t, row, col)`` of the merged grid; text after continues from the largest position
    + 1. Token i >= T of the reply is at ``i + delta`` on every axis.
    """
    t, h, w = grid[0], grid[1] // merge, grid[2] // merge
    where = [i for i, token in enumerate(ids) if token == image_id]
    start, n = (where[0], len(where)) if where else (len(ids), 0)
    if n != t * h * w or where != list(range(start, start + n)):
        raise InputError(f"the prompt has {n} image tokens, the image needs {t * h * w} in a row")
    before = np.broadcast_to(np.arange(start), (3, start))
    grid_ids = np.stack(
        [
            a.reshape(-1)
            for a in np.meshgrid(np.arange(t), np.arange(h), np.arange(w), indexing="ij")
        ]
    )
    image = grid_ids + start
    rest = len(ids) - start - n
    after_start = (image.max() + 1) if n else start
    after = np.broadcast_to(np.arange(rest) + after_start, (3, rest))
    positions = np.concatenate([before, image, after], axis=1)
    return positions, int(positions.max()) + 1 - len(ids)


class DescribeModel:
    """Qwen3-VL (vision tower + language model, the checkpoint's text_encoder) and the
    prompt-enhancer lm_head, for image -> text.

    ``tokenizer`` is the checkpoint's tokenizer as an mlx-lm ``TokenizerWrapper`` (streaming
    detokenizer; end tokens ``<|im_end|>`` and ``<|endoftext|>``), as the magic prompt has it.
    """

    def __init__(
        self,
        vision: VisionTower,
        body: LanguageBody,
        lm_head: nn.Linear,
        tokenizer: TokenizerWrapper,
        ids: TokenIds,
        vision_config: VisionConfig,
    ):
        self.vision, self.body, self.lm_head = vision, body, lm_head
        self.tokenizer, self.ids, self.vision_config = tokenizer, ids, vision_config

    @property
    def dtype(self) -> mx.Dtype:
        return self.body.embed_tokens.weight.dtype

    def image_features(
        self, patches: mx.array, grid: tuple[int, int, int]
    ) -> tuple[mx.array, list[mx.array]]:
        """The vision tower on ``prepare_image``'s output: ``(features (N, D), deepstack)``,
        N = t*h*w/4 image tokens, one (N, D) per ``deepstack_visual_indexes`` entry."""
        features, deepstack = self.vision(patches.astype(self.dtype), mx.array([grid]))
        return features, deepstack

    def prompt_ids(self, system: str, user: str, grid: tuple[int, int, int]) -> list[int]:
        """The chat: a system turn, then the user turn with the image first, then the
        generation prompt (Qwen3-VL's template, image before text)."""
        merge = self.vision_config.spatial_merge_size
        n = grid[0] * (grid[1] // merge) * (grid[2] // merge)
        image = VISION_START + IMAGE_PAD * n + VISION_END
        messages = [{"role": "system", "content": system}] if system else []
        messages.append({"role": "user", "content": image + user})
        hf = hf_tokenizer(self.tokenizer)
        return hf.encode(render_chat(hf, messages), add_special_tokens=False)

    def forward(
        self,
        ids: list[int],
        features: mx.array,
        deepstack: list[mx.array],
        grid: tuple[int, int, int],
        cache: list | None = None,
    ) -> tuple[mx.array, int]:
        """The prompt's last hidden states (1, T, D) after the final norm, the image's
        features in place of its pad tokens and DeepStack added after the first layers;
        returns them with the position delta of the reply's tokens."""
        positions, delta = mrope_positions(
            ids, self.ids.image, grid, self.vision_config.spatial_merge_size
        )
        tokens = mx.array([ids])
        visual = np.array(ids)[None] == self.ids.image
        embeds = self.body.embed_tokens(tokens)
        where = mx.array(np.flatnonzero(visual[0]).astype(np.uint32))
        embeds[0, where] = features.astype(embeds.dtype)
        hidden = self.body(
            tokens,
            inputs_embeds=embeds,
            cache=cache,
            position_ids=mx.array(positions[:, None]),
            visual_pos_masks=visual,
            deepstack_visual_embeds=[d.astype(embeds.dtype) for d in deepstack],
        )
        return hidden, delta

    def tokens(
        self,
        image: Image.Image,
        system: str,
        user: str,
        *,
        max_tokens: int,
        temperature: float = 0.0,
        top_p: float = 1.0,
        seed: int | None = None,
        logits_processors: list | None = None,
        max_pixels: int = MAX_PIXELS,
    ) -> Iterator[int]:
        """The reply's token ids, one at a time, ``max_tokens`` of them unless the caller
        stops (end tokens are yielded like any other; arguments as :meth:`generate`)."""
        if not 1 <= max_tokens <= MAX_TOKENS_LIMIT:
            raise InputError(f"max_tokens {max_tokens} must be 1 to {MAX_TOKENS_LIMIT}")
        if not (temperature >= 0 and 0 < top_p <= 1):
            raise InputError(f"temperature {temperature} must be >= 0, top_p {top_p} in (0, 1]")
        patches, grid = prepare_image(image, max_pixels, config=self.vision_config)
        features, deepstack = self.image_features(patches, grid)
        ids = self.prompt_ids(system, user, grid)
        if seed is not None:
            mx.random.seed(seed)
        sampler = make_sampler(temp=temperature, top_p=top_p if top_p < 1.0 else 0.0)
        cache = [KVCache() for _ in self.body.layers]
        hidden, delta = self.forward(ids, features, deepstack, grid, cache)
        tokens = mx.array(ids)
        for _ in range(max_tokens):
            logits = self.lm_head(hidden[:, -1]).astype(mx.float32)
            for processor in logits_processors or []:
                logits = processor(tokens, logits)
            token = sampler(logits)
            tokens = mx.concatenate([tokens, token])
            yield int(token.item())
            # Every axis of a reply token is its index + delta (MODEL_NOTES#vision-tower).
            position = mx.full((3, 1, 1), tokens.size - 1 + delta, mx.int32)
            hidden = self.body(token[None], cache=cache, position_ids=position)

    def generate(
        self,
        image: Image.Image,
        system: str,
        user: str,
        *,
        max_tokens: int,
        temperature: float = 0.0,
        top_p: float = 1.0,
        seed: int | None = None,
        logits_processors: list | None = None,
        on_text: Callable[[str], None] | None = None,
        max_pixels: int = MAX_PIXELS,
    ) -> str:
        """Text about ``image``: a system turn (none when ``system`` is empty), then the user
        turn with the image before ``user``, then the generation prompt.

        Greedy at ``temperature`` 0, else sampled (``top_p`` < 1: nucleus), seeded by
        ``seed``. ``logits_processors`` are mlx-lm style ``(tokens, logits) -> logits``
        (tokens: the prompt's and those generated so far). ``on_text`` gets the text as it is
        decoded. Stops at ``<|im_end|>``/``<|endoftext|>`` (not in the result) or after
        ``max_tokens`` (1..``MAX_TOKENS_LIMIT``). The image is resized to at most
        ``max_pixels`` (``prepare_image``). Raises ``InputError`` for a bad setting or image.
        """
        detokenizer = self.tokenizer.detokenizer
        detokenizer.reset()
        stream = self.tokens(
            image,
            system,
            user,
            max_tokens=max_tokens,
            temperature=temperature,
            top_p=top_p,
            seed=seed,
            logits_processors=logits_processors,
            max_pixels=max_pixels,
        )
        for token in stream:
            if token in self.tokenizer.eos_token_ids:
                break
            detokenizer.add_token(token)
            emit(on_text, detokenizer.last_segment)  # reading last_segment consumes it
        detokenizer.finalize()
        emit(on_text, detokenizer.last_segment)
        return detokenizer.text


def emit(on_text: Callable[[str], None] | None, segment: str) -> None:
    if on_text is not None and segment:
        on_text(segment)


def check_vision_keys(text_dir: Path) -> None:
    """The text encoder's files hold a vision tower (a converted folder written before
    ``convert`` carried it does not)."""
    files = component_files(text_dir)
    if not any(k.startswith(VISION_PREFIXES) for k in tensor_headers(files)):
        raise CheckpointError(
            f"{files[0]}: the text encoder has no vision tower (no visual.* keys), which "
            "describe needs; use the original snapshot, or convert it again with this version"
        )


def load_vision(text_dir: Path, config: VisionConfig, dtype: mx.Dtype) -> VisionTower:
    """The vision tower from ``text_dir``: raw (fp8 linears) or converted (always float)."""
    check_vision_keys(text_dir)
    files = component_files(text_dir)
    record = conversion_record(text_dir)
    if record is None:
        check_raw_dtypes(files, VISION_DTYPE_RULE)
    else:
        expected = SAFETENSORS_DTYPES[record["dtype"]]
        for key, (found, _, path) in tensor_headers(files).items():
            if key.startswith(VISION_PREFIXES) and found != expected:
                raise CheckpointError(
                    f"{path}: {key} has dtype {found}, expected {expected} (the record's "
                    "dtype; convert keeps the vision tower float); convert the checkpoint again"
                )
    vision = VisionTower(vlm_vision_config(config))
    weights = read_component(text_dir, vision.sanitize, dtype)
    load_strict(vision, weights, f"{text_dir} (vision tower)")
    mx.eval(vision.parameters())
    return vision


def load_describe_model(
    checkpoint_dir: Path | str, dtype: mx.Dtype = mx.bfloat16, head_dir: Path | str | None = None
) -> DescribeModel:
    """The describe model of an Ideogram 4 checkpoint (raw fp8 snapshot or converted).

    ``head_dir``: the lm_head folder or hub repo id, as ``--magic-head`` (None: the
    checkpoint's ``prompt_enhancer_head/``, else the default repo). Raises
    ``CheckpointError`` naming the file when ``text_encoder/`` has no ``visual.*`` keys, and
    ``MissingHeadError`` when the head is neither local nor downloadable.
    """
    checkpoint_dir = Path(checkpoint_dir)
    text_dir = checkpoint_dir / "text_encoder"
    text = checked_config(TextEncoderConfig, text_dir)
    check_vision_keys(text_dir)
    raw = read_json(text_dir / "config.json")
    vision_config = VisionConfig.from_dict(raw)
    section = raw.get("text_config", {}).get("rope_parameters", {}).get("mrope_section")
    if not (isinstance(section, list) and sum(section) * 2 == text.head_dim):
        raise CheckpointError(
            f"{text_dir / 'config.json'}: rope_parameters.mrope_section {section!r} must be 3 "
            f"sizes summing to head_dim / 2 = {text.head_dim // 2}"
        )
    ids = TokenIds(
        image=raw.get("image_token_id", 151655),
        vision_start=raw.get("vision_start_token_id", 151652),
        vision_end=raw.get("vision_end_token_id", 151653),
    )
    lm_head = load_head(resolve_head(head_dir, checkpoint_dir), text, dtype)
    if conversion_record(text_dir) is not None:
        check_final_norm(text_dir)
    body = load_component(LanguageBody(vlm_text_config(text, section)), text_dir, dtype)
    vision = load_vision(text_dir, vision_config, dtype)
    tokenizer = magic_tokenizer(checkpoint_dir / "tokenizer")
    vocab = hf_tokenizer(tokenizer).get_vocab()
    for name, token in ((IMAGE_PAD, ids.image), (VISION_START, ids.vision_start)):
        if vocab.get(name) != token:
            raise CheckpointError(
                f"{text_dir / 'config.json'}: {name} is token {token} there but "
                f"{vocab.get(name)} in {checkpoint_dir / 'tokenizer'}; use the tokenizer the "
                "text encoder came with"
            )
    return DescribeModel(vision, body, lm_head, tokenizer, ids, vision_config)
