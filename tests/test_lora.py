"""lora.py against peft (diffusers' `unet.add_adapter(LoraConfig(...))`) on the same base and adapter weights."""
import pytest
import torch
from diffusers import UNet2DConditionModel
from peft import LoraConfig

from lora import TARGETS, LoRALinear, add_lora, lora_state_dict, merge_lora
from reference import unet_to_diffusers
from unet import UNet, UNetConfig

CFG = UNetConfig(block_channels=(32, 64), attention_levels=(True, True), num_heads=(2, 4), context_dim=48,
                 linear_projection=True, norm_groups=8, style=True)


def peft_and_ours(rank=4, alpha=8.0):
    """A diffusers U-Net with a peft adapter whose B is random (not its zero init), and ours carrying both."""
    torch.manual_seed(0)
    ref = UNet2DConditionModel(**unet_to_diffusers(CFG)).eval()
    ref.add_adapter(LoraConfig(r=rank, lora_alpha=alpha, target_modules=list(TARGETS), init_lora_weights="gaussian"))
    with torch.no_grad():
        for name, p in ref.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.05)
    ours = UNet(CFG).eval()
    base = {k.replace(".base_layer.", "."): v for k, v in ref.state_dict().items() if "lora_" not in k}
    ours.load_state_dict(base, strict=False)
    names = add_lora(ours, rank, alpha)
    adapters = {k.replace(".default.", "."): v for k, v in ref.state_dict().items() if "lora_" in k}
    missing, unexpected = ours.load_state_dict(adapters, strict=False)
    assert unexpected == [] and set(adapters) == set(lora_state_dict(ours))
    return ref, ours, names


def inputs():
    torch.manual_seed(1)
    return torch.randn(2, 4, 8, 8), torch.tensor([10, 700]), torch.randn(2, 7, CFG.context_dim)


def test_forward_matches_peft_and_merges():
    ref, ours, names = peft_and_ours()
    blocks = sum(1 for n, _ in ours.named_modules() if n.endswith(".transformer_blocks.0"))
    assert len(names) == 4 * 2 * blocks  # 4 projections x (attn1, attn2) in every transformer block
    assert all(".attn_style." not in n for n in names)
    x, t, c = inputs()
    with torch.no_grad():
        want = ref(x, t, encoder_hidden_states=c).sample
        got = ours(x, t, c)
        err = (got - want).abs().max().item()
        print(f"LoRA forward vs peft: max abs error {err:.2e}")
        assert err < 1e-5
        assert merge_lora(ours) == len(names)
        assert not any(isinstance(m, LoRALinear) for m in ours.modules())
        merged_err = (ours(x, t, c) - want).abs().max().item()
        print(f"merged vs peft: max abs error {merged_err:.2e}")
        assert merged_err < 1e-5


def test_starts_as_the_base_model_and_trains_only_the_adapters():
    torch.manual_seed(0)
    model = UNet(CFG)
    x, t, c = inputs()
    with torch.no_grad():
        before = model(x, t, c)
    add_lora(model, rank=2, alpha=2.0)
    with torch.no_grad():
        assert torch.equal(model(x, t, c), before)  # B = 0
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    adapted_base = [n for n, p in model.named_parameters() if not p.requires_grad]
    assert adapted_base and all(".attn1." in n or ".attn2." in n for n in adapted_base)
    assert any(".lora_A." in n for n in trainable) and any(".attn_style." in n for n in trainable)
    model(x, t, c).square().mean().backward()
    grads = {n for n, p in model.named_parameters() if p.grad is not None}
    assert any(".lora_B." in n for n in grads) and not any(n in grads for n in adapted_base)


@pytest.mark.parametrize("rank", [1, 8])
def test_adapter_size(rank):
    model = UNet(CFG)
    add_lora(model, rank=rank, alpha=rank)
    n = sum(v.numel() for v in lora_state_dict(model).values())
    expected = sum(rank * (lin.weight.shape[0] + lin.weight.shape[1])
                   for lin in model.modules() if isinstance(lin, LoRALinear))
    assert n == expected


def test_our_adapters_load_into_peft():
    """The other way: adapters trained with ours (B random here) carry peft's names minus `.default`, so diffusers'
    U-Net with peft's adapter loads them (and our base weights under `base_layer`) and computes the same."""
    torch.manual_seed(0)
    ours = UNet(CFG).eval()
    add_lora(ours, rank=4, alpha=2.0)
    with torch.no_grad():
        for name, p in ours.named_parameters():
            if ".lora_B." in name:
                p.normal_(0, 0.05)
    ref = UNet2DConditionModel(**unet_to_diffusers(CFG)).eval()
    ref.add_adapter(LoraConfig(r=4, lora_alpha=2.0, target_modules=list(TARGETS)))
    adapted = {n.rsplit(".", 1)[0] for n in lora_state_dict(ours) if ".lora_A." in n}  # "<module>.lora_A"
    peft_names = {}
    for k, v in ours.state_dict().items():
        module = k.rsplit(".", 1)[0]
        if ".lora_" in k:
            peft_names[k.replace(".lora_A.", ".lora_A.default.").replace(".lora_B.", ".lora_B.default.")] = v
        elif f"{module}.lora_A" in adapted:
            peft_names[f"{module}.base_layer.{k.rsplit('.', 1)[1]}"] = v
        elif ".attn_style." not in k and ".norm_style." not in k:
            peft_names[k] = v
    missing, unexpected = ref.load_state_dict(peft_names, strict=False)
    assert missing == [] and unexpected == []
    x, t, c = inputs()
    with torch.no_grad():
        err = (ours(x, t, c) - ref(x, t, encoder_hidden_states=c).sample).abs().max().item()
    print(f"ours -> peft: max abs error {err:.2e}")
    assert err < 1e-5
