"""The prompt's tokens as a ComfyUI CLIP splits them: one label per context column."""

from __future__ import annotations

import codecs
import re
import unicodedata
from dataclasses import dataclass


@dataclass(frozen=True)
class TokenLabel:
    position: int   # column in the text context: chunk * 77 + index in the chunk
    text: str       # the characters of its word that this token completes ("" if it ends inside one)
    weight: float   # from ComfyUI's (word:1.2) syntax
    word: str       # the whole word this token is part of ("" for start/end/padding)
    special: bool   # start, end or padding

    @property
    def label(self) -> str:
        """The token's text; "…" for a token that holds only the first bytes of its word's next character."""
        text = self.text or "…"
        return text if self.weight == 1.0 else f"({text}:{self.weight:g})"


def clip_tokenizer(clip):
    """The CLIP (SDTokenizer) that splits the prompt; SDXL's clip_g and clip_l split it alike."""
    for name in ("clip_g", "clip_l"):
        tokenizer = getattr(clip.tokenizer, name, None)
        if tokenizer is not None and hasattr(tokenizer, "tokenizer"):
            return name[-1], tokenizer
    raise ValueError(f"this CLIP's tokenizer ({type(clip.tokenizer).__name__}) has no CLIP-L/CLIP-G part; "
                     "connect the CLIP of the SDXL checkpoint the MODEL comes from")


def token_labels(clip, tokens: dict) -> list[TokenLabel]:
    """A label for every context column of `tokens` (from `clip.tokenize(text)`), chunk after chunk.

    CLIP's byte-level BPE may split one character's UTF-8 bytes over several tokens ("猫" is three),
    so tokens are grouped into words (a word's last token ends in `</w>`) and each word's bytes are
    decoded together: every token gets the characters it completes, and they join to the word.
    """
    key, tokenizer = clip_tokenizer(clip)
    chunks = tokens[key]
    start, end = tokenizer.start_token, tokenizer.end_token
    labels: list[TokenLabel] = []
    pieces: list[tuple[int, bytes, float]] = []  # the word so far: (position, its bytes, weight)
    for c, chunk in enumerate(chunks):
        after_end = False
        for i, pair in enumerate(chunk):
            token, weight = pair[0], float(pair[1])
            position = c * len(chunk) + i
            special = after_end or token in (start, end)
            after_end = after_end or token == end
            if special:
                labels.extend(_word_labels(pieces))
                labels.append(TokenLabel(position, _special_text(token, start, end), weight, "", True))
                continue
            if isinstance(token, int):
                piece = tokenizer.tokenizer.convert_ids_to_tokens(token)
                ends_word = piece.endswith("</w>")
                pieces.append((position, bytes(_FROM_BPE[ch] for ch in piece.removesuffix("</w>")), weight))
            else:  # a textual-inversion embedding, passed as a tensor: a word of its own
                labels.extend(_word_labels(pieces))
                pieces.append((position, "<embedding>".encode(), weight))
                ends_word = True
            if ends_word:
                labels.extend(_word_labels(pieces))
        labels.extend(_word_labels(pieces))  # a word cut by the chunk's end
    return labels


def _bpe_alphabet() -> dict[str, int]:
    """CLIP's (GPT-2's) byte-level BPE alphabet back to bytes: printable bytes stand for themselves,
    the others for the characters from U+0100 on, in byte order."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    others = [b for b in range(256) if b not in printable]
    return {**{chr(b): b for b in printable}, **{chr(256 + n): b for n, b in enumerate(others)}}


_FROM_BPE = _bpe_alphabet()


def _word_labels(pieces: list[tuple[int, bytes, float]]) -> list[TokenLabel]:
    """Labels for one word's tokens; empties `pieces`."""
    decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
    texts = [decoder.decode(data) for _, data, _ in pieces]
    if texts:
        texts[-1] += decoder.decode(b"", final=True)  # a character cut off at the word's end
    word = "".join(texts)
    labels = [TokenLabel(position, text, weight, word, False) for (position, _, weight), text in zip(pieces, texts)]
    pieces.clear()
    return labels


def _special_text(token, start, end) -> str:
    return "<start>" if token == start else "<end>" if token == end else "<pad>"


_WEIGHT = re.compile(r"^\((.*?)(:[-+0-9.eE]+)?\)$")


def select_tokens(labels: list[TokenLabel], words: str) -> list[list[int]]:
    """Context columns of each comma-separated word in `words`, matched to whole words or single tokens.

    "(red:1.2)" matches "red"; case and Unicode normalisation (NFC) do not matter. Raises
    ValueError naming the prompt's words when one is not there.
    """
    chosen = []
    visible = [label for label in labels if not label.special]
    for raw in (w.strip() for w in words.split(",")):
        if not raw:
            continue
        match = _WEIGHT.match(raw)
        wanted = _comparable(match.group(1) if match else raw)
        columns = [label.position for label in visible if _comparable(label.word) == wanted]
        if not columns:
            columns = [label.position for label in visible if label.text and _comparable(label.text) == wanted]
        if not columns:
            known = ", ".join(dict.fromkeys(label.word for label in visible))
            raise ValueError(f"the word {raw!r} is not in the prompt; its words (as the tokenizer splits them) are: {known}")
        chosen.append(columns)
    return chosen


def _comparable(text: str) -> str:
    return unicodedata.normalize("NFC", text.strip()).lower()
