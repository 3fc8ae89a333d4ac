"""The learned reference prior's networks, vocabulary and prompts (built offline, no download).

* :func:`build_tokenizer`: a ``CLIPTokenizer`` whose byte-pair merges are learned here from
  the prompt words (:func:`prompt_words`), so every prompt word is one token; other words
  fall back to single characters (still tokenised, just not learned as words).
* :func:`build_text_encoder`: a small ``CLIPTextModel`` (2 layers, width 64).
* :func:`build_unet`: a small pixel-space ``UNet2DConditionModel`` (3 channels at 32 px,
  cross-attention on the text encoder's states).
* :func:`training_prompt`: the prompts the model is trained on, the view words following the
  project's view-dependent prompting rule ("<prompt>, <view> view", bins of
  :func:`distill3d.priors.base.view_bins`).

Why pixel space at 32 px: the reference world's collections, renderer, classifiers and
metrics all work at 32 px RGB, so the model's x0 is the exact prior's x0 (same background,
same classifiers apply to x0 directly, the exact mixture score is the training target). A
latent VAE would cost training time on two shared cores and put a second learned error
between the model and the metrics; 32 x 32 x 3 = 3072 numbers is already small.
"""

from __future__ import annotations

import random
from collections import Counter
from typing import Any, Iterable, Optional, Sequence

from ..base import VIEW_NAMES

#: image size (pixels) of the learned prior; x0 is [B, 3, 32, 32] in [-1, 1]
IMAGE_SIZE = 32
TEXT_WIDTH = 64
MAX_PROMPT_TOKENS = 24
#: prompt templates; "{}" is an object word (keyword, or colour + keyword)
TEMPLATES = (
    "{}", "a {}", "an {}", "the {}", "a photo of a {}", "a picture of a {}", "a render of a {}",
    "a 3d model of a {}", "a toy {}", "a cute {}", "a small {}",
)
#: a colour (or other adjective) per built-in object, for prompts like "a yellow rubber duck"
ADJECTIVES = {
    "rubber_duck": ("yellow",), "snowman": ("white", "smiling"), "mug": ("blue",),
    "house": ("red roofed", "wooden"), "cat_head": ("orange", "ginger"),
}
#: views that occur in the reference collections' elevation band (overhead needs > 60 degrees)
TRAINED_VIEWS = ("front", "side", "back")
EXTRA_WORDS = ("view", "views", "of", "and", "with", "on", "the", "a", "an", "photo", "picture", "render",
               "3d", "model", "toy", "cute", "small", "high", "quality", "detailed", *VIEW_NAMES)


def object_phrases(name: str, keywords: Sequence[str]) -> list[str]:
    """The words a prompt may name object ``name`` with (keywords, with and without an adjective)."""
    out = list(keywords)
    out += [f"{adj} {kw}" for adj in ADJECTIVES.get(name, ()) for kw in keywords[:2]]
    return out


def training_prompt(rng: random.Random, name: str, keywords: Sequence[str], description: str, view: Optional[str]) -> str:
    """One prompt for object ``name``; with ``view`` the project's rule appends ", <view> view"."""
    if rng.random() < 0.1:
        text = description
    else:
        text = rng.choice(TEMPLATES).format(rng.choice(object_phrases(name, keywords)))
    return f"{text}, {view} view" if view else text


def prompt_words(objects: Iterable[Any]) -> list[str]:
    """Every word of every object's keywords, adjectives and description, plus the template words."""
    import regex

    # the word pattern of CLIPTokenizer (letters, single digits, punctuation runs, 's 't ...)
    pattern = regex.compile(r"""'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+""", regex.IGNORECASE)
    texts = list(EXTRA_WORDS)
    for obj in objects:
        texts += list(obj.keywords) + [obj.description] + list(ADJECTIVES.get(obj.name, ()))
    return [word for text in texts for word in pattern.findall(" ".join(text.lower().split()))]


def learn_merges(words: Sequence[str]) -> list[tuple[str, str]]:
    """Byte-pair merges (most frequent pair first) until every distinct word is one symbol."""
    vocab = Counter(tuple(w[:-1]) + (w[-1] + "</w>",) for w in words if w)
    merges: list[tuple[str, str]] = []
    while True:
        pairs: Counter = Counter()
        for symbols, count in vocab.items():
            for pair in zip(symbols, symbols[1:]):
                pairs[pair] += count
        if not pairs:
            return merges
        best = max(pairs, key=lambda p: (pairs[p], p))
        merges.append(best)
        merged = best[0] + best[1]
        new_vocab: Counter = Counter()
        for symbols, count in vocab.items():
            out, i = [], 0
            while i < len(symbols):
                if i + 1 < len(symbols) and (symbols[i], symbols[i + 1]) == best:
                    out.append(merged)
                    i += 2
                else:
                    out.append(symbols[i])
                    i += 1
            new_vocab[tuple(out)] += count
        vocab = new_vocab


def build_tokenizer(objects: Iterable[Any], model_max_length: int = MAX_PROMPT_TOKENS):
    """A CLIP BPE tokenizer over the prompt words (one token each) with a character fallback."""
    from transformers import CLIPTokenizer

    words = prompt_words(objects)
    merges = learn_merges(words)
    chars = sorted(set("abcdefghijklmnopqrstuvwxyz0123456789,.-'!?+") | {c for w in words for c in w})
    vocab: dict[str, int] = {}
    for token in chars + [c + "</w>" for c in chars] + [a + b for a, b in merges]:
        vocab.setdefault(token, len(vocab))
    for special in ("<|startoftext|>", "<|endoftext|>"):
        vocab[special] = len(vocab)
    tokenizer = CLIPTokenizer(vocab=vocab, merges=list(merges), model_max_length=model_max_length,
                              pad_token="<|endoftext|>")
    return tokenizer


def build_text_encoder(tokenizer, seed: int = 0):
    """A 2-layer CLIP text encoder of width :data:`TEXT_WIDTH` over ``tokenizer``'s vocabulary."""
    import torch
    from transformers import CLIPTextConfig, CLIPTextModel

    config = CLIPTextConfig(
        vocab_size=len(tokenizer), hidden_size=TEXT_WIDTH, intermediate_size=4 * TEXT_WIDTH, num_attention_heads=4,
        num_hidden_layers=2, max_position_embeddings=tokenizer.model_max_length, hidden_act="gelu",
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return CLIPTextModel(config)


def unet_config() -> dict[str, Any]:
    """The pixel-space UNet: 32 px RGB, channels (32, 64, 96), cross-attention at 16 and 8 px."""
    return dict(
        sample_size=IMAGE_SIZE,
        in_channels=3,
        out_channels=3,
        block_out_channels=(32, 64, 96),
        layers_per_block=1,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=TEXT_WIDTH,
        attention_head_dim=8,
        norm_num_groups=16,
        use_linear_projection=True,
    )


def build_unet(seed: int = 0):
    import torch
    from diffusers import UNet2DConditionModel

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return UNet2DConditionModel(**unet_config())


def num_parameters(module) -> int:
    return sum(p.numel() for p in module.parameters())
