"""T2T-ViT: official key names and sizes, the token-layer math, checkpoints, other sizes, export."""

from __future__ import annotations

import math

import numpy as np
import pytest
import timm
import torch
import torch.nn.functional as F

from t2tedge.errors import CheckpointError, UnknownModelError
from t2tedge.models import t2t_vit
from t2tedge.models.spec import get_spec
from t2tedge.models.t2t_vit import T2TViT, TokenPerformer, TokenTransformer, checkpoint_filter_fn

MAIN_VARIANTS = [f"t2t_vit_{d}" for d in (7, 10, 12, 14, 19, 24)] + [f"t2t_vit_t_{d}" for d in (14, 19, 24)]


def tiny(name: str = "t2t_vit_7", size: int = 32, seed: int = 0, **kwargs: object) -> T2TViT:
    """A 2-block model: fast on CPU, same token layers and key layout as the full one."""
    torch.manual_seed(seed)
    return get_spec(name).create(num_classes=10, image_size=size, depth=2, **kwargs)


def on_meta(name: str, **kwargs: object) -> T2TViT:
    """Shapes and keys only, without allocating 64M parameters."""
    with torch.device("meta"):
        return get_spec(name).builder(num_classes=1000, image_size=224, **kwargs)


@pytest.mark.parametrize("name", MAIN_VARIANTS)
def test_param_count_matches_paper(name: str) -> None:
    # The paper counts every parameter, the frozen sinusoid table and performer features included
    # (trainable-only leaves t2t_vit_7 at 4.256M, > 1 % under 4.3M); the _t variants have no
    # performer `w` and are quoted with their performer twin's count.
    model = on_meta(name)
    total_m = sum(p.numel() for p in model.parameters()) / 1e6
    paper_m = get_spec(name).paper.params_m
    assert paper_m is not None
    assert abs(total_m - paper_m) / paper_m < 0.01, (total_m, paper_m)


def test_paper_counts_frozen_tensors() -> None:
    model = on_meta("t2t_vit_7")
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    frozen = {n: p.numel() for n, p in model.named_parameters() if not p.requires_grad}
    assert frozen == {
        "pos_embed": 197 * 256,
        "tokens_to_token.attention1.w": 32 * 64,
        "tokens_to_token.attention2.w": 32 * 64,
    }
    assert abs(trainable / 1e6 - 4.3) / 4.3 > 0.01


def _expected_keys(token_layer: list[str], depth: int) -> set[str]:
    block = [
        "norm1.weight", "norm1.bias", "attn.qkv.weight", "attn.proj.weight", "attn.proj.bias",
        "norm2.weight", "norm2.bias", "mlp.fc1.weight", "mlp.fc1.bias", "mlp.fc2.weight", "mlp.fc2.bias",
    ]  # fmt: skip
    keys = {"cls_token", "pos_embed", "tokens_to_token.project.weight", "tokens_to_token.project.bias"}
    keys |= {f"tokens_to_token.attention{i}.{k}" for i in (1, 2) for k in token_layer}
    keys |= {f"blocks.{i}.{k}" for i in range(depth) for k in block}
    return keys | {"norm.weight", "norm.bias", "head.weight", "head.bias"}


def test_state_dict_keys_follow_official_naming() -> None:
    performer = [
        "kqv.weight", "kqv.bias", "proj.weight", "proj.bias", "norm1.weight", "norm1.bias",
        "norm2.weight", "norm2.bias", "mlp.0.weight", "mlp.0.bias", "mlp.2.weight", "mlp.2.bias", "w",
    ]  # fmt: skip
    transformer = [
        "norm1.weight", "norm1.bias", "attn.qkv.weight", "attn.proj.weight", "attn.proj.bias",
        "norm2.weight", "norm2.bias", "mlp.fc1.weight", "mlp.fc1.bias", "mlp.fc2.weight", "mlp.fc2.bias",
    ]  # fmt: skip
    sd = on_meta("t2t_vit_7").state_dict()
    assert set(sd) == _expected_keys(performer, 7)
    assert set(on_meta("t2t_vit_t_14").state_dict()) == _expected_keys(transformer, 14)
    shapes = {
        "tokens_to_token.attention1.kqv.weight": (192, 147),
        "tokens_to_token.attention2.kqv.weight": (192, 576),
        "tokens_to_token.attention1.w": (32, 64),
        "tokens_to_token.project.weight": (256, 576),
        "pos_embed": (1, 197, 256),
        "blocks.0.attn.qkv.weight": (768, 256),
        "head.weight": (1000, 256),
    }
    assert {k: tuple(sd[k].shape) for k in shapes} == shapes
    assert tuple(on_meta("t2t_vit_24").state_dict()["pos_embed"].shape) == (1, 197, 512)


