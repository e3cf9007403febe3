"""The synthetic tokenizer: a real byte-level BPE (Qwen2 pre-tokenizer) trained at write time on
a built-in corpus, with the Qwen special tokens appended in Qwen's order.

The only user of the `tokenizers` package; the training runs once per process (cached).
"""

import functools
import json
from importlib import resources

from tokenizers import Regex, Tokenizer, models, normalizers, pre_tokenizers, trainers

from ideogram4_mlx.synth.plan import SyntheticSpec

QWEN_PRETOKENIZE_REGEX = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)
# (content, special) in the order of ids 151643..151668 of the real vocabulary.
QWEN_ADDED_TOKENS = (
    *[(t, True) for t in ("<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|object_ref_start|>")],
    *[(t, True) for t in ("<|object_ref_end|>", "<|box_start|>", "<|box_end|>", "<|quad_start|>")],
    *[(t, True) for t in ("<|quad_end|>", "<|vision_start|>", "<|vision_end|>", "<|vision_pad|>")],
    *[(t, True) for t in ("<|image_pad|>", "<|video_pad|>")],
    *[(t, False) for t in ("<tool_call>", "</tool_call>", "<|fim_prefix|>", "<|fim_middle|>")],
    *[(t, False) for t in ("<|fim_suffix|>", "<|fim_pad|>", "<|repo_name|>", "<|file_sep|>")],
    *[(t, False) for t in ("<tool_response>", "</tool_response>", "<think>", "</think>")],
)
BPE_VOCAB_SIZE = 2048 - len(QWEN_ADDED_TOKENS)


@functools.cache
def tokenizer_files() -> dict:
    """{"files": [(name, text)], "special_ids": {token: id}, "vocab_size": ids in use}."""
    vocab, merges = _train_bpe()
    special_ids = {t: len(vocab) + i for i, (t, _) in enumerate(QWEN_ADDED_TOKENS)}
    flags = {"single_word": False, "lstrip": False, "rstrip": False, "normalized": False}
    added = [
        {"id": special_ids[t], "content": t, **flags, "special": special}
        for t, special in QWEN_ADDED_TOKENS
    ]
    files = [
        (
            "tokenizer.json",
            json.dumps(_tokenizer_json(vocab, merges, added), indent=2, ensure_ascii=False),
        ),
        (
            "tokenizer_config.json",
            json.dumps(_tokenizer_config(added), indent=2, ensure_ascii=False) + "\n",
        ),
        ("vocab.json", json.dumps(vocab, ensure_ascii=False)),
        ("merges.txt", "#version: 0.2\n" + "".join(m + "\n" for m in merges)),
        # [?] where the real tokenizer/ keeps the template: a transformers >= 4.47 save (the
        # snapshot's configs say 5.8.0) writes chat_template.jinja, not a tokenizer_config key.
        ("chat_template.jinja", _data_text("qwen3_vl_chat_template.jinja")),
    ]
    size = len(vocab) + len(QWEN_ADDED_TOKENS)
    return {"files": files, "special_ids": special_ids, "vocab_size": size}


def text_vocab_size(spec: SyntheticSpec) -> int:
    """Embedding rows of the text encoder: the spec's, or the tokenizer's rounded up to 128."""
    return spec.text_vocab_size or -(-tokenizer_files()["vocab_size"] // 128) * 128


def _train_bpe() -> tuple[dict[str, int], list[str]]:
    tok = Tokenizer(models.BPE())
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = _qwen_pre_tokenizer()
    trainer = trainers.BpeTrainer(
        vocab_size=BPE_VOCAB_SIZE,
        min_frequency=2,
        show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(_training_corpus(), trainer)
    model = json.loads(tok.to_str())["model"]
    merges = [m if isinstance(m, str) else " ".join(m) for m in model["merges"]]
    return model["vocab"], merges


def _qwen_pre_tokenizer():
    split = pre_tokenizers.Split(Regex(QWEN_PRETOKENIZE_REGEX), behavior="isolated", invert=False)
    return pre_tokenizers.Sequence(
        [split, pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)]
    )


def _tokenizer_json(vocab: dict, merges: list[str], added: list[dict]) -> dict:
    byte_level = {"add_prefix_space": False, "trim_offsets": False, "use_regex": False}
    split = {"type": "Split", "pattern": {"Regex": QWEN_PRETOKENIZE_REGEX}}
    split |= {"behavior": "Isolated", "invert": False}
    return {
        "version": "1.0",
        "truncation": None,
        "padding": None,
        "added_tokens": added,
        "normalizer": {"type": "NFC"},
        "pre_tokenizer": {
            "type": "Sequence",
            "pretokenizers": [split, {"type": "ByteLevel", **byte_level}],
        },
        "post_processor": {"type": "ByteLevel", **byte_level},
        "decoder": {"type": "ByteLevel", **byte_level},
        "model": {
            "type": "BPE",
            "dropout": None,
            "unk_token": None,
            "continuing_subword_prefix": "",
            "end_of_word_suffix": "",
            "fuse_unk": False,
            "byte_fallback": False,
            "ignore_merges": False,
            "vocab": vocab,
            "merges": merges,
        },
    }


def _tokenizer_config(added: list[dict]) -> dict:
    fields = ("content", "lstrip", "normalized", "rstrip", "single_word", "special")
    decoder = {str(t["id"]): {k: t[k] for k in fields} for t in added}
    return {
        "add_bos_token": False,
        "add_prefix_space": False,
        "added_tokens_decoder": decoder,
        "additional_special_tokens": [t["content"] for t in added if t["special"]][1:],
        "bos_token": None,
        "clean_up_tokenization_spaces": False,
        "eos_token": "<|im_end|>",
        "errors": "replace",
        "model_max_length": 262144,
        "pad_token": "<|endoftext|>",
        "split_special_tokens": False,
        "tokenizer_class": "Qwen2Tokenizer",
        "unk_token": None,
    }


def _training_corpus() -> list[str]:
    """Built-in lines of English prompts, minified JSON captions, accented, CJK and emoji text."""
    return _data_text("tokenizer_corpus.txt").splitlines()


def _data_text(name: str) -> str:
    return (resources.files("ideogram4_mlx.synth") / "data" / name).read_text(encoding="utf-8")
