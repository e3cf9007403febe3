"""The magic-prompt LM: the checkpoint's own Qwen3-VL text body plus the prompt-enhancer head.

Text-only Qwen3-VL is Qwen3 with 1-D RoPE (MODEL_NOTES#text-encoder-forward), so the body
loads into mlx-lm's ``qwen3.Model`` and mlx-lm's ``generate``/``stream_generate``, KV cache,
samplers and logits processors run on it unchanged. The weights are the ``text_encoder/``
folder ``generate`` uses (fp8 snapshot or converted), read with our loader, *including* the
final ``language_model.norm`` that the feature taps skip. The ``lm_head`` comes from diffusers'
``Ideogram4PromptEnhancerHead`` repo (``DEFAULT_HEAD_REPO``), a bundled
``prompt_enhancer_head/`` folder or any local folder in that layout.

Memory: the real head is 151936 x 4096 bf16, 1.2 GB on top of the body (16.4 GB in bf16).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import ClassVar

import mlx.core as mx
import mlx.nn as nn
from huggingface_hub import snapshot_download
from huggingface_hub.errors import (
    GatedRepoError,
    HfHubHTTPError,
    HFValidationError,
    RepositoryNotFoundError,
)
from mlx.utils import tree_flatten
from mlx_lm import load as mlx_lm_load
from mlx_lm.models.qwen3 import Model, ModelArgs, Qwen3Model
from mlx_lm.tokenizer_utils import (
    BPEStreamingDetokenizer,
    NaiveStreamingDetokenizer,
    TokenizerWrapper,
)

from ideogram4_mlx.config import CheckpointError
from ideogram4_mlx.hub import is_network_error
from ideogram4_mlx.magic.head import HEAD_FOLDER, HeadConfig, PromptEnhancerHead
from ideogram4_mlx.prompt import load_tokenizer
from ideogram4_mlx.text_encoder import (
    LM_PREFIXES,
    UNUSED_PREFIXES,
    Qwen3VLTextEncoder,
    TextEncoderConfig,
)
from ideogram4_mlx.weights import (
    DtypeRule,
    checked_config,
    component_files,
    conversion_record,
    dequantize_fp8_weights,
    load_component,
    quantized_skeleton,
    read_component,
    strip_prefixes,
    tensor_headers,
)

DEFAULT_HEAD_REPO = "diffusers/qwen3-vl-8b-instruct-lm-head"
HEAD_PATTERNS = ["config.json", "*.safetensors", "*.safetensors.index.json"]
# Qwen3-VL-8B's max_position_embeddings (MODEL_NOTES#text-encoder-config); mlx-lm reads it
# only for scaled RoPE.
MAX_POSITIONS = 262144
# Chat turns end with <|im_end|>; <|endoftext|> ends a document (Qwen generation_config).
EOS_TOKENS = ("<|im_end|>", "<|endoftext|>")
FINAL_NORM = "norm.weight"


class MissingHeadError(CheckpointError):
    """The prompt-enhancer lm_head is neither local nor downloadable."""


def model_args(config: TextEncoderConfig) -> ModelArgs:
    """mlx-lm Qwen3 arguments for a Qwen3-VL text config: untied head, QK-norm, plain RoPE at
    the config's theta (5e6 for Qwen3-VL, not Qwen3's 1e6)."""
    return ModelArgs(
        model_type="qwen3",
        hidden_size=config.hidden_size,
        num_hidden_layers=config.num_hidden_layers,
        intermediate_size=config.intermediate_size,
        num_attention_heads=config.num_attention_heads,
        rms_norm_eps=config.rms_norm_eps,
        vocab_size=config.vocab_size,
        num_key_value_heads=config.num_key_value_heads,
        max_position_embeddings=MAX_POSITIONS,
        head_dim=config.head_dim,
        tie_word_embeddings=False,
        rope_theta=config.rope_theta,
    )


class TextBody(Qwen3Model):
    """mlx-lm's Qwen3 decoder stack, read from ``text_encoder/`` with our loader."""

    dtype_rule: ClassVar[DtypeRule] = Qwen3VLTextEncoder.dtype_rule

    def sanitize(self, weights: dict[str, mx.array]) -> dict[str, mx.array]:
        """Checkpoint tensors -> parameters, pure and idempotent: as the encoder's sanitize,
        but the final norm is kept (the LM applies it before the head)."""
        kept = {k: v for k, v in weights.items() if not k.startswith(UNUSED_PREFIXES)}
        return dequantize_fp8_weights(strip_prefixes(kept, LM_PREFIXES))


