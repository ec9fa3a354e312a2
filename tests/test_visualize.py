"""Visualize Mask: maps at the latent's real shape, token labels as the tokenizer splits them, seeds."""

from __future__ import annotations

import dataclasses
import math
import re

import pytest
import torch

from maskattn_comfy.model_check import require_sdxl
from maskattn_comfy.patch import PatchOptions, apply_maskattn
from maskattn_comfy.recording import ATTENTION_MAPS, MapRecorder
from maskattn_comfy.tiny_model import build_sdxl_clip, build_sdxl_model
from maskattn_comfy.render import MAX_PIXELS, MAX_WIDTH, ColourScale, grid_layout, group_rows, render_grid
from maskattn_comfy.tokens import TokenLabel, select_tokens, token_labels
from maskattn_comfy.visualize import VisualizeOptions, record_maps, visualize_mask
from maskattn_core import GateHead, GateSet, LayerKey, MaskAttnConfig, layer_name

LATENT_H, LATENT_W = 10, 24  # 80x192 pixels; the UNet's levels are 10x24, 5x12 and 3x6 (10/4 rounds up)
TOP_COLOUR, BOTTOM_COLOUR = (253, 231, 37), (68, 1, 84)  # the sequential colour map's ends


def left_half(locations: int) -> torch.Tensor:
    """[N] 1.0 where a location of the UNet level with `locations` positions lies in the latent's left half."""
    level = next(l for l in range(4) if math.ceil(LATENT_H / 2 ** l) * math.ceil(LATENT_W / 2 ** l) == locations)
    h, w = math.ceil(LATENT_H / 2 ** level), math.ceil(LATENT_W / 2 ** level)
    centre = (torch.arange(w) + 0.5) * 2 ** level  # each column's centre in latent pixels
    return (centre < LATENT_W / 2).float().repeat(h)  # row-major, as the transformer flattens


class LeftHalfGate(GateHead):
    """A gate whose open set is constructed: `token` may only reach the left half of the latent."""

    def __init__(self, feature_dim: int, token: int):
        super().__init__(feature_dim)
        self.token = token

    def logits(self, x, context, token_features=None):
        logits = torch.full((x.shape[0], x.shape[1], context.shape[1]), 8.0)
        logits[:, :, self.token] = 16.0 * left_half(x.shape[1]) - 8.0
        return logits


@pytest.fixture(scope="module")
def unet(pack):
    return build_sdxl_model()


@pytest.fixture(scope="module")
def clip(pack):
    return build_sdxl_clip()


@pytest.fixture(autouse=True)
def temp_folder(tmp_path):
    """The preview image goes to ComfyUI's temp folder; keep it out of the checkout."""
    import folder_paths

    saved = folder_paths.get_temp_directory()
    folder_paths.set_temp_directory(str(tmp_path))
    yield
    folder_paths.set_temp_directory(saved)


def left_half_model(unet, token: int, options: PatchOptions = PatchOptions(), recorder=None):
    channels = require_sdxl(unet)
    layers = GateSet.create(MaskAttnConfig(stage="all", share_heads_by_stage=False), channels).layers
    heads = {layer_name(key).replace(".", "_"): LeftHalfGate(channels[key], token) for key in layers}
    gates = GateSet(MaskAttnConfig(stage="all"), heads, {layer_name(key): layer_name(key).replace(".", "_") for key in layers})
    return apply_maskattn(unet, gates, options, recorder=recorder)


class Attn2Spy:
    """Forward hooks on every attn2's to_q and to_k of a ComfyUI UNet, and on the UNet's input: what the
    layers really computed, read beside MaskAttn's own path."""

    def __init__(self, unet):
        diffusion_model = unet.model.diffusion_model
        self.modules, self.calls, self.inputs, self._hooks = {}, {}, [], []
        for name, blocks in (("input", diffusion_model.input_blocks), ("middle", [diffusion_model.middle_block]),
                             ("output", diffusion_model.output_blocks)):
            for number, block in enumerate(blocks):
                for layer in block:
                    for index, transformer in enumerate(getattr(layer, "transformer_blocks", [])):
                        self.modules[LayerKey(name, number, index)] = transformer.attn2
        for key, attn2 in self.modules.items():
            calls = self.calls.setdefault(key, [])
            self._hooks.append(attn2.to_q.register_forward_hook(lambda m, i, out, calls=calls: calls.append([out.detach()])))
            self._hooks.append(attn2.to_k.register_forward_hook(lambda m, i, out, calls=calls: calls[-1].append(out.detach())))
        self._hooks.append(diffusion_model.register_forward_pre_hook(lambda m, args: self.inputs.append(args[0].detach())))

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        for hook in self._hooks:
            hook.remove()


