"""Prompts -> token ids -> cached text features (MODEL_NOTES#prompt-format).

``PromptEncoder`` owns the tokenizer and its chat template, the text encoder (loaded only when
a prompt is not cached) and a small LRU cache of encoded prompts. ``render_chat`` renders chat
templates (a checkpoint's, or a ``--magic-model``'s) with bounded time, memory and output.
"""

from __future__ import annotations

import hashlib
import json
import signal
import subprocess
import sys
from collections import OrderedDict
from collections.abc import Sequence
from pathlib import Path
from typing import NamedTuple

import mlx.core as mx
import numpy as np

# PreTrainedTokenizerFast, not AutoTokenizer: the auto mapping imports torch when it is installed.
from transformers import PreTrainedTokenizerBase, PreTrainedTokenizerFast

from ideogram4_mlx.config import CheckpointError, read_json
from ideogram4_mlx.errors import InputError
from ideogram4_mlx.text_encoder import Qwen3VLTextEncoder, stack_taps

# diffusers, mflux and DiffSynth cap the templated prompt at 2048 tokens (the official code
# allows 8192). We follow the ports so that one prompt gives the same image in all of them.
MAX_TEXT_TOKENS = 2048
# A prompt this long is far over MAX_TEXT_TOKENS (a token is a few characters); refused before
# the tokenizer spends time on it.
MAX_PROMPT_CHARS = 256 * MAX_TEXT_TOKENS
# Any id works for padding slots: they are masked out of attention and zeroed in the output.
PAD_TOKEN_ID = 0

# A chat template is a program. These render here: sha256 of ``template_digest``'s text of the
# Qwen3-VL template (synth/data/ holds a copy; test_prompt checks the two agree), whose work
# grows with the messages only. Any other template renders in a child process within limits.
KNOWN_TEMPLATES = frozenset({"9d879ef91075acbfb2df7e441fd79d60bacfca989cf6d511d2af45c681e94f10"})
# A template renders in milliseconds; the child stops one that loops or grows past these.
TEMPLATE_SECONDS = 2.0
TEMPLATE_MEMORY = 512 * 2**20  # bytes over the child's own size (Linux; macOS ignores RLIMIT_AS)
TEMPLATE_MAX_CHARS = 1_000_000
# A fresh interpreter with jinja2 starts in ~0.2 s; a busy machine may take much longer.
CHILD_START_SECONDS = 30.0

# The child renders any template but the known one (template_child.py: a script, no package
# import, so it starts in ~0.2 s).
RENDER_CHILD = Path(__file__).with_name("template_child.py")


def canonical_prompt(prompt: str) -> str:
    """A JSON-object caption minified with literal UTF-8 and its key order kept; else as given."""
    try:
        obj = json.loads(prompt)
    except ValueError:
        return prompt
    if not isinstance(obj, dict):
        return prompt
    return json.dumps(obj, ensure_ascii=False, separators=(",", ":"))


def prompt_token_ids(tokenizer: PreTrainedTokenizerBase, prompt: str) -> list[int]:
    """Token ids of one prompt in the Qwen3-VL chat template, no system prompt
    (MODEL_NOTES#prompt-format).

    Raises InputError when the result is longer than ``MAX_TEXT_TOKENS``, ``CheckpointError``
    naming the template file when the chat template fails (the Jinja sandbox refused it).
    """
    if len(prompt) > MAX_PROMPT_CHARS:
        raise InputError(
            f"prompt is {len(prompt)} characters long, far over the limit of {MAX_TEXT_TOKENS} "
            f"tokens in the chat template (no prompt over {MAX_PROMPT_CHARS} characters fits). "
            "Shorten the prompt."
        )
    messages = [{"role": "user", "content": [{"type": "text", "text": canonical_prompt(prompt)}]}]
    text = render_chat(tokenizer, messages)
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    if len(ids) > MAX_TEXT_TOKENS:
        raise InputError(
            f"prompt is {len(ids)} tokens long in the chat template; the limit is "
            f"{MAX_TEXT_TOKENS} tokens. Shorten the prompt."
        )
    return ids


def template_digest(template: str) -> str:
    """sha256 of a chat template, line endings and surrounding whitespace normalized."""
    return hashlib.sha256(template.replace("\r\n", "\n").strip().encode("utf-8")).hexdigest()


