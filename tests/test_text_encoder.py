"""text_encoder.py against transformers' CLIPTextModel / CLIPTokenizer and open_clip.

Random tiny models (width 64): no pretrained weights exist offline. SD 2 mode = GELU + zero
padding; SD 1 mode = QuickGELU + end-token padding.
"""
import gzip
import json

import open_clip
import pytest
import torch
from open_clip.tokenizer import default_bpe
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

from convert import hf_clip_to_open_clip, text_config_from_hf
from text_encoder import EOT_TOKEN, TextConfig, TextEncoder, tokenize

PROMPTS = [
    "a photo of a cat",
    "",
    "An astronaut riding a horse, 4k, trending on artstation",
    "handwritten digit 7, in the style of class 3",
    "it's a don't-stop 3.5 cats; (blue) & [red]",
    " ".join(["many words here"] * 40),  # 121 words: longer than 77 tokens, truncated
]
MODES = {"sd2": "gelu", "sd1": "quick_gelu"}


def tiny_hf_model(act: str, seed: int = 0) -> CLIPTextModel:
    torch.manual_seed(seed)
    config = CLIPTextConfig(hidden_size=64, intermediate_size=256, num_attention_heads=4,
                            num_hidden_layers=2, hidden_act=act, vocab_size=49408,
                            max_position_embeddings=77)
    model = CLIPTextModel(config).eval()
    with torch.no_grad():  # HF initialises LayerNorms to (1, 0): perturb everything so that no
        for p in model.parameters():  # mapping mistake can hide behind identical values
            p.add_(0.05 * torch.randn_like(p))
    return model


@pytest.mark.parametrize("mode", list(MODES))
@pytest.mark.parametrize("prefix", ["text_model.", ""])
def test_matches_transformers_clip_text_model(mode, prefix):
    hf = tiny_hf_model(MODES[mode])
    state = {prefix + k: v for k, v in hf.state_dict().items()}
    if prefix:  # transformers-4 files (the SD repositories) also carry the position_ids buffer
        state[prefix + "embeddings.position_ids"] = torch.arange(77)[None]

    ours = TextEncoder(text_config_from_hf(hf.config.to_dict(), mode)).eval()
    assert ours.cfg == TextConfig.tiny(mode)
    ours.load_state_dict(hf_clip_to_open_clip(state), strict=True)

    tokens = ours.tokenize(PROMPTS)
    with torch.no_grad():
        expected = hf(input_ids=tokens).last_hidden_state  # what the SD pipelines use
        got = ours(tokens)
    assert got.shape == (len(PROMPTS), 77, 64)
    err = (got - expected).abs().max().item()
    print(f"\n{mode} ({MODES[mode]}), keys '{prefix}*': TextEncoder vs CLIPTextModel max abs err {err:.2e}")
    assert err <= 1e-4


def test_penultimate_equals_open_clip_minus_last_block():
    """SD 2's "penultimate" rule: a 23-block tower == open_clip's 24-block TextTransformer with
    the last block skipped, then ln_final (ldm FrozenOpenCLIPEmbedder(layer="penultimate"))."""
    torch.manual_seed(0)
    full = open_clip.transformer.TextTransformer(width=64, heads=4, layers=3, output_dim=32).eval()
    with torch.no_grad():
        for p in full.parameters():
            p.add_(0.05 * torch.randn_like(p))
    ours = TextEncoder(TextConfig(width=64, heads=4, layers=2)).eval()
    state = {k: v for k, v in full.state_dict().items()
             if not k.startswith(("transformer.resblocks.2.", "text_projection"))}
    ours.load_state_dict(state, strict=True)
    tokens = tokenize(PROMPTS)
    with torch.no_grad():
        out = full.forward_intermediates(tokens, indices=[1], normalize_intermediates=True,
                                         intermediates_only=True, output_fmt="NLC")
        expected = out["text_intermediates"][0]
        err = (ours(tokens) - expected).abs().max().item()
    print(f"\npenultimate: TextEncoder (2 blocks) vs open_clip 3-block tower, block 2 skipped: max abs err {err:.2e}")
    assert err <= 1e-5


def test_tokenizer_matches_open_clip_sd2():
    ours, ref = tokenize(PROMPTS, pad="zero"), open_clip.tokenize(PROMPTS)
    assert ours.dtype == torch.long and ours.shape == (len(PROMPTS), 77)
    assert torch.equal(ours, ref)
    assert ours[-1, -1] == EOT_TOKEN  # truncated prompt keeps its end token