def attention_by_hand(q, k, heads, closed_penalty=None, closed=None):
    """softmax(q_h k_h^T / sqrt(d) + penalty where closed) per head, averaged over heads and rows: [N, T]."""
    rows, locations, width = q.shape
    d = width // heads
    logits = torch.einsum("rnhd,rthd->rhnt", q.reshape(rows, locations, heads, d).double(),
                          k.reshape(rows, -1, heads, d).double()) / math.sqrt(d)
    if closed is not None:
        logits = logits + closed_penalty * closed.double()
    return logits.softmax(-1).mean((0, 1))


def closed_by_left_half_gate(locations: int, tokens: int, token: int) -> torch.Tensor:
    """[N, T]: True where LeftHalfGate closes a connection (its token, right half)."""
    closed = torch.zeros(locations, tokens, dtype=torch.bool)
    closed[:, token] = left_half(locations) == 0
    return closed


def run_node(pack, model, clip, text, latent=None, **inputs):
    values = dict(seed=0, noise_levels=2, start_percent=0.2, end_percent=0.8, map="gate probability",
                  grouping="all", words="", batch_index=0, show_special_tokens=False)
    values.update(inputs)
    latent = latent or {"samples": torch.zeros(1, 4, LATENT_H, LATENT_W)}
    return pack["MaskAttnVisualize"].execute(model, clip, text, latent, **values)


def test_a_token_gated_to_the_left_half_maps_open_left_and_closed_right_at_the_latents_aspect(unet, clip):
    text = "a photo of a cat"
    cat = next(label.position for label in token_labels(clip, clip.tokenize(text)) if label.text == "cat")
    result = visualize_mask(left_half_model(unet, cat), clip, text, {"samples": torch.zeros(1, 4, LATENT_H, LATENT_W)},
                            VisualizeOptions(noise_levels=1, grouping="all", words="cat"))

    assert result.mask.shape == (1, LATENT_H * 8, LATENT_W * 8)
    assert result.mask[:, :, :80].min() > 0.99 and result.mask[:, :, 112:].max() < 0.01
    left, top, right, bottom = result.boxes[("all layers", cat)]
    assert (right - left) / (bottom - top) == pytest.approx(LATENT_W / LATENT_H, abs=0.03)
    cell = (result.image[0, top:bottom, left:right] * 255).round()
    quarter = (right - left) // 4
    assert (cell[:, :quarter] - torch.tensor(TOP_COLOUR)).abs().max() <= 2
    assert (cell[:, -quarter:] - torch.tensor(BOTTOM_COLOUR)).abs().max() <= 2
    photo = next(label.position for label in result.columns if label.text == "photo")
    left, top, right, bottom = result.boxes[("all layers", photo)]
    assert ((result.image[0, top:bottom, left:right] * 255).round() - torch.tensor(TOP_COLOUR)).abs().max() <= 2


def test_each_layer_map_has_its_levels_real_sides(pack, unet, clip):
    text = "a photo of a cat"
    cat = next(label.position for label in token_labels(clip, clip.tokenize(text)) if label.text == "cat")
    positive = clip.encode_from_tokens_scheduled(clip.tokenize(text))
    recorder = record_maps(left_half_model(unet, cat), positive, {"samples": torch.zeros(1, 4, LATENT_H, LATENT_W)},
                           VisualizeOptions(noise_levels=1, map="attention_masked"))
    maps = recorder.maps()
    sides = {key: tuple(m["attention_masked"].shape[-2:]) for key, m in maps.items()}
    assert set(sides.values()) == {(5, 12), (3, 6)}
    assert all(side == ((5, 12) if key[1] in (4, 5) and key[0] == "input" or key[0] == "output" and key[1] >= 3
                        else (3, 6)) for key, side in sides.items())
    for m in maps.values():  # attention is a distribution over tokens; the gate leaves "cat" nothing on the right
        assert m["attention_masked"].sum(0) == pytest.approx(torch.ones(m["attention_masked"].shape[-2:]), abs=1e-4)
        right = m["attention_masked"][cat, :, -1]
        assert right.max() < 1e-3


