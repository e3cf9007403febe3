"""The config.json texts of a synthetic checkpoint, key for key as the real snapshot has them.

diffusers saves sorted keys, indent 2 and a trailing newline; the text encoder's config keeps
transformers' own key order plus one key added after the save.
"""

import json

from ideogram4_mlx.constants import PACKED_CHANNELS, VAE_CHANNELS
from ideogram4_mlx.synth.plan import SyntheticSpec

# Versions the real snapshot's configs record (MODEL_NOTES#checkpoint-layout, #text-encoder-config);
# fixed so output is reproducible.
DIFFUSERS_VERSION = "0.42.1"
TRANSFORMERS_VERSION = "5.8.0"


def diffusers_json(config: dict) -> str:
    return json.dumps(config, indent=2, sort_keys=True) + "\n"


def model_index() -> dict:
    dit = ["diffusers", "Ideogram4Transformer2DModel"]
    return {
        "_class_name": "Ideogram4Pipeline",
        "_diffusers_version": DIFFUSERS_VERSION,
        "scheduler": ["diffusers", "FlowMatchEulerDiscreteScheduler"],
        "text_encoder": ["transformers", "Qwen3VLModel"],
        "tokenizer": ["transformers", "Qwen2Tokenizer"],  # [?] a transformers 4.x save says ...Fast
        "transformer": dit,
        "unconditional_transformer": dit,
        "vae": ["diffusers", "AutoencoderKLFlux2"],
    }


def scheduler_config() -> dict:
    # Real contents are [?] (MODEL_NOTES#checkpoint-layout): diffusers defaults, no shifting, as
    # the Ideogram pipeline assumes (it divides by num_train_timesteps and passes its own sigmas).
    return {
        "_class_name": "FlowMatchEulerDiscreteScheduler",
        "_diffusers_version": DIFFUSERS_VERSION,
        "base_image_seq_len": 256,
        "base_shift": 0.5,
        "invert_sigmas": False,
        "max_image_seq_len": 4096,
        "max_shift": 1.15,
        "num_train_timesteps": 1000,
        "shift": 1.0,
        "shift_terminal": None,
        "stochastic_sampling": False,
        "time_shift_type": "exponential",
        "use_beta_sigmas": False,
        "use_dynamic_shifting": False,
        "use_exponential_sigmas": False,
        "use_karras_sigmas": False,
    }


def dit_config(spec: SyntheticSpec) -> dict:
    return {
        "_class_name": "Ideogram4Transformer2DModel",
        "_diffusers_version": DIFFUSERS_VERSION,
        "adaln_dim": spec.dit_adaln_dim,
        "attention_head_dim": spec.dit_attention_head_dim,
        "in_channels": PACKED_CHANNELS,
        "intermediate_size": spec.dit_intermediate_size,
        "llm_features_dim": spec.llm_features_dim,
        "mrope_section": dit_mrope_section(spec.dit_attention_head_dim),
        "norm_eps": 1e-05,
        "num_attention_heads": spec.dit_num_attention_heads,
        "num_layers": spec.dit_num_layers,
        "rope_theta": 5000000,
    }


