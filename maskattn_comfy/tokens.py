"""The prompt's tokens as a ComfyUI CLIP splits them: one label per context column."""

from __future__ import annotations

import re
from dataclasses import dataclass


@dataclass(frozen=True)
class TokenLabel:
    position: int   # column in the text context: chunk * 77 + index in the chunk
    text: str       # the token as the tokenizer decodes it
    weight: float   # from ComfyUI's (word:1.2) syntax
    word: str       # the whole word this token is part of ("" for start/end/padding)
    special: bool   # start, end or padding

    @property
    def label(self) -> str:
        return self.text if self.weight == 1.0 else f"({self.text}:{self.weight:g})"


def clip_tokenizer(clip):
    """The CLIP (SDTokenizer) that splits the prompt; SDXL's clip_g and clip_l split it alike."""
    for name in ("clip_g", "clip_l"):
        tokenizer = getattr(clip.tokenizer, name, None)
        if tokenizer is not None and hasattr(tokenizer, "tokenizer"):
            return name[-1], tokenizer
    raise ValueError(f"this CLIP's tokenizer ({type(clip.tokenizer).__name__}) has no CLIP-L/CLIP-G part; "
                     "connect the CLIP of the SDXL checkpoint the MODEL comes from")


def token_labels(clip, tokens: dict) -> list[TokenLabel]:
    """A label for every context column of `tokens` (from `clip.tokenize(text)`), chunk after chunk."""
    key, tokenizer = clip_tokenizer(clip)
    chunks = tokens[key]
    start, end = tokenizer.start_token, tokenizer.end_token
    labels: list[TokenLabel] = []
    pieces: list[tuple[int, str, float, bool]] = []  # (position, text, weight, ends a word)
    for c, chunk in enumerate(chunks):
        after_end = False
        for i, pair in enumerate(chunk):
            token, weight = pair[0], float(pair[1])
            position = c * len(chunk) + i
            special = after_end or token in (start, end)
            after_end = after_end or token == end
            if special:
                labels.append(TokenLabel(position, _special_text(token, start, end), weight, "", True))
                continue
            if isinstance(token, int):
                text = tokenizer.tokenizer.decode([token]).strip()
                ends_word = tokenizer.tokenizer.convert_ids_to_tokens(token).endswith("</w>")
            else:  # a textual-inversion embedding, passed as a tensor
                text, ends_word = "<embedding>", True
            pieces.append((position, text, weight, ends_word))
            labels.append(None)  # labels[position], filled once its word is complete
            if ends_word:
                _close_word(labels, pieces)
        _close_word(labels, pieces)  # a word cut by the chunk's end
    return labels


def _close_word(labels: list, pieces: list) -> None:
    word = "".join(text for _, text, _, _ in pieces)
    for position, text, weight, _ in pieces:
        labels[position] = TokenLabel(position, text, weight, word, False)
    pieces.clear()


def _special_text(token, start, end) -> str:
    return "<start>" if token == start else "<end>" if token == end else "<pad>"


_WEIGHT = re.compile(r"^\((.*?)(:[-+0-9.eE]+)?\)$")


def select_tokens(labels: list[TokenLabel], words: str) -> list[list[int]]:
    """Context columns of each comma-separated word in `words`, matched to whole words or single tokens.

    "(red:1.2)" matches "red"; case does not matter. Raises ValueError naming the prompt's
    words when one is not there.
    """
    chosen = []
    visible = [label for label in labels if not label.special]
    for raw in (w.strip() for w in words.split(",")):
        if not raw:
            continue
        match = _WEIGHT.match(raw)
        wanted = (match.group(1) if match else raw).strip().lower()
        columns = [label.position for label in visible if label.word.lower() == wanted]
        if not columns:
            columns = [label.position for label in visible if label.text.lower() == wanted]
        if not columns:
            known = ", ".join(dict.fromkeys(label.word for label in visible))
            raise ValueError(f"the word {raw!r} is not in the prompt; its words (as the tokenizer splits them) are: {known}")
        chosen.append(columns)
    return chosen