def missing_head_message(repo_id: str, reason: str) -> str:
    return (
        f"the magic-prompt lm_head {repo_id} is not available ({reason}). Fetch it once "
        f"with `hf download {repo_id}` while online, or pass a local copy with "
        "--magic-head FOLDER (a folder holding its config.json and safetensors file)"
    )


def resolve_head(head: str | Path | None, checkpoint_dir: Path | str) -> Path:
    """The head folder: ``head`` as a local folder or a hub repo id; None means the checkpoint's
    own ``prompt_enhancer_head/`` when it has one, else ``DEFAULT_HEAD_REPO``."""
    if head is None:
        bundled = Path(checkpoint_dir) / HEAD_FOLDER
        head = bundled if bundled.is_dir() else DEFAULT_HEAD_REPO
    path = Path(head).expanduser()
    if path.is_dir():
        return path
    name = str(head)
    if name.count("/") != 1 or name.startswith((".", "/", "~")):
        raise MissingHeadError(
            f"--magic-head {head}: no such folder, and not a Hugging Face repo id (owner/name); "
            f"pass the folder of a downloaded {DEFAULT_HEAD_REPO}"
        )
    try:
        return Path(snapshot_download(name, allow_patterns=HEAD_PATTERNS))
    except HFValidationError as e:  # a name the Hub refuses, checked before any request
        raise MissingHeadError(
            f"--magic-head {head}: no such folder, and not a valid repo id ({e})"
        ) from None
    except (GatedRepoError, RepositoryNotFoundError) as e:
        raise MissingHeadError(missing_head_message(name, "not found or not accessible")) from e
    except HfHubHTTPError as e:
        raise MissingHeadError(missing_head_message(name, f"download failed: {e}")) from e
    except Exception as e:
        if is_network_error(e):
            reason = "offline, and the Hugging Face cache holds no copy"
            raise MissingHeadError(missing_head_message(name, reason)) from e
        raise


def load_head(head_dir: Path | str, text: TextEncoderConfig, dtype: mx.Dtype) -> nn.Linear:
    """The head's ``lm_head`` (vocab, hidden), checked against the text encoder's sizes."""
    head_dir = Path(head_dir)
    config = checked_config(HeadConfig, head_dir)
    for field in ("vocab_size", "hidden_size"):
        if getattr(config, field) != getattr(text, field):
            raise CheckpointError(
                f"{head_dir / 'config.json'}: {field} is {getattr(config, field)}, but the "
                f"text encoder's is {getattr(text, field)}; the head must come from the same "
                f"model (for Ideogram 4: {DEFAULT_HEAD_REPO})"
            )
    return load_component(PromptEnhancerHead(config), head_dir, dtype).lm_head


def check_final_norm(component_dir: Path) -> None:
    """A converted folder written before the magic prompt existed lacks the final norm."""
    keys = strip_prefixes(tensor_headers(component_files(component_dir)), LM_PREFIXES)
    if FINAL_NORM not in keys:
        raise CheckpointError(
            f"{component_dir}: the text encoder has no final norm (language_model.{FINAL_NORM}), "
            "which the magic prompt applies before the lm_head; convert the checkpoint again "
            "with this version, or use the original snapshot"
        )


def load_body(component_dir: Path | str, dtype: mx.Dtype = mx.bfloat16) -> TextBody:
    """``text_encoder/`` (fp8 snapshot or converted, quantized from its record) as mlx-lm's
    Qwen3 decoder stack with the final norm."""
    component_dir = Path(component_dir)
    config = checked_config(TextEncoderConfig, component_dir)
    if conversion_record(component_dir) is not None:
        check_final_norm(component_dir)
    return load_component(TextBody(model_args(config)), component_dir, dtype)


