"""T2T-ViT (Yuan et al. 2021, "Tokens-to-Token ViT"), written for export.

State-dict keys and math equal the official yitu-opensource/T2T-ViT code, so its ``.pth.tar``
checkpoints load with ``strict=True``. What differs is plumbing: every spatial size is a Python int
fixed at construction (the official code calls ``int(np.sqrt(N))`` on tensor shapes), so ONNX,
``torch.export`` and Core ML see a static graph.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable
from functools import partial
from typing import Any

import timm.models
import torch
from timm.layers import DropPath, trunc_normal_
from torch import nn
from torch.nn import functional as F

from t2tedge.errors import CheckpointError
from t2tedge.models.spec import ModelSpec, PaperFacts, Preprocess, QuantizationHints, register

__all__ = ["T2TViT", "checkpoint_filter_fn", "sinusoid_table"]

_RELEASES = "https://github.com/yitu-opensource/T2T-ViT/releases/download/main/"
# The official performer token layers always train with dropout 0.1, whatever drop_rate says.
_PERFORMER_DROPOUT = 0.1
_LOG_1E_8 = math.log(1e-8)  # the official normalizer epsilon, as an exponent


def sinusoid_table(n_position: int, dim: int) -> torch.Tensor:
    """The fixed (1, n_position, dim) position table: sin on even channels, cos on odd ones."""
    position = torch.arange(n_position, dtype=torch.float64)[:, None]
    channel = torch.arange(dim)
    angle = position / torch.pow(10000.0, (2 * (channel // 2)).double() / dim)
    # float64 then cast, as the official numpy code does, so the table matches it bit for bit
    return torch.where(channel % 2 == 0, angle.sin(), angle.cos()).float().unsqueeze(0)


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int, drop: float = 0.0) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)
        self.drop = nn.Dropout(drop)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.drop(self.fc2(self.drop(self.act(self.fc1(x)))))


class Attention(nn.Module):
    """Multi-head self-attention; ``qk_scale=None`` means head_dim**-0.5."""

    def __init__(
        self,
        dim: int,
        num_heads: int,
        qkv_bias: bool,
        qk_scale: float | None,
        attn_drop: float,
        proj_drop: float,
    ) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.scale = qk_scale if qk_scale is not None else self.head_dim**-0.5
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.attn_drop = nn.Dropout(attn_drop)
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, tokens, dim = x.shape
        qkv = self.qkv(x).reshape(batch, tokens, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        # explicit matmul + softmax (not SDPA) keeps the graph plain for quantizers and Core ML
        attn = self.attn_drop(((q * self.scale) @ k.transpose(-2, -1)).softmax(dim=-1))
        return self.proj_drop(self.proj((attn @ v).transpose(1, 2).reshape(batch, tokens, dim)))


class Block(nn.Module):
    """Pre-norm ViT block."""

    def __init__(
        self,
        dim: int,
        num_heads: int,
        mlp_ratio: float,
        qkv_bias: bool,
        qk_scale: float | None,
        drop: float,
        attn_drop: float,
        drop_path: float,
    ) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = Attention(dim, num_heads, qkv_bias, qk_scale, attn_drop, drop)
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), drop)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.drop_path(self.attn(self.norm1(x)))
        return x + self.drop_path(self.mlp(self.norm2(x)))


class TokenAttention(nn.Module):
    """Single-head attention that narrows dim -> out_dim; the skip adds v because x has another width."""

    def __init__(self, dim: int, out_dim: int) -> None:
        super().__init__()
        self.out_dim = out_dim
        # the official code scales by the *input* width (147**-0.5, 576**-0.5), not by out_dim
        self.scale = dim**-0.5
        self.qkv = nn.Linear(dim, out_dim * 3, bias=False)
        self.proj = nn.Linear(out_dim, out_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, k, v = self.qkv(x).split(self.out_dim, dim=-1)
        attn = ((q * self.scale) @ k.transpose(-2, -1)).softmax(dim=-1)
        return v + self.proj(attn @ v)


def _reorder_input_features(order: torch.Tensor, norm: nn.LayerNorm, linear: nn.Linear) -> None:
    """Permute a LayerNorm and the Linear reading it for inputs whose feature f is their feature ``order[f]``.

    LayerNorm's statistics do not depend on the feature order, so linear(norm(x)) is unchanged.
    """
    with torch.no_grad():
        norm.weight.copy_(norm.weight[order])
        norm.bias.copy_(norm.bias[order])
        linear.weight.copy_(linear.weight[:, order])


class TokenTransformer(nn.Module):
    """Token layer of the ``t2t_vit_t_*`` variants: y = Attn(LN1(x)); out = y + MLP(LN2(y)), ratio 1."""

    def __init__(self, dim: int, out_dim: int) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = TokenAttention(dim, out_dim)
        self.norm2 = nn.LayerNorm(out_dim)
        self.mlp = Mlp(out_dim, out_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))

    def reorder_input_features(self, order: torch.Tensor) -> None:
        _reorder_input_features(order, self.norm1, self.attn.qkv)


class TokenPerformer(nn.Module):
    """Token layer of the ``t2t_vit_*`` variants: linear-cost attention with positive random features.

    phi(u) = exp(u w^T - |u|^2 / 2) / sqrt(m) approximates the softmax kernel; ``w`` (m x out_dim,
    m = out_dim * kernel_ratio) is drawn once, frozen, and stored in the state dict like the official one.
    The official layer computes y = phi(q) (v^T phi(k))^T / (phi(q) sum_t phi(k_t) + 1e-8).

    ``forward`` computes that same function in a form whose every intermediate stays inside FP16's range
    (trained weights give phi(k) ~ 4e5 and a normalizer ~ 3e9 in the direct form, FP16 stops at 65504):

    * each feature f of phi(k) is shifted by its maximum over the tokens, c_f, so phi(k) lies in (0, 1];
    * the shift moves into q's exponent (exp(a_q + c_f) exp(a_k - c_f) = exp(a_q) exp(a_k)), and q is
      shifted per token by its maximum over the features, d_t; |q|^2 / 2 is a per-token factor and
      cancels in the ratio, so it only enters through the 1e-8;
    * the sums over T tokens are scaled by 1 / (m sqrt(T)), so normalizer and numerator stay within
      [1 / (m sqrt(T)), sqrt(T)] and sqrt(T) max|v|;
    * the 1e-8 is divided by the same factors, exp(d_t - |q_t|^2 / 2) sqrt(T), and enters as a ratio of two
      exponentials that never exceed 1: y is the official y, also where the normalizer is far below 1e-8.

    The shifts are detached: y does not depend on them, so their gradient is exactly zero anyway.
    """

    def __init__(self, dim: int, out_dim: int, kernel_ratio: float = 0.5, drop: float = _PERFORMER_DROPOUT) -> None:
        super().__init__()
        self.out_dim = out_dim
        self.num_features = int(out_dim * kernel_ratio)
        self.kqv = nn.Linear(dim, 3 * out_dim)
        self.dp = nn.Dropout(drop)
        self.proj = nn.Linear(out_dim, out_dim)
        self.norm1 = nn.LayerNorm(dim)
        self.norm2 = nn.LayerNorm(out_dim)
        self.mlp = nn.Sequential(nn.Linear(out_dim, out_dim), nn.GELU(), nn.Linear(out_dim, out_dim), nn.Dropout(drop))
        # orthogonal rows scaled to norm sqrt(m), as the official init; checkpoints overwrite it anyway
        features = nn.init.orthogonal_(torch.empty(self.num_features, out_dim)) * math.sqrt(self.num_features)
        self.w = nn.Parameter(features, requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        k, q, v = self.kqv(self.norm1(x)).split(self.out_dim, dim=-1)  # official order: k, q, v
        tokens = x.shape[1]
        # 1 / (m sqrt(T)) keeps the token sums in range; a Python float, so every form exports it as a constant
        token_scale = 1.0 / (self.num_features * math.sqrt(tokens))
        k_exponent = k @ self.w.t() - (k * k).sum(dim=-1, keepdim=True) / 2  # (B, T, m)
        k_shift = k_exponent.amax(dim=1, keepdim=True).detach()  # c_f: (B, 1, m)
        kp = torch.exp(k_exponent - k_shift)  # in (0, 1]
        k_sum = kp.sum(dim=1).unsqueeze(-1) * token_scale  # (B, m, 1); the sum is <= T (3136 at 224 px)
        kptv = (v * token_scale).transpose(1, 2) @ kp  # (B, out_dim, m)
        q_exponent = q @ self.w.t() + k_shift  # (B, T, m); |q|^2 / 2 cancels in the ratio
        q_shift = q_exponent.amax(dim=-1, keepdim=True).detach()  # d_t: (B, T, 1)
        qp = torch.exp(q_exponent - q_shift)  # in (0, 1]
        normalizer = qp @ k_sum  # (B, T, 1)
        # the official 1e-8 divided by the factors taken out: exp(d_t - |q|^2 / 2) * sqrt(T)
        eps_exponent = (q * q).sum(dim=-1, keepdim=True) / 2 - q_shift + (_LOG_1E_8 - math.log(tokens) / 2)
        # N / (D + e^g) as (N b) / (D b + a) with a = e^min(g, 0), b = e^min(-g, 0): equal for either sign of
        # g, and neither exponential exceeds 1 (a tiny normalizer gives e^g far beyond FP16's range)
        eps_a = torch.exp(eps_exponent.clamp(max=0.0))
        eps_b = torch.exp((-eps_exponent).clamp(max=0.0))
        y = (qp @ kptv.transpose(1, 2)) * eps_b / (normalizer * eps_b + eps_a)
        y = v + self.dp(self.proj(y))
        return y + self.mlp(self.norm2(y))

    def reorder_input_features(self, order: torch.Tensor) -> None:
        _reorder_input_features(order, self.norm1, self.kqv)


class RowGatherSplit(nn.Module):
    """The soft split as one Gather of token rows: (B, size*size, C) row-major tokens -> (B, L, k*k*C).

    Each patch is the k*k tokens of its window, in row-major order, concatenated (an appended zero token
    stands in for the padding), so its features come in (ki, kj, c) order where ``nn.Unfold`` gives
    (c, ki, kj). ``unfold_index[f]`` is the ``nn.Unfold`` position of feature f; the layer reading the
    patches takes its weights in that order (``T2TModule.use_row_gather``).
    """

    def __init__(self, size: int, channels: int, kernel_size: int, stride: int, padding: int) -> None:
        super().__init__()
        side = (size + 2 * padding - kernel_size) // stride + 1
        window = kernel_size * kernel_size
        self.num_patches, self.patch_dim = side * side, channels * window
        i, j, ki, kj = torch.meshgrid(*(torch.arange(n) for n in (side, side, kernel_size, kernel_size)), indexing="ij")
        row, col = i * stride + ki - padding, j * stride + kj - padding
        inside = (row >= 0) & (row < size) & (col >= 0) & (col < size)
        rows = torch.where(inside, row * size + col, size * size)  # size * size: the zero token
        # int32 halves the index constant in the exported graph; not persistent: no state-dict keys
        self.register_buffer("rows", rows.flatten().int(), persistent=False)
        position, channel = torch.meshgrid(torch.arange(window), torch.arange(channels), indexing="ij")
        self.register_buffer("unfold_index", (channel * window + position).flatten(), persistent=False)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        padded = F.pad(tokens, (0, 0, 0, 1))
        return padded.index_select(1, self.rows).reshape(tokens.shape[0], self.num_patches, self.patch_dim)


class T2TModule(nn.Module):
    """Soft split (unfold) -> token layer -> fold back, twice, then project to embed_dim.

    ``use_row_gather()`` switches to the export form, which computes the same function without the
    unfold and fold transposes: tokens stay (B, H*W, C) and each soft split is one ``RowGatherSplit``.
    Measured with OpenVINO on CPU (T2T-ViT-7, 224 px, batch 1, 2 threads), the unfold form's Pad, Gather
    and reference Transpose nodes took ~20% of the INT8 time and ~15% of the FP32 time.
    """

    def __init__(self, img_size: int, tokens_type: str, in_chans: int, embed_dim: int, token_dim: int) -> None:
        super().__init__()
        layers = {"performer": TokenPerformer, "transformer": TokenTransformer}
        if tokens_type not in layers:
            raise ValueError(f"tokens_type must be 'performer' or 'transformer', not {tokens_type!r}")
        self.img_size, self.in_chans, self.token_dim = img_size, in_chans, token_dim
        # static grid sides after each split (k7/s4/p2, then k3/s2/p1 twice) for a multiple-of-16 input
        self.grid1, self.grid2 = img_size // 4, img_size // 8
        self.num_patches = (img_size // 16) ** 2
        self.soft_split0 = nn.Unfold(kernel_size=7, stride=4, padding=2)
        self.soft_split1 = nn.Unfold(kernel_size=3, stride=2, padding=1)
        self.soft_split2 = nn.Unfold(kernel_size=3, stride=2, padding=1)
        self.attention1 = layers[tokens_type](in_chans * 7 * 7, token_dim)
        self.attention2 = layers[tokens_type](token_dim * 3 * 3, token_dim)
        self.project = nn.Linear(token_dim * 3 * 3, embed_dim)
        self.row_splits: nn.ModuleList | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.row_splits is not None:
            split0, split1, split2 = self.row_splits
            x = self.attention1(split0(x.flatten(2).transpose(1, 2)))  # the image as (B, H*W, C) tokens
            return self.project(split2(self.attention2(split1(x))))
        x = self.attention1(self.soft_split0(x).transpose(1, 2))
        x = x.transpose(1, 2).reshape(-1, self.token_dim, self.grid1, self.grid1)
        x = self.attention2(self.soft_split1(x).transpose(1, 2))
        x = x.transpose(1, 2).reshape(-1, self.token_dim, self.grid2, self.grid2)
        return self.project(self.soft_split2(x).transpose(1, 2))

    def use_row_gather(self) -> None:
        """Switch to the export form in place; reorders the weights that read the patches (see RowGatherSplit)."""
        if self.row_splits is not None:
            return
        splits = (
            RowGatherSplit(self.img_size, self.in_chans, 7, 4, 2),
            RowGatherSplit(self.grid1, self.token_dim, 3, 2, 1),
            RowGatherSplit(self.grid2, self.token_dim, 3, 2, 1),
        )
        self.attention1.reorder_input_features(splits[0].unfold_index)
        self.attention2.reorder_input_features(splits[1].unfold_index)
        with torch.no_grad():
            self.project.weight.copy_(self.project.weight[:, splits[2].unfold_index])
        self.row_splits = nn.ModuleList(splits).to(self.project.weight.device)


class T2TViT(nn.Module):
    """T2T-ViT backbone with a classifier on the cls token.

    ``img_size`` must be a multiple of 16 (>= 32); the sinusoid table is built for its token count.
    ``qk_scale=None`` scales backbone attention by head_dim**-0.5, which is what the official
    training/evaluation script used (it builds models with ``pretrained=False``). The official
    constructors switch to embed_dim**-0.5 only when ``pretrained=True`` (a pattern inherited from
    early timm ViT code); pass e.g. ``qk_scale=384**-0.5`` to reproduce that behaviour.
    """

    def __init__(
        self,
        img_size: int = 224,
        tokens_type: str = "performer",
        in_chans: int = 3,
        num_classes: int = 1000,
        embed_dim: int = 384,
        depth: int = 14,
        num_heads: int = 6,
        mlp_ratio: float = 3.0,
        qkv_bias: bool = False,
        qk_scale: float | None = None,
        drop_rate: float = 0.0,
        attn_drop_rate: float = 0.0,
        drop_path_rate: float = 0.0,
        token_dim: int = 64,
    ) -> None:
        super().__init__()
        if img_size < 32 or img_size % 16:
            raise ValueError(f"T2T-ViT needs an image size that is a multiple of 16 and >= 32, not {img_size}")
        self.img_size = img_size
        self.num_classes = num_classes
        self.num_features = self.embed_dim = embed_dim
        self.tokens_to_token = T2TModule(img_size, tokens_type, in_chans, embed_dim, token_dim)
        num_patches = self.tokens_to_token.num_patches
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.pos_embed = nn.Parameter(sinusoid_table(num_patches + 1, embed_dim), requires_grad=False)
        self.pos_drop = nn.Dropout(drop_rate)
        # stochastic depth grows linearly with depth (plain floats: no tensor work, meta-device safe)
        rates = [drop_path_rate * i / max(depth - 1, 1) for i in range(depth)]
        self.blocks = nn.ModuleList(
            Block(embed_dim, num_heads, mlp_ratio, qkv_bias, qk_scale, drop_rate, attn_drop_rate, rate)
            for rate in rates
        )
        self.norm = nn.LayerNorm(embed_dim)
        self.head = nn.Linear(embed_dim, num_classes) if num_classes > 0 else nn.Identity()
        trunc_normal_(self.cls_token, std=0.02)
        self.apply(_init_weights)

    def get_classifier(self) -> nn.Module:
        return self.head

    def reset_classifier(self, num_classes: int) -> None:
        """Replace the head (fine-tuning on another label set)."""
        self.num_classes = num_classes
        self.head = nn.Linear(self.embed_dim, num_classes) if num_classes > 0 else nn.Identity()
        self.head.apply(_init_weights)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """Normalized cls-token features, (B, embed_dim)."""
        x = self.tokens_to_token(x)
        x = torch.cat((self.cls_token.expand(x.shape[0], -1, -1), x), dim=1)
        x = self.pos_drop(x + self.pos_embed)
        for block in self.blocks:
            x = block(x)
        return self.norm(x)[:, 0]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.forward_features(x))

    def export_form(self) -> T2TViT:
        """A copy for graph export (ONNX): the same function, soft splits as row gathers (T2TModule).

        Its state dict holds the patch-reading weights reordered: save checkpoints from the original.
        """
        exported = copy.deepcopy(self)
        exported.tokens_to_token.use_row_gather()
        return exported


def _init_weights(module: nn.Module) -> None:
    if isinstance(module, nn.Linear):
        trunc_normal_(module.weight, std=0.02)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, nn.LayerNorm):
        nn.init.ones_(module.weight)
        nn.init.zeros_(module.bias)


def checkpoint_filter_fn(state_dict: dict[str, Any], model: nn.Module) -> dict[str, Any]:
    """Adapt a checkpoint trained at another image size: its sinusoid table is replaced by the model's.

    The table is fixed, not learned, so regenerating it loses nothing. A table of another embedding
    width is left alone so that the loader reports the architecture mismatch.
    """
    table = state_dict.get("pos_embed")
    own = model.pos_embed
    if table is not None and table.shape != own.shape and table.shape[-1] == own.shape[-1]:
        state_dict = {**state_dict, "pos_embed": own.detach().clone()}
    return state_dict


_P, _T = {"tokens_type": "performer"}, {"tokens_type": "transformer"}
_LITE = {"embed_dim": 256, "num_heads": 4, "mlp_ratio": 2.0}
_S14 = {"embed_dim": 384, "depth": 14, "num_heads": 6, "mlp_ratio": 3.0}
_S19 = {"embed_dim": 448, "depth": 19, "num_heads": 7, "mlp_ratio": 3.0}
_S24 = {"embed_dim": 512, "depth": 24, "num_heads": 8, "mlp_ratio": 3.0}

# name -> architecture, as the official constructors define it (T2T-ViT-7 has depth 7)
VARIANTS: dict[str, dict[str, Any]] = {
    "t2t_vit_7": {**_P, **_LITE, "depth": 7},
    "t2t_vit_10": {**_P, **_LITE, "depth": 10},
    "t2t_vit_12": {**_P, **_LITE, "depth": 12},
    "t2t_vit_14": {**_P, **_S14},
    "t2t_vit_19": {**_P, **_S19},
    "t2t_vit_24": {**_P, **_S24},
    "t2t_vit_t_14": {**_T, **_S14},
    "t2t_vit_t_19": {**_T, **_S19},
    "t2t_vit_t_24": {**_T, **_S24},
    # ablation models of the paper's "CNN designs in ViT" study; no weights were released for them
    "t2t_vit_14_resnext": {**_P, **_S14, "num_heads": 32},
    "t2t_vit_14_wide": {**_P, "embed_dim": 768, "depth": 4, "num_heads": 12, "mlp_ratio": 3.0},
}

# name -> (params M, MACs G, ImageNet top-1 %, release file of the official weights); the _t variants'
# params are quoted with their performer twins' counts (the tables list one number per depth)
_PUBLISHED: dict[str, tuple[float, float, float, str]] = {
    "t2t_vit_7": (4.3, 1.1, 71.7, "71.7_T2T_ViT_7.pth.tar"),
    "t2t_vit_10": (5.9, 1.5, 75.2, "75.2_T2T_ViT_10.pth.tar"),
    "t2t_vit_12": (6.9, 1.8, 76.5, "76.5_T2T_ViT_12.pth.tar"),
    "t2t_vit_14": (21.5, 4.8, 81.5, "81.5_T2T_ViT_14.pth.tar"),
    "t2t_vit_19": (39.2, 8.5, 81.9, "81.9_T2T_ViT_19.pth.tar"),
    "t2t_vit_24": (64.1, 13.8, 82.3, "82.3_T2T_ViT_24.pth.tar"),
    "t2t_vit_t_14": (21.5, 6.1, 81.7, "81.7_T2T_ViTt_14.pth.tar"),
    "t2t_vit_t_19": (39.2, 9.8, 82.4, "82.4_T2T_ViTt_19.pth.tar"),
    "t2t_vit_t_24": (64.1, 15.0, 82.6, "82.6_T2T_ViTt_24.pth.tar"),
}
_SOURCE = "Yuan et al. 2021 (arXiv:2101.11986), ImageNet results tables; official README"

PREPROCESS = Preprocess.from_crop_pct(224, 0.9, interpolation="bicubic")
# Every T2T-ViT: NNCF's transformer mode, and the backbone attention's q.k^T / attn.v products out of INT8.
# the layer groups `t2tedge tune` places as one choice each (module paths of this file's modules)
T2T_GROUPS = (
    ("token layers", ("tokens_to_token.attention?", "tokens_to_token.attention?.*")),
    ("token projection", ("tokens_to_token.project",)),
    ("attention", ("blocks.*.attn", "blocks.*.attn.*")),
    ("mlp", ("blocks.*.mlp", "blocks.*.mlp.*")),
    ("head", ("head",)),
)
TRANSFORMER_HINTS = QuantizationHints(
    model_type="transformer", float_matmul_modules=("blocks.*.attn",), groups=T2T_GROUPS
)
# Performer token layers besides: their kernel math (exp features, normalizer, their products) stays float
# in full-graph 8-bit quantizers (at 8 bits the demo T2T-ViT-7's w8a8 falls to 10.5 % top-1 with NaN
# logits), and their MatMuls stay out of NNCF's INT8; the direct form of their kernel overflows FP16.
PERFORMER_HINTS = QuantizationHints(
    model_type="transformer",
    float_modules=("tokens_to_token.attention?",),
    float_matmul_modules=("tokens_to_token.attention?", "blocks.*.attn"),
    fp16_overflow=("tokens_to_token.attention?",),
    groups=T2T_GROUPS,
)
HINTS = PERFORMER_HINTS


def _build(name: str, num_classes: int = 1000, image_size: int = 224, **kwargs: Any) -> T2TViT:
    """ModelSpec builder: ``builder(num_classes=..., image_size=..., **kwargs)``."""
    return T2TViT(img_size=image_size, num_classes=num_classes, **{**VARIANTS[name], **kwargs})


def _timm_entrypoint(name: str) -> Callable[..., T2TViT]:
    def entrypoint(pretrained: bool = False, **kwargs: Any) -> T2TViT:
        if pretrained:
            raise CheckpointError(
                f"timm cannot fetch {name} weights; load them with t2tedge "
                f"(t2tedge.models.load_model(get_spec({name!r}), checkpoint=...) or pretrained_checkpoint)"
            )
        for key in ("pretrained_cfg", "pretrained_cfg_overlay", "cache_dir"):
            kwargs.pop(key, None)
        model = _build(name, kwargs.pop("num_classes", 1000), kwargs.pop("img_size", 224), **kwargs)
        pre = PREPROCESS.at_size(model.img_size)
        # lets timm.data.resolve_data_config find the eval transform
        model.pretrained_cfg = {
            "input_size": (3, model.img_size, model.img_size),
            "crop_pct": pre.crop_pct,
            "interpolation": pre.interpolation,
            "mean": pre.mean,
            "std": pre.std,
            "num_classes": model.num_classes,
            "classifier": "head",
        }
        return model

    entrypoint.__name__ = entrypoint.__qualname__ = name
    entrypoint.__doc__ = f"timm entrypoint for {name} (random init; weights load through t2tedge)."
    return entrypoint


for _name in VARIANTS:
    _params_m, _macs_g, _top1, _file = _PUBLISHED.get(_name, (None, None, None, None))
    register(
        ModelSpec(
            name=_name,
            family="t2t_vit",
            builder=partial(_build, _name),
            preprocess=PREPROCESS,
            paper=PaperFacts(_params_m, _macs_g, _top1, _SOURCE if _file else "Yuan et al. 2021, ablation"),
            classifier_key="head.weight",
            size_multiple=16,
            pretrained_url=_RELEASES + _file if _file else None,
            checkpoint_filter=checkpoint_filter_fn,
            quantization=PERFORMER_HINTS if VARIANTS[_name]["tokens_type"] == "performer" else TRANSFORMER_HINTS,
        )
    )
    globals()[_name] = _entrypoint = _timm_entrypoint(_name)
    # timm appends the name to __all__, so it must also be a module attribute (set just above)
    if not timm.models.is_model(_name):
        timm.models.register_model(_entrypoint)