def test_batch_index_maps_its_own_latent_item_with_its_own_noise_and_the_layers_real_attention(unet, clip):
    text = "a photo of a cat"
    cat = next(label.position for label in token_labels(clip, clip.tokenize(text)) if label.text == "cat")
    strength, seed = 0.6, 3
    model = left_half_model(unet, cat, PatchOptions(strength=strength))
    generator = torch.Generator().manual_seed(1)
    item, other = 8 * torch.randn(2, 4, LATENT_H, LATENT_W, generator=generator)
    options = VisualizeOptions(seed=seed, noise_levels=2, map="attention_masked", batch_index=1)

    with Attn2Spy(unet) as spy:
        result = visualize_mask(model, clip, text, {"samples": torch.stack([torch.zeros_like(item), item])}, options)
    # Each noise level saw item 1 noised with item 1's share of the seed's batch noise, as KSampler gives it.
    noise = torch.randn([2, 4, LATENT_H, LATENT_W], generator=torch.manual_seed(seed))[1]
    sampling = unet.get_model_object("model_sampling")
    sigmas = [sampling.percent_to_sigma(p) for p in (0.2, 0.8)]  # start and end percent, noisiest first
    assert len(spy.inputs) == 2
    for x, sigma in zip(spy.inputs, sigmas):  # the UNet's input: (latent in the model's scale + sigma noise) * c_in
        expected = (unet.model.process_latent_in(item) + sigma * noise) / (sigma ** 2 + 1) ** 0.5
        assert x.shape[0] == 1 and (x[0] - expected).abs().max() < 1e-5
    # Each layer's map is the softmax of the layer's own q and k, with the gate's penalty log(1 - 0.6) where closed.
    drawn = [label.position for label in result.columns]
    assert set(result.layer_maps) == set(spy.modules)  # stage "all": every attn2 layer is gated and mapped
    for key, layer_map in result.layer_maps.items():
        calls = spy.calls[key]
        assert len(calls) == 2
        heads = spy.modules[key].heads
        expected = torch.stack([attention_by_hand(q, k, heads, math.log(1 - strength),
                                                  closed_by_left_half_gate(q.shape[1], k.shape[1], cat))
                                for q, k in calls]).mean(0)
        recorded = layer_map.reshape(len(drawn), -1).T  # [C, h, w] -> [N, C]
        assert recorded.double() == pytest.approx(expected[:, drawn], abs=2e-6, rel=1e-4)
    # The other item must not leak in: another item 0 gives the same maps, and item 0 its own.
    again = visualize_mask(model, clip, text, {"samples": torch.stack([other, item])}, options)
    first = visualize_mask(model, clip, text, {"samples": torch.stack([item, item])},
                           VisualizeOptions(seed=seed, noise_levels=2, map="attention_masked", batch_index=0))
    for key in result.layer_maps:
        assert torch.equal(again.layer_maps[key], result.layer_maps[key])
        assert (first.layer_maps[key] - result.layer_maps[key]).abs().max() > 1e-6  # noise[0], not noise[1]


def test_only_the_positive_rows_are_recorded_in_a_real_cfg_batch(unet, clip):
    import comfy.sample

    text = "a photo of a cat"
    cat = next(label.position for label in token_labels(clip, clip.tokenize(text)) if label.text == "cat")
    recorder = MapRecorder(ATTENTION_MAPS)
    model = left_half_model(unet, cat, PatchOptions(strength=0.75), recorder=recorder)
    positive = clip.encode_from_tokens_scheduled(clip.tokenize(text))
    negative = clip.encode_from_tokens_scheduled(clip.tokenize("blurry, ugly, watermark"))
    latent = torch.zeros(1, 4, LATENT_H, LATENT_W)
    noise = torch.randn(latent.shape, generator=torch.Generator().manual_seed(0))
    with Attn2Spy(unet) as spy:
        comfy.sample.sample(model, noise, 1, 5.0, "euler", "normal", positive, negative, latent, seed=0,
                            disable_pbar=True)

    batched = 0
    for key, maps in recorder.maps().items():
        attn2 = spy.modules[key]
        with torch.no_grad():
            positive_k = attn2.to_k(positive[0][0])[0]
        expected_masked, expected_plain = [], []
        for q, k in spy.calls[key]:
            rows = [r for r in range(k.shape[0]) if torch.allclose(k[r], positive_k)]  # found by content
            batched += k.shape[0] > 1 and bool(rows)
            if not rows:
                continue
            closed = closed_by_left_half_gate(q.shape[1], k.shape[1], cat)
            expected_masked.append(attention_by_hand(q[rows], k[rows], attn2.heads, math.log(0.25), closed))
            expected_plain.append(attention_by_hand(q[rows], k[rows], attn2.heads))
        tokens = maps["attention_masked"].shape[0]
        assert maps["attention_masked"].reshape(tokens, -1).T.double() == \
            pytest.approx(torch.stack(expected_masked).mean(0), abs=2e-6, rel=1e-4)
        assert maps["attention_unmasked"].reshape(tokens, -1).T.double() == \
            pytest.approx(torch.stack(expected_plain).mean(0), abs=2e-6, rel=1e-4)
    assert batched, "cond and uncond ran in one batch, so the rows had to be told apart"