def from_text_encoder(
    encoder: Qwen3VLTextEncoder, component_dir: Path | str, lm_head: nn.Linear
) -> Model:
    """The LM over an already loaded ``encoder``'s arrays (shared, not copied: expanding costs
    no second body); only the final norm is read from ``component_dir`` (its ``text_encoder/``).
    The encoder must hold its weights (not a ``--low-memory`` stream)."""
    component_dir = Path(component_dir)
    check_final_norm(component_dir)
    model = Model(model_args(encoder.config))
    quantized_skeleton(model.model, component_dir)
    sanitize = TextBody.sanitize.__get__(model.model)
    norm = read_component(component_dir, sanitize, encoder.dtype)[FINAL_NORM]
    shared = tree_flatten(encoder.parameters())
    model.model.load_weights([*shared, (FINAL_NORM, norm)], strict=True)
    model.lm_head = lm_head
    return model


def magic_tokenizer(tokenizer_dir: Path | str) -> TokenizerWrapper:
    """The checkpoint's tokenizer wrapped for mlx-lm: streaming detokenizer, both end tokens."""
    tokenizer_dir = Path(tokenizer_dir)
    tokenizer = load_tokenizer(tokenizer_dir)
    decoder = json.loads((tokenizer_dir / "tokenizer.json").read_text("utf-8")).get("decoder")
    byte_level = isinstance(decoder, dict) and decoder.get("type") == "ByteLevel"
    vocab = tokenizer.get_vocab()
    eos = [vocab[t] for t in EOS_TOKENS if t in vocab]
    detokenizer = BPEStreamingDetokenizer if byte_level else NaiveStreamingDetokenizer
    return TokenizerWrapper(tokenizer, detokenizer, eos_token_ids=eos)


def load_magic_model(
    checkpoint_dir: Path | str,
    head: str | Path | None = None,
    dtype: mx.Dtype = mx.bfloat16,
) -> tuple[Model, TokenizerWrapper]:
    """The magic-prompt causal LM and its tokenizer, ready for ``mlx_lm.stream_generate``.

    Args:
        checkpoint_dir: an Ideogram 4 checkpoint folder (its ``text_encoder/``, raw fp8 or
            converted, and ``tokenizer/``).
        head: the lm_head folder or hub repo id; None: the checkpoint's
            ``prompt_enhancer_head/``, else ``DEFAULT_HEAD_REPO`` (downloaded or cached).
        dtype: compute dtype of the float weights.

    Returns ``(model, tokenizer)``: ``model(ids (B, T))`` gives logits (B, T, vocab). The head
    adds vocab x hidden weights: 151936 x 4096 bf16 = 1.2 GB for the real model.
    """
    checkpoint_dir = Path(checkpoint_dir)
    text_dir = checkpoint_dir / "text_encoder"
    config = checked_config(TextEncoderConfig, text_dir)
    lm_head = load_head(resolve_head(head, checkpoint_dir), config, dtype)
    tokenizer = magic_tokenizer(checkpoint_dir / "tokenizer")
    model = Model(model_args(config))
    # The constructor's own (lazy, never evaluated) parameters are replaced, not copied.
    model.model = load_body(text_dir, dtype)
    model.lm_head = lm_head
    return model, tokenizer


def load_chat_model(model: str | Path) -> tuple[nn.Module, TokenizerWrapper]:
    """Any mlx-lm chat model (``--magic-model``): a local folder or a hub repo id that
    ``mlx_lm.load`` reads; anything else is one ``CheckpointError`` naming it."""
    path = Path(model).expanduser()
    name = str(model)
    if not path.exists() and (name.count("/") != 1 or name.startswith((".", "/", "~"))):
        raise CheckpointError(
            f"--magic-model {model}: no such folder, and not a Hugging Face repo id "
            "(owner/name) of an mlx-lm chat model"
        )
    try:
        loaded = mlx_lm_load(str(path) if path.exists() else name)
    except Exception as e:  # mlx-lm raises several types (missing files, hub, config)
        raise CheckpointError(
            f"--magic-model {model}: mlx-lm cannot load it ({type(e).__name__}: "
            f"{str(e).splitlines()[0] if str(e) else ''}); give an mlx-lm chat model "
            "(a folder with config.json, weights and tokenizer) or a repo id"
        ) from None
    return loaded[0], loaded[1]