def render_chat(tokenizer: PreTrainedTokenizerBase, messages: list[dict]) -> str:
    """``messages`` in the tokenizer's chat template plus the generation prompt: the text
    ``apply_chat_template(messages, add_generation_prompt=True, tokenize=False)`` gives, with
    bounded work. A template in ``KNOWN_TEMPLATES`` renders here; any other in a child process
    stopped after ``TEMPLATE_SECONDS``, ``TEMPLATE_MEMORY`` or ``TEMPLATE_MAX_CHARS``.

    Raises ``CheckpointError`` (one line, naming the template file) when the template fails,
    the Jinja sandbox refuses it, or it exceeds a limit.
    """
    if tokenizer.chat_template is None:
        raise CheckpointError(f"{tokenizer.name_or_path}: the tokenizer has no chat template")
    template = tokenizer.get_chat_template()
    if template_digest(template) in KNOWN_TEMPLATES:  # its work grows with the messages only
        return tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    variables = {**tokenizer.special_tokens_map, "messages": messages}  # as transformers passes
    variables.update(tools=None, documents=None, add_generation_prompt=True)
    reply = render_in_child(template, variables)
    if "error" in reply:
        raise CheckpointError(
            f"{template_file(tokenizer.name_or_path)}: the chat template failed "
            f"({reply['error']}); restore the Qwen3-VL template of the original checkpoint"
        )
    return reply["text"]


def render_in_child(template: str, variables: dict) -> dict:
    """``template_child.py``'s answer for one template: ``{"text": ...}`` or ``{"error": ...}``."""
    job = {
        "template": template,
        "variables": variables,
        "seconds": TEMPLATE_SECONDS,
        "memory": TEMPLATE_MEMORY,
        "max_chars": TEMPLATE_MAX_CHARS,
    }
    over_time = {"error": f"it ran over {TEMPLATE_SECONDS:g} s"}
    try:
        done = subprocess.run(
            [sys.executable, "-I", str(RENDER_CHILD)],
            input=json.dumps(job, default=str),  # ASCII: the child's locale cannot garble it
            capture_output=True,
            encoding="utf-8",
            timeout=TEMPLATE_SECONDS + CHILD_START_SECONDS,
        )
    except subprocess.TimeoutExpired:  # run() has killed it
        return over_time
    if done.returncode == -signal.SIGXCPU:  # a long C call outlasted the timer: the CPU limit
        return over_time
    if done.stderr.rstrip().endswith("OutOfTime"):  # the repeating timer fired again while the
        return over_time  # child was answering the first one
    if done.returncode != 0:
        cause = (done.stderr.strip().splitlines() or [f"exit status {done.returncode}"])[-1]
        return {"error": f"the renderer process failed ({cause[:300]})"}
    try:
        return json.loads(done.stdout)
    except json.JSONDecodeError:
        return {"error": f"the renderer process answered no JSON ({done.stdout[:100]!r})"}


def reason(e: Exception) -> str:
    """An exception as one line: its type and its message, whitespace collapsed."""
    return " ".join(f"{type(e).__name__}: {e}".split())


def template_file(tokenizer_dir: Path | str) -> Path:
    """Where a tokenizer folder keeps its chat template (transformers reads the .jinja first)."""
    jinja = Path(tokenizer_dir) / "chat_template.jinja"
    return jinja if jinja.is_file() else Path(tokenizer_dir) / "tokenizer_config.json"


def load_tokenizer(tokenizer_dir: Path) -> PreTrainedTokenizerFast:
    """The fast tokenizer of a checkpoint folder (offline), its chat template tried once; any
    damage is one ``CheckpointError`` naming the file."""
    if not tokenizer_dir.is_dir():
        raise CheckpointError(f"{tokenizer_dir}: tokenizer folder not found")
    for name in ("tokenizer_config.json", "tokenizer.json"):
        read_json(tokenizer_dir / name)  # JSON objects, or an error naming the file
    try:
        tokenizer = PreTrainedTokenizerFast.from_pretrained(
            str(tokenizer_dir), local_files_only=True
        )
    # The tokenizers library raises bare Exceptions (e.g. "expected value at line 1").
    except Exception as e:
        raise CheckpointError(
            f"{tokenizer_dir}: the tokenizer cannot be loaded ({reason(e)}); "
            "restore tokenizer/ from the original checkpoint"
        ) from None
    if tokenizer.chat_template is None:
        raise CheckpointError(
            f"{tokenizer_dir}: no chat template (chat_template.jinja, or chat_template in "
            "tokenizer_config.json); restore tokenizer/ from the original checkpoint"
        )
    prompt_token_ids(tokenizer, "")  # a template that fails, fails now, before any model loads
    return tokenizer


def pad_left(rows: list[list[int]], pad_id: int = PAD_TOKEN_ID) -> tuple[np.ndarray, np.ndarray]:
    """Left-pad id lists to (B, T_max) ids and a 0/1 attention mask (int32)."""
    length = max(len(r) for r in rows)
    ids = np.full((len(rows), length), pad_id, dtype=np.int32)
    mask = np.zeros((len(rows), length), dtype=np.int32)
    for b, row in enumerate(rows):
        ids[b, length - len(row) :] = row
        mask[b, length - len(row) :] = 1
    return ids, mask