@pytest.mark.parametrize("layout, batch, positive", [
    ([1, 0], 4, [2, 3]), ([0, 1], 4, [0, 1]), ([1, 0, 2], 3, [1]), ([1, 2, 0], 6, [4, 5]), (None, 2, [0, 1]),
])
def test_the_recorder_keeps_the_rows_of_the_positive_chunks(layout, batch, positive):
    recorder = MapRecorder(("probability", "hard"))
    probabilities = torch.arange(batch, dtype=torch.float32).reshape(batch, 1, 1).expand(batch, 6, 3) / 10
    extra = {"original_shape": [batch, 4, 2, 3]}
    if layout is not None:
        extra["cond_or_uncond"] = layout
    recorder.gate(LayerKey("input", 4, 0), probabilities, probabilities > 0.25, extra)
    maps = recorder.maps()[LayerKey("input", 4, 0)]
    assert maps["probability"] == pytest.approx(torch.full((3, 2, 3), sum(positive) / 10 / len(positive)))
    assert maps["hard"] == pytest.approx(torch.full((3, 2, 3), sum(r > 2.5 for r in positive) / len(positive)))


def test_a_recorded_map_keeps_each_location_in_place():
    # 2x3 locations, 4 tokens: value = 10 * location + token, so a transposed or mis-flattened map shows.
    recorder = MapRecorder(("probability",), token_groups=[[3], [0, 2]])
    values = (10 * torch.arange(6).reshape(1, 6, 1) + torch.arange(4)).float()
    recorder.gate(LayerKey("middle", 0, 0), values, values > 0, {"original_shape": [1, 4, 2, 3]})
    recorded = recorder.maps()[LayerKey("middle", 0, 0)]["probability"]
    assert recorded.tolist() == [[[3, 13, 23], [33, 43, 53]], [[1, 11, 21], [31, 41, 51]]]