def test_sinusoid_table_matches_official_formula() -> None:
    n, d = 17, 64
    angle = np.array([[p / np.power(10000, 2 * (j // 2) / d) for j in range(d)] for p in range(n)])
    angle[:, 0::2], angle[:, 1::2] = np.sin(angle[:, 0::2]), np.cos(angle[:, 1::2])
    assert torch.equal(t2t_vit.sinusoid_table(n, d), torch.FloatTensor(angle).unsqueeze(0))


def _ln(x: torch.Tensor, p: dict[str, torch.Tensor], name: str) -> torch.Tensor:
    return F.layer_norm(x, (x.shape[-1],), p[f"{name}.weight"], p[f"{name}.bias"])


def performer_reference(layer: TokenPerformer, x: torch.Tensor) -> torch.Tensor:
    """DESIGN.md formulas, written as an explicit (T x T) kernel matrix instead of the factored form."""
    p = {k: v.double() for k, v in layer.state_dict().items()}
    x = _ln(x.double(), p, "norm1")
    k, q, v = F.linear(x, p["kqv.weight"], p["kqv.bias"]).chunk(3, dim=-1)
    w = p["w"]

    def phi(u: torch.Tensor) -> torch.Tensor:
        return torch.exp(u @ w.T - (u**2).sum(-1, keepdim=True) / 2) / math.sqrt(w.shape[0])

    kernel = phi(q) @ phi(k).transpose(1, 2)  # kernel[b, t, s] = phi(q_t) . phi(k_s)
    y = (kernel @ v) / (kernel.sum(-1, keepdim=True) + 1e-8)
    y = v + F.linear(y, p["proj.weight"], p["proj.bias"])
    hidden = F.gelu(F.linear(_ln(y, p, "norm2"), p["mlp.0.weight"], p["mlp.0.bias"]))
    return y + F.linear(hidden, p["mlp.2.weight"], p["mlp.2.bias"])


def transformer_reference(layer: TokenTransformer, x: torch.Tensor) -> torch.Tensor:
    p = {k: v.double() for k, v in layer.state_dict().items()}
    x = _ln(x.double(), p, "norm1")
    q, k, v = F.linear(x, p["attn.qkv.weight"]).chunk(3, dim=-1)
    attn = torch.softmax(q @ k.transpose(1, 2) / math.sqrt(x.shape[-1]), dim=-1)  # input width
    y = v + F.linear(attn @ v, p["attn.proj.weight"], p["attn.proj.bias"])
    hidden = F.gelu(F.linear(_ln(y, p, "norm2"), p["mlp.fc1.weight"], p["mlp.fc1.bias"]))
    return y + F.linear(hidden, p["mlp.fc2.weight"], p["mlp.fc2.bias"])


@pytest.mark.parametrize("dim", [147, 576])
def test_token_layers_match_reference(dim: int) -> None:
    torch.manual_seed(0)
    x = torch.randn(2, 49, dim)
    for layer, reference in (
        (TokenPerformer(dim, 64), performer_reference),
        (TokenTransformer(dim, 64), transformer_reference),
    ):
        with torch.no_grad():  # non-trivial norms and biases (they are exactly 1/0 at init)
            for param in layer.parameters():
                param.add_(torch.randn_like(param) * 0.02)
        layer.eval()
        out = layer.double()(x.double())
        assert torch.allclose(out, reference(layer, x), atol=1e-10), type(layer).__name__


def test_t2t_module_folds_tokens_back_row_major() -> None:
    model = tiny("t2t_vit_7", size=48)
    t2t = model.tokens_to_token
    x = torch.randn(1, 3, 48, 48)
    ref = t2t.attention1(F.unfold(x, 7, stride=4, padding=2).transpose(1, 2))
    ref = ref.transpose(1, 2).reshape(1, 64, 12, 12)  # official: int(np.sqrt(N)) on each side
    ref = t2t.attention2(F.unfold(ref, 3, stride=2, padding=1).transpose(1, 2))
    ref = ref.transpose(1, 2).reshape(1, 64, 6, 6)
    ref = t2t.project(F.unfold(ref, 3, stride=2, padding=1).transpose(1, 2))
    with torch.no_grad():
        assert torch.allclose(t2t(x), ref, atol=1e-6)


@pytest.mark.parametrize("name", ["t2t_vit_7", "t2t_vit_t_14"])
@pytest.mark.parametrize("size", [32, 48])
def test_export_form_computes_the_same_function(name: str, size: int) -> None:
    model = tiny(name, size=size)
    with torch.no_grad():  # LayerNorm weight 1 / bias 0 would hide a wrong feature order
        for param in model.parameters():
            param.add_(torch.randn_like(param) * 0.05)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    exported = model.export_form()
    x = torch.randn(2, 3, size, size, dtype=torch.float64)
    with torch.no_grad():
        assert torch.allclose(exported.double()(x), model.double()(x), atol=1e-10)
    assert exported.state_dict().keys() == before.keys()  # index buffers are not persistent
    assert all(torch.equal(model.state_dict()[k].float(), v) for k, v in before.items())  # a copy: model untouched
    # the patch-reading weights are reordered, not left as they were
    key = "tokens_to_token.project.weight"
    assert not torch.equal(exported.state_dict()[key].float(), before[key])


def test_export_form_graph_has_no_soft_split_transposes(tmp_path) -> None:
    import onnx

    from t2tedge.pipeline.export import export_onnx

    export_onnx(tiny("t2t_vit_7"), 32, tmp_path / "m.onnx")

    def outside_token_layers(node: onnx.NodeProto) -> bool:
        namespace = next((p.value for p in node.metadata_props if p.key == "namespace"), "")
        return "T2TModule" in namespace and "attention" not in namespace

    t2t_nodes = [n.op_type for n in onnx.load(tmp_path / "m.onnx").graph.node if outside_token_layers(n)]
    # nn.Unfold's form has 3 transposes inside the unfolds and 5 around them; the image's
    # (B, C, H*W) -> (B, H*W, C) is the one left
    assert t2t_nodes.count("Transpose") == 1
    assert t2t_nodes.count("Gather") == 3


def test_official_format_checkpoint_reloads_strictly(tmp_path) -> None:
    from t2tedge.models.checkpoint import load_state_dict_file

    source = tiny("t2t_vit_7", seed=1)
    path = tmp_path / "x.pth.tar"
    torch.save({"state_dict_ema": {"module." + k: v for k, v in source.state_dict().items()}, "epoch": 3}, path)
    fresh = tiny("t2t_vit_7", seed=2)
    fresh.load_state_dict(load_state_dict_file(path), strict=True)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(fresh(x), source(x))


@pytest.mark.parametrize("size", [32, 48, 64])
def test_other_image_sizes(size: int) -> None:
    model = tiny("t2t_vit_t_14", size=size)
    assert tuple(model.pos_embed.shape) == (1, (size // 16) ** 2 + 1, 384)
    with torch.no_grad():
        assert model(torch.randn(1, 3, size, size)).shape == (1, 10)


def test_image_size_must_be_multiple_of_16() -> None:
    with pytest.raises(UnknownModelError, match="multiple of 16"):
        get_spec("t2t_vit_7").create(num_classes=10, image_size=40)
    with pytest.raises(ValueError, match="multiple of 16"):
        T2TViT(img_size=40)


def test_qk_scale_default_is_head_dim_and_explicit_value_changes_outputs() -> None:
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        default = tiny()(x)
        head_dim = tiny(qk_scale=64**-0.5)(x)  # t2t_vit_7: 256 wide, 4 heads
        embed = tiny(qk_scale=256**-0.5)(x)  # what the official pretrained=True constructors use
    assert torch.equal(default, head_dim)
    assert not torch.allclose(default, embed)


def test_checkpoint_filter_regenerates_pos_embed_for_another_size() -> None:
    source = tiny(size=224)
    target = tiny(size=64, seed=5)
    adapted = checkpoint_filter_fn(source.state_dict(), target)
    assert tuple(source.state_dict()["pos_embed"].shape) == (1, 197, 256)
    target.load_state_dict(adapted, strict=True)
    assert torch.equal(target.pos_embed, t2t_vit.sinusoid_table(17, 256))
    assert torch.equal(target.head.weight, source.head.weight)
    same = tiny(size=224, seed=3).state_dict()
    assert checkpoint_filter_fn(same, source) is same  # nothing to fix at the same size


def test_specs_carry_preprocessing_and_paper_facts() -> None:
    spec = get_spec("t2t_vit_14")
    assert (spec.family, spec.size_multiple, spec.classifier_key) == ("t2t_vit", 16, "head.weight")
    assert (spec.preprocess.input_size, spec.preprocess.resize_size, spec.preprocess.interpolation) == (
        224,
        248,
        "bicubic",
    )
    assert spec.paper.top1 == 81.5 and spec.checkpoint_filter is checkpoint_filter_fn
    assert spec.pretrained_url.endswith("81.5_T2T_ViT_14.pth.tar")
    assert get_spec("t2t_vit_14_wide").pretrained_url is None


def test_timm_create_model() -> None:
    model = timm.create_model("t2t_vit_14", num_classes=10, img_size=64)
    assert isinstance(model, T2TViT) and model.img_size == 64
    with torch.no_grad():
        assert model.eval()(torch.randn(1, 3, 64, 64)).shape == (1, 10)
    assert timm.data.resolve_data_config({}, model=model)["interpolation"] == "bicubic"
    with pytest.raises(CheckpointError, match="t2tedge"):
        timm.create_model("t2t_vit_7", pretrained=True)


@pytest.mark.parametrize("name", ["t2t_vit_7", "t2t_vit_t_14"])
def test_onnx_export_legacy_opset17(name: str, tmp_path) -> None:
    model = tiny(name)
    path = tmp_path / "model.onnx"
    torch.onnx.export(model, (torch.randn(1, 3, 32, 32),), str(path), dynamo=False, opset_version=17)
    import onnxruntime as ort

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    name_in = session.get_inputs()[0].name
    generator = torch.Generator().manual_seed(1)
    outputs = []
    for _ in range(3):  # several images: a graph that ignored its input would match only by chance
        x = torch.randn(1, 3, 32, 32, generator=generator)
        with torch.no_grad():
            expected = model(x).numpy()
        got = session.run(None, {name_in: x.numpy()})[0]
        assert got.shape == expected.shape
        np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-5 * max(1.0, float(np.abs(expected).max())))
        outputs.append(got)
    assert not np.allclose(outputs[0], outputs[1])