@pytest.fixture(scope="module")
def hf_tokenizer_files(tmp_path_factory):
    """vocab.json + merges.txt of the CLIP BPE, written from open_clip's bundled vocabulary
    (the same 49408 tokens as the SD repositories' tokenizer files)."""
    folder = tmp_path_factory.mktemp("clip_tokenizer")
    from text_encoder import bpe_tokenizer
    names = {"<start_of_text>": "<|startoftext|>", "<end_of_text>": "<|endoftext|>"}
    vocab = {names.get(k, k): v for k, v in bpe_tokenizer().encoder.items()}
    (folder / "vocab.json").write_text(json.dumps(vocab))
    merges = gzip.open(default_bpe()).read().decode("utf-8").split("\n")[1:49152 - 256 - 2 + 1]
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")
    return str(folder / "vocab.json"), str(folder / "merges.txt")


@pytest.mark.parametrize("mode", list(MODES))
def test_tokenizer_matches_sd_pipeline_tokenizer(mode, hf_tokenizer_files):
    """The SD pipelines call CLIPTokenizer(padding="max_length", max_length=77, truncation=True).
    SD 1.5's tokenizer pads with <|endoftext|> (49407), SD 2's with "!" (id 0)."""
    pad_token = "<|endoftext|>" if mode == "sd1" else "!"
    hf = CLIPTokenizer(*hf_tokenizer_files, pad_token=pad_token)
    expected = hf(PROMPTS, padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids
    ours = TextEncoder(TextConfig.tiny(mode)).tokenize(PROMPTS)
    assert torch.equal(ours, expected)
    if mode == "sd1":
        first_eot = (ours[0] == EOT_TOKEN).nonzero()[0, 0]
        assert (ours[0, first_eot:] == EOT_TOKEN).all()


def test_sd2_exclamation_mark_follows_open_clip():
    """A documented difference: diffusers' SD 2 tokenizer registers its pad token "!" as a special
    token, so a "!" in a prompt becomes id 0; open_clip (ldm, what SD 2 was trained with) encodes it
    as "!</w>" (256). We follow open_clip."""
    ours = tokenize(["wow!"], pad="zero")
    assert torch.equal(ours, open_clip.tokenize(["wow!"]))
    assert 256 in ours[0].tolist()


def test_state_dict_names_are_open_clip_and_sd_only():
    ours = TextEncoder(TextConfig.tiny())
    names = set(ours.state_dict())
    assert {"token_embedding.weight", "positional_embedding", "ln_final.weight",
            "transformer.resblocks.1.attn.in_proj_weight", "transformer.resblocks.1.mlp.c_proj.bias"} <= names
    assert not any("text_projection" in n or "attn_mask" in n for n in names)
    assert len(ours.transformer.resblocks) == 2
    sd21 = TextConfig.sd21()
    assert (sd21.width, sd21.heads, sd21.layers, sd21.act, sd21.pad) == (1024, 16, 23, "gelu", "zero")
    sd15 = TextConfig.sd15()
    assert (sd15.width, sd15.heads, sd15.layers, sd15.act, sd15.pad) == (768, 12, 12, "quick_gelu", "eos")


def test_converter_rejects_foreign_or_incomplete_state_dicts():
    state = tiny_hf_model("gelu").state_dict()
    with pytest.raises(ValueError, match="unexpected key 'vision_model"):
        hf_clip_to_open_clip({**state, "vision_model.post_layernorm.weight": torch.ones(64)})
    incomplete = {k: v for k, v in state.items() if "layers.1.self_attn.k_proj.bias" not in k}
    with pytest.raises(ValueError, match="block 1 has only"):
        hf_clip_to_open_clip(incomplete)
    with pytest.raises(ValueError, match="second time"):
        hf_clip_to_open_clip({**state, **{"text_model." + k: v for k, v in state.items()}})


def test_gradients_and_bf16_autocast():
    ours = TextEncoder(TextConfig.tiny("sd1")).train()
    tokens = ours.tokenize(PROMPTS[:3])
    ours(tokens).square().mean().backward()
    missing = [n for n, p in ours.named_parameters() if p.grad is None]
    assert not missing, f"no gradient reached {missing}"
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        out = ours.eval()(tokens)
    assert out.shape == (3, 77, 64) and torch.isfinite(out).all()
    with pytest.raises(ValueError, match="tokenize"):
        ours(torch.zeros(2, 78, dtype=torch.long))