class EncodedPrompts(NamedTuple):
    features: mx.array  # (B, T_max, 13*D) float32, left-padded, padding rows 0
    lengths: list[int]  # real tokens per row; row b holds them in [T_max - lengths[b], T_max)


class PromptEncoder:
    """Tokenizer + text encoder + an LRU cache of encoded prompts (keyed by the canonical prompt).

    The text encoder is loaded by :meth:`load_model` and freed by :meth:`release_model`; the
    tokenizer and the cache stay. A prompt that is not cached needs a loaded model (nothing
    reloads behind the caller's back, so peak memory stays under the caller's control);
    :meth:`is_cached` tells whether it is needed. ``loads`` counts model loads.
    """

    def __init__(
        self,
        tokenizer: PreTrainedTokenizerBase,
        model: Qwen3VLTextEncoder | None = None,
        cache_size: int = 4,
        component_dir: Path | str | None = None,
        dtype: mx.Dtype = mx.bfloat16,
    ):
        self.tokenizer = tokenizer
        self.model = model
        self.cache_size = cache_size
        self.component_dir = component_dir  # text_encoder/
        self.dtype = dtype
        self.loads = 0
        # canonical prompt -> (n, 13*D) features in the model dtype (bf16 halves the memory).
        self._cache: OrderedDict[str, mx.array] = OrderedDict()

    @classmethod
    def from_pretrained(
        cls,
        checkpoint_dir: Path | str,
        dtype: mx.Dtype = mx.bfloat16,
        cache_size: int = 4,
        load_model: bool = True,
    ) -> PromptEncoder:
        """``tokenizer/`` of a checkpoint folder (offline) and, if ``load_model``, its
        ``text_encoder/`` (otherwise loaded by the first :meth:`load_model`)."""
        checkpoint_dir = Path(checkpoint_dir)
        tokenizer = load_tokenizer(checkpoint_dir / "tokenizer")
        component_dir = checkpoint_dir / "text_encoder"
        encoder = cls(tokenizer, None, cache_size, component_dir, dtype)
        if load_model:
            encoder.load_model()
        return encoder

    def is_cached(self, prompt: str) -> bool:
        return canonical_prompt(prompt) in self._cache

    def release_model(self) -> None:
        """Free the text encoder's weights; the tokenizer and the cache stay."""
        self.model = None
        mx.clear_cache()

    def load_model(self) -> None:
        """Load the text encoder (again, after ``release_model()``); a no-op when loaded."""
        if self.model is None:
            if self.component_dir is None:
                raise RuntimeError("this PromptEncoder was built without a model folder")
            self.model = Qwen3VLTextEncoder.from_pretrained(self.component_dir, self.dtype)
            self.loads += 1

    def token_ids(self, prompt: str) -> list[int]:
        """``prompt_token_ids`` with this encoder's tokenizer."""
        return prompt_token_ids(self.tokenizer, prompt)

    def encode(self, prompts: str | Sequence[str]) -> EncodedPrompts:
        """Features of one prompt or a batch (left padding); repeated prompts hit the cache."""
        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        if not prompts:
            raise ValueError("no prompts to encode")
        keys = [canonical_prompt(p) for p in prompts]
        rows = {k: self._cache[k] for k in keys if k in self._cache}
        missing = list(dict.fromkeys(k for k in keys if k not in rows))
        if missing:
            rows.update(self._run(missing))
        for key in keys:
            self._remember(key, rows[key])

        lengths = [rows[k].shape[0] for k in keys]
        t_max = max(lengths)
        features = mx.stack(
            [mx.pad(rows[k], [(t_max - n, 0), (0, 0)]) for k, n in zip(keys, lengths, strict=True)]
        )
        return EncodedPrompts(features.astype(mx.float32), lengths)

    def _run(self, prompts: list[str]) -> dict[str, mx.array]:
        ids = [self.token_ids(p) for p in prompts]  # length errors before any model work
        if self.model is None:
            raise RuntimeError(
                f"the text encoder was released and {len(prompts)} prompt(s) are not cached, "
                f"e.g. {prompts[0][:60]!r}; call load_model() first"
            )
        input_ids, mask = pad_left(ids)
        taps = self.model.hidden_taps(input_ids, None if mask.all() else mask)
        features = stack_taps(taps, mask)
        mx.eval(features)
        t_max = input_ids.shape[1]
        rows = zip(prompts, ids, strict=True)
        return {p: features[b, t_max - len(row) :] for b, (p, row) in enumerate(rows)}

    def _remember(self, key: str, row: mx.array) -> None:
        if self.cache_size <= 0:
            return
        self._cache[key] = row
        self._cache.move_to_end(key)
        while len(self._cache) > self.cache_size:
            self._cache.popitem(last=False)