def dit_mrope_section(head_dim: int) -> list[int]:
    """(t, h, w) sections: the real [24, 20, 20] whenever the 60 interleaved h/w slots fit
    (head_dim >= 120), else scaled down (floor) so slots 1, 4, ... and 2, 5, ... still exist."""
    if head_dim >= 120:
        return [24, 20, 20]
    return [24 * head_dim // 256, 20 * head_dim // 256, 20 * head_dim // 256]


def text_mrope_section(head_dim: int) -> list[int]:
    """Qwen3-VL sections must sum to head_dim/2: the real [24, 20, 20] at head_dim 128; h and w
    are scaled down (floor) and t takes the rest, which keeps the 3-axis interleave valid."""
    hw = 20 * head_dim // 128
    return [head_dim // 2 - 2 * hw, hw, hw]


def vae_config(spec: SyntheticSpec) -> dict:
    return {
        "_class_name": "AutoencoderKLFlux2",
        "_diffusers_version": DIFFUSERS_VERSION,
        "act_fn": "silu",
        "batch_norm_eps": 0.0001,
        "batch_norm_momentum": 0.1,
        "block_out_channels": list(spec.vae_block_out_channels),
        "decoder_block_out_channels": None,
        "down_block_types": ["DownEncoderBlock2D"] * 4,
        "in_channels": 3,
        "latent_channels": VAE_CHANNELS,
        "layers_per_block": spec.vae_layers_per_block,
        "mid_block_add_attention": True,
        "norm_num_groups": spec.vae_norm_num_groups,
        "out_channels": 3,
        "patch_size": [2, 2],
        "sample_size": 1024,
        "up_block_types": ["UpDecoderBlock2D"] * 4,
        "use_post_quant_conv": True,
        "use_quant_conv": True,
    }


def prompt_enhancer_head_config(spec: SyntheticSpec, vocab_size: int) -> dict:
    """What diffusers' ``save_pretrained`` writes for ``Ideogram4PromptEnhancerHead``."""
    return {
        "_class_name": "Ideogram4PromptEnhancerHead",
        "_diffusers_version": DIFFUSERS_VERSION,
        "hidden_size": spec.text_hidden_size,
        "vocab_size": vocab_size,
    }


def text_encoder_json(spec: SyntheticSpec, vocab_size: int, ids: dict[str, int]) -> str:
    """Qwen3VLConfig as transformers saves it; `ids` are the tokenizer's special-token ids."""
    text = {
        "attention_bias": False,
        "attention_dropout": 0.0,
        "bos_token_id": ids["<|endoftext|>"],
        "dtype": "bfloat16",
        "eos_token_id": ids["<|im_end|>"],
        "head_dim": spec.text_head_dim,
        "hidden_act": "silu",
        "hidden_size": spec.text_hidden_size,
        "initializer_range": 0.02,
        "intermediate_size": spec.text_intermediate_size,
        "max_position_embeddings": 262144,
        "model_type": "qwen3_vl_text",
        "num_attention_heads": spec.text_num_attention_heads,
        "num_hidden_layers": spec.text_num_layers,
        "num_key_value_heads": spec.text_num_key_value_heads,
        "pad_token_id": None,
        "rms_norm_eps": 1e-06,
        "rope_parameters": {
            "mrope_interleaved": True,
            "mrope_section": text_mrope_section(spec.text_head_dim),
            "rope_theta": 5000000,
            "rope_type": "default",
        },
        "use_cache": True,
        "vocab_size": vocab_size,
    }
    vision = {
        "deepstack_visual_indexes": list(spec.vision_deepstack_visual_indexes),
        "depth": spec.vision_depth,
        "dtype": "bfloat16",
        "hidden_act": "gelu_pytorch_tanh",
        "hidden_size": spec.vision_hidden_size,
        "in_channels": 3,
        "initializer_range": 0.02,
        "intermediate_size": spec.vision_intermediate_size,
        "model_type": "qwen3_vl_vision",
        "num_heads": spec.vision_num_heads,
        "num_position_embeddings": spec.vision_num_position_embeddings,
        "out_hidden_size": spec.text_hidden_size,
        "patch_size": 16,
        "spatial_merge_size": 2,
        "temporal_patch_size": 2,
    }
    config = {
        "architectures": ["Qwen3VLModel"],
        "dtype": "bfloat16",
        "image_token_id": ids["<|image_pad|>"],
        "model_type": "qwen3_vl",
        "text_config": text,
        "tie_word_embeddings": False,
        "transformers_version": TRANSFORMERS_VERSION,
        "video_token_id": ids["<|video_pad|>"],
        "vision_config": vision,
        "vision_end_token_id": ids["<|vision_end|>"],
        "vision_start_token_id": ids["<|vision_start|>"],
        # Added after the transformers save: last and out of key order, as DiffSynth mirrors it.
        "ideogram_fp8_weight_only": True,
    }
    return json.dumps(config, indent=2) + "\n"