@pytest.mark.parametrize("grouping, expected_rows", [
    ("all", {"all layers": ["input.4.0", "input.7.1", "output.8.0"]}),
    ("block", {"input 4": ["input.4.0"], "input 7": ["input.7.1"], "output 8": ["output.8.0"]}),
    ("stage", {"high stage": ["input.4.0"], "mid stage": ["input.7.1"], "other stage": ["output.8.0"]}),
])
def test_a_row_is_the_mean_of_its_layers_each_cell_read_where_it_lies(grouping, expected_rows):
    # Three layers at three UNet levels of a 10x24 latent (10x24, 5x12, 3x6), two token columns.
    generator = torch.Generator().manual_seed(0)
    maps = {LayerKey("input", 4, 0): torch.rand(2, 10, 24, generator=generator),
            LayerKey("input", 7, 1): torch.rand(2, 5, 12, generator=generator),
            LayerKey("output", 8, 0): torch.rand(2, 3, 6, generator=generator)}
    level = {10: 0, 5: 1, 3: 2}
    by_name = {layer_name(key): value for key, value in maps.items()}

    rows = group_rows(maps, grouping, (LATENT_H, LATENT_W))
    assert [label for label, _ in rows] == list(expected_rows)
    for label, values in rows:
        names = expected_rows[label]
        for y, x in ((0, 0), (9, 23), (4, 11), (7, 17), (9, 0)):
            by_hand = sum(float(by_name[n][1, y // 2 ** level[by_name[n].shape[1]], x // 2 ** level[by_name[n].shape[1]]])
                          for n in names) / len(names)
            assert float(values[1, y, x]) == pytest.approx(by_hand, abs=1e-6)


def test_labels_follow_the_tokenizers_split_with_weights(clip):
    text = "a (red:1.2) cat, (blue sky:0.8) photography of MaskAttnology"
    tokens = clip.tokenize(text)
    labels = token_labels(clip, tokens)
    visible = [label for label in labels if not label.special]

    assert [label.label for label in visible] == ["a", "(red:1.2)", "cat", ",", "(blue:0.8)", "(sky:0.8)",
                                                  "photography", "of", "mask", "att", "nology"]
    assert {label.word for label in visible[-3:]} == {"maskattnology"}
    chunk = tokens["g"][0]
    assert [(chunk[label.position][0], chunk[label.position][1]) for label in visible] == \
        [pair for pair in chunk[1:12]]  # the columns are the tokenizer's own positions
    assert [label.text for label in labels if label.special][:3] == ["<start>", "<end>", "<pad>"]


def test_words_split_inside_a_character_are_labelled_by_whole_characters_and_words(clip):
    text = "a 猫 on a straße, naïve 日本語 (猫:1.2)"
    labels = token_labels(clip, clip.tokenize(text))
    visible = [label for label in labels if not label.special]

    # CLIP's byte-level BPE splits 猫's three UTF-8 bytes over three tokens, ß's two over two.
    assert [label.label for label in visible] == ["a", "…", "…", "猫", "on", "a", "stra", "…", "ß", "e", ",", "na", "ï",
                                                  "ve", "日", "本", "…", "語", "(…:1.2)", "(…:1.2)", "(猫:1.2)"]
    assert [label.word for label in visible[1:4]] == ["猫"] * 3 and {label.word for label in visible[6:10]} == {"straße"}
    assert "".join(label.text for label in visible[6:10]) == "straße"  # each character once, where it completes
    assert select_tokens(labels, "猫") == [[2, 3, 4, 19, 20, 21]]
    assert select_tokens(labels, "Straße, (日本語:0.5)") == [[7, 8, 9, 10], [15, 16, 17, 18]]
    assert select_tokens(labels, "ß") == [[9]]  # a single token still matches by its text


def test_a_word_of_several_tokens_masks_the_mean_of_its_tokens(unet, clip):
    text = "a photo of a 猫"
    tokens = [label.position for label in token_labels(clip, clip.tokenize(text)) if label.word == "猫"]
    assert len(tokens) == 3
    # The gate closes the word's last token on the right half and leaves its other two open everywhere.
    result = visualize_mask(left_half_model(unet, tokens[-1]), clip, text,
                            {"samples": torch.zeros(1, 4, LATENT_H, LATENT_W)},
                            VisualizeOptions(noise_levels=1, grouping="all", words="猫"))
    assert result.mask[:, :, :80].min() > 0.99
    assert result.mask[:, :, 112:] == pytest.approx(torch.full_like(result.mask[:, :, 112:], 2 / 3), abs=0.01)


class HalvesGate(GateHead):
    """A gate of constructed probabilities: token t has probability left[t] on the latent's left half and
    right[t] on its right half; every other token `other`."""

    def __init__(self, feature_dim: int, left: dict, right: dict, other: float):
        super().__init__(feature_dim)
        self.left, self.right, self.other = left, right, other

    def logits(self, x, context, token_features=None):
        def logit(p):
            return math.log(p / (1 - p))

        half = left_half(x.shape[1])[:, None]  # [N, 1]
        logits = torch.full((x.shape[1], context.shape[1]), logit(self.other))
        for token in self.left:
            logits[:, token] = (half * logit(self.left[token]) + (1 - half) * logit(self.right[token]))[:, 0]
        return logits.expand(x.shape[0], -1, -1)


def halves_model(unet, left: dict, right: dict, other: float):
    channels = require_sdxl(unet)
    layers = GateSet.create(MaskAttnConfig(stage="all", share_heads_by_stage=False), channels).layers
    heads = {layer_name(key).replace(".", "_"): HalvesGate(channels[key], left, right, other) for key in layers}
    gates = GateSet(MaskAttnConfig(stage="all"), heads, {layer_name(key): layer_name(key).replace(".", "_") for key in layers})
    return apply_maskattn(unet, gates)


@pytest.mark.parametrize("words, left, right", [
    ("cat, 猫", 0.7, 0.5),  # each word's tokens averaged (猫: (0.9 + 0.3 + 0.3) / 3), the words' maximum per pixel
    ("猫 , Cat", 0.7, 0.5),  # the order of the words and their spelling do not matter
    ("cat", 0.7, 0.2),
    ("photo, 猫", 0.5, 0.5),
    ("", (6 * 0.1 + 0.7 + 1.5) / 10, (6 * 0.1 + 0.2 + 1.5) / 10),  # no words: the 10 drawn tokens averaged
])
def test_the_mask_of_several_words_is_the_maximum_of_each_words_mean(unet, clip, words, left, right):
    text = "a photo of a cat and a 猫"
    labels = [label for label in token_labels(clip, clip.tokenize(text)) if not label.special]
    cat = next(label.position for label in labels if label.text == "cat")
    cat_tokens = [label.position for label in labels if label.word == "猫"]
    assert len(labels) == 10 and len(cat_tokens) == 3
    model = halves_model(unet, {cat: 0.7, **dict(zip(cat_tokens, (0.9, 0.3, 0.3)))},
                         {cat: 0.2, **dict(zip(cat_tokens, (0.9, 0.3, 0.3)))}, other=0.1)
    result = visualize_mask(model, clip, text, {"samples": torch.zeros(1, 4, LATENT_H, LATENT_W)},
                            VisualizeOptions(noise_levels=1, grouping="layer", words=words))

    assert result.mask.shape == (1, LATENT_H * 8, LATENT_W * 8)
    # 96 pixels a side; the bilinear resize blends only the 8 columns either side of the middle.
    # float32 sigmoids of float32 logits, averaged and resized: a few float32 roundings of values below 1, each
    # at most 6e-8, so 1e-5 holds on any CPU (measured 1.2e-7); a wrong combination is off by 0.01 or more.
    assert result.mask[:, :, :88] == pytest.approx(torch.full((1, 80, 88), left), abs=1e-5)
    assert result.mask[:, :, 104:] == pytest.approx(torch.full((1, 80, 88), right), abs=1e-5)


def test_labels_a_font_cannot_draw_use_another_font_or_code_points():
    from maskattn_comfy.render import _FONT, _missing, drawable

    assert _missing(_FONT, "ß") and _missing(_FONT, "猫") and not _missing(_FONT, "a") and not _missing(_FONT, "…")
    assert drawable("cat") == ("cat", _FONT)
    for word, escaped in (("straße", "straU+00DFe"), ("猫", "U+732B")):
        text, font = drawable(word)
        assert (text == word and font is not _FONT and not any(_missing(font, c) for c in word)) or \
            (text == escaped and font is _FONT)


def test_a_prompt_longer_than_77_tokens_labels_every_chunk(pack, unet, clip):
    text = " ".join(["cat"] * 80) + " dog"
    tokens = clip.tokenize(text)
    labels = token_labels(clip, tokens)
    context = clip.encode_from_tokens_scheduled(tokens)[0][0]

    assert len(labels) == context.shape[1] == 154  # one label per context column
    visible = [label for label in labels if not label.special]
    assert len(visible) == 81 and visible[-1].label == "dog"
    assert [label.position for label in labels if label.text == "<start>"] == [0, 77]

    gates = GateSet.create(MaskAttnConfig(), require_sdxl(unet), seed=0)
    result = visualize_mask(apply_maskattn(unet, gates), clip, text, {"samples": torch.zeros(1, 4, 8, 8)},
                            VisualizeOptions(noise_levels=1, words="dog"))
    assert [label.position for label in result.columns] == [label.position for label in visible]  # all drawn ...
    assert result.image.shape[2] <= MAX_WIDTH and result.layout.bands >= 2  # ... in bands, not one wide line
    first, last = result.boxes[("input 7", visible[0].position)], result.boxes[("input 7", visible[-1].position)]
    assert last[1] > first[3] and not result.layout.note
    assert result.mask.shape == (1, 64, 64)


VOCABULARY = "a red cube on top of blue sphere green cat beside yellow dog under bright sky".split()


def note_strip(picture, layout):
    """The note's line of the grid, and the same line drawn alone: equal when the note is there."""
    from PIL import Image, ImageDraw

    from maskattn_comfy.render import _FONT, _NOTE_COLOUR, _PAD, _fit

    alone = Image.new("RGB", picture.size, (255, 255, 255))
    draw = ImageDraw.Draw(alone)
    draw.text((_PAD, _PAD + layout.line), _fit(draw, layout.note, picture.size[0] - 2 * _PAD, _FONT),
              fill=_NOTE_COLOUR, font=_FONT)
    box = (0, _PAD + layout.line, picture.size[0], _PAD + 2 * layout.line)
    return picture.crop(box), alone.crop(box)


@pytest.mark.parametrize("words", [300, 1000])
def test_a_long_prompt_gives_a_bounded_grid_with_a_note_of_what_was_left_out(pack, unet, clip, words):
    from PIL import Image

    text = " ".join(VOCABULARY[i % len(VOCABULARY)] for i in range(words - 1)) + " horse"
    gates = GateSet.create(MaskAttnConfig(stage="all"), require_sdxl(unet), seed=0)  # 11 block rows
    latent = {"samples": torch.zeros(1, 4, 8, 12)}
    result = visualize_mask(apply_maskattn(unet, gates), clip, text, latent,
                            VisualizeOptions(noise_levels=1, words="horse"))

    _, height, width, _ = result.image.shape
    assert width <= MAX_WIDTH and height * width <= MAX_PIXELS
    assert result.image.numel() * result.image.element_size() <= 12 * MAX_PIXELS  # 48 MB as ComfyUI's float IMAGE
    visible = [label for label in result.labels if not label.special]
    assert len(visible) == words and 0 < len(result.columns) < words
    assert result.columns == visible[:len(result.columns)]  # the first tokens, in the prompt's order
    assert result.layout.note.startswith(f"{words - len(result.columns)} of {words} tokens left out "
                                         f"(first {len(result.columns)} drawn)")
    picture = Image.fromarray((result.image[0] * 255).round().to(torch.uint8).numpy())
    drawn, alone = note_strip(picture, result.layout)
    assert drawn.tobytes() == alone.tobytes() and alone.getextrema() != ((255, 255),) * 3
    assert len(result.boxes) == len(result.columns) * len({row for row, _ in result.boxes})
    # The last word is left out of the grid, but the MASK still maps it.
    horse = [label.position for label in visible if label.word == "horse"]
    assert horse and horse[0] not in {label.position for label in result.columns}
    assert result.mask.shape == (1, 64, 96) and float(result.mask.std()) > 0


@pytest.mark.parametrize("rows, columns", [(1, 1), (1, 40), (5, 77), (11, 300), (70, 75), (70, 5000), (1, 20000)])
def test_the_grid_layout_stays_within_its_bounds_and_draws_what_fits(rows, columns):
    labels = [f"input.{r}.0" for r in range(rows)]
    layout = grid_layout(labels, columns, (128, 96))
    width, height = layout.size
    assert width <= MAX_WIDTH and width * height <= MAX_PIXELS
    assert layout.total == columns and 1 <= layout.shown <= columns
    assert bool(layout.note) == (layout.shown < columns)
    if layout.shown < columns:  # nothing left out that a band more or a wider band could hold
        assert layout.cell[0] == 48 or layout.cell[1] == 48
        for bands in range(1, layout.shown + 2):
            wider = dataclasses.replace(layout, per_band=-(-(layout.shown + 1) // bands), shown=layout.shown + 1)
            assert wider.size[0] > MAX_WIDTH or wider.size[0] * wider.size[1] > MAX_PIXELS
    boxes = [layout.cell_box(r, c) for r in range(rows) for c in range(layout.shown)]
    assert all(0 <= l < r <= width and 0 <= t < b <= height for l, t, r, b in boxes)
    assert len(set(boxes)) == len(boxes)  # no two cells overlap at their corner
    assert layout.cell[0] / layout.cell[1] == pytest.approx(128 / 96, abs=0.05)


def test_every_band_of_a_wrapped_grid_labels_each_row_beside_that_rows_own_maps():
    from PIL import Image, ImageDraw

    from maskattn_comfy.render import _FONT, _PAD, colourise

    labels, levels = ["input 4", "middle 0", "output 8"], [0.0, 0.5, 1.0]  # each row's map: one colour of its own
    rows = [(label, torch.full((70, LATENT_H, LATENT_W), level)) for label, level in zip(labels, levels)]
    columns = [TokenLabel(p, f"w{p}", 1.0, f"w{p}", False) for p in range(1, 71)]
    picture, boxes, layout = render_grid(rows, columns, ColourScale(0.0, 1.0, False), "t", latent_size=(LATENT_H, LATENT_W))
    assert layout.bands == 3 and layout.shown == 70
    colours = [tuple((colourise(torch.tensor(level), False) * 255).round().int().tolist()) for level in levels]
    height, width = layout.cell

    firsts = [columns[band * layout.per_band].position for band in range(layout.bands)]
    assert len({boxes[(labels[0], first)][0] for first in firsts}) == 1  # every band starts at the same x
    x = boxes[(labels[0], firsts[0])][0] + width // 2  # the middle of each band's first column
    runs, y = [], 0
    while y < picture.height:  # the cells down that column of pixels, found by their colour, not by cell_box
        if picture.getpixel((x, y)) in colours:
            top = y
            while y < picture.height and picture.getpixel((x, y)) == picture.getpixel((x, top)):
                y += 1
            runs.append((top, y, colours.index(picture.getpixel((x, top)))))
        y += 1
    assert [row for _, _, row in runs] == [0, 1, 2] * 3  # each band holds every row once, in the UNet's order
    assert all(bottom - top == height for top, bottom, _ in runs)
    for index, (top, bottom, row) in enumerate(runs):
        alone = Image.new("RGB", picture.size, (255, 255, 255))
        ImageDraw.Draw(alone).text((_PAD, top + (height - layout.line) // 2), labels[row], fill=(0, 0, 0), font=_FONT)
        box = (0, top, layout.label_width, bottom)
        assert alone.crop(box).getextrema() != ((255, 255),) * 3
        assert picture.crop(box).tobytes() == alone.crop(box).tobytes(), (index // 3, labels[row])  # band, row


def test_the_same_seed_gives_the_same_bytes_and_another_seed_other_ones(pack, unet, clip, monkeypatch):
    import comfy.utils

    progress = []
    monkeypatch.setattr(comfy.utils, "PROGRESS_BAR_HOOK", lambda value, total, preview, node_id=None: progress.append((value, total)))
    model = apply_maskattn(unet, GateSet.create(MaskAttnConfig(), require_sdxl(unet), seed=0))
    text = "a photo of a cat"
    first = run_node(pack, model, clip, text, seed=1)
    assert progress == [(1, 2), (2, 2)], "the progress bar advances once per noise level"
    again = run_node(pack, model, clip, text, seed=1)
    other = run_node(pack, model, clip, text, seed=2)

    assert first.args[0].numpy().tobytes() == again.args[0].numpy().tobytes()
    assert first.args[1].numpy().tobytes() == again.args[1].numpy().tobytes()
    assert first.args[0].shape == other.args[0].shape  # the title and labels do not depend on the seed ...
    assert first.args[0].numpy().tobytes() != other.args[0].numpy().tobytes()  # ... the maps do
    assert first.ui.as_dict()["images"], "the grid is returned for the UI preview"


@pytest.mark.parametrize("change, message", [
    (dict(model="plain"), "no MaskAttn gates"),
    (dict(text="   "), "prompt is empty"),
    (dict(words="cat, horse"), "'horse' is not in the prompt"),
    (dict(batch_index=2), "holds 2 image(s), so batch_index must be 0 to 1"),
])
def test_bad_inputs_are_named(pack, unet, clip, change, message):
    model = unet if change.pop("model", None) else apply_maskattn(unet, GateSet.create(MaskAttnConfig(), require_sdxl(unet)))
    text = change.pop("text", "a photo of a cat")
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        run_node(pack, model, clip, text, latent={"samples": torch.zeros(2, 4, 8, 8)}, **change)


def test_an_image_input_shows_under_the_map():
    columns = [TokenLabel(1, "cat", 1.0, "cat", False)]
    rows = [("all layers", torch.ones(1, 4, 6))]  # gate probability 1 everywhere: the top colour
    red = torch.zeros(32, 48, 3)
    red[..., 0] = 1.0
    plain, boxes, _ = render_grid(rows, columns, ColourScale(0.0, 1.0, False), "t")
    over, _, _ = render_grid(rows, columns, ColourScale(0.0, 1.0, False), "t", image=red)
    left, top, right, bottom = boxes[("all layers", 1)]
    expected = torch.tensor(TOP_COLOUR) * 0.6 + torch.tensor((255, 0, 0)) * 0.4
    assert torch.tensor(plain.getpixel((left + 5, top + 5))).tolist() == list(TOP_COLOUR)
    assert (torch.tensor(over.getpixel((left + 5, top + 5))) - expected).abs().max() <= 1


@pytest.mark.parametrize("channels", [4, 1])
def test_an_rgba_or_greyscale_image_input_shows_under_the_map(unet, clip, channels):
    text = "a photo of a cat"
    photo_token = next(label.position for label in token_labels(clip, clip.tokenize(text)) if label.text == "photo")
    image = torch.zeros(1, LATENT_H * 8, LATENT_W * 8, channels)
    if channels == 4:  # opaque red on the left, see-through green on the right: white where see-through
        image[..., :96, 0] = 1.0
        image[..., 96:, 1] = 1.0
        image[..., :96, 3] = 1.0
        left_colour, right_colour = (255, 0, 0), (255, 255, 255)
    else:  # greyscale: white left, mid-grey right
        image[..., :96, 0] = 1.0
        image[..., 96:, 0] = 0.5
        left_colour, right_colour = (255, 255, 255), (127.5, 127.5, 127.5)
    result = visualize_mask(left_half_model(unet, photo_token + 3), clip, text,  # "cat" gated, "photo" open
                            {"samples": torch.zeros(1, 4, LATENT_H, LATENT_W)},
                            VisualizeOptions(noise_levels=1, grouping="all"), image=image)

    left, top, right, bottom = result.boxes[("all layers", photo_token)]  # gate open everywhere: the top colour
    cell = (result.image[0, top:bottom, left:right] * 255).round()
    quarter = (right - left) // 4
    for part, colour in ((cell[:, :quarter], left_colour), (cell[:, -quarter:], right_colour)):
        expected = torch.tensor(TOP_COLOUR) * 0.6 + torch.tensor(colour) * 0.4
        assert (part - expected).abs().max() <= 1.5
    assert result.mask.shape == (1, LATENT_H * 8, LATENT_W * 8)


@pytest.mark.parametrize("shape", [(1, 80, 192, 2), (80, 192, 3)])
def test_an_image_of_another_layout_is_named(unet, clip, shape):
    model = apply_maskattn(unet, GateSet.create(MaskAttnConfig(), require_sdxl(unet)))
    with pytest.raises(ValueError, match=re.escape(f"IMAGE [batch, height, width, 1, 3 or 4 channels]; got shape {shape}")):
        visualize_mask(model, clip, "a cat", {"samples": torch.zeros(1, 4, LATENT_H, LATENT_W)},
                       VisualizeOptions(noise_levels=1), image=torch.zeros(shape))


def test_layer_grids_follow_the_unets_rounding_without_activations_shape():
    from maskattn_comfy.recording import layer_grid

    assert layer_grid({"original_shape": [1, 4, 104, 152]}, 52 * 76) == (52, 76)  # 832x1216 pixels
    assert layer_grid({"original_shape": [1, 4, 104, 152]}, 26 * 38) == (26, 38)
    assert layer_grid({"original_shape": [1, 4, 13, 19]}, 4 * 5) == (4, 5)  # 13 -> 7 -> 4, 19 -> 10 -> 5
    with pytest.raises(ValueError, match="match no UNet level of a 13x19 latent"):
        layer_grid({"original_shape": [1, 4, 13, 19]}, 3 * 5)
