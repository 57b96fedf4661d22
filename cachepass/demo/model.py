"""The bundled demo model: a small diffusers ``WanTransformer3DModel`` trained on procedural clips.

Pixel-space video (no VAE): 8 frames of 32 x 32 RGB, patchified 1 x 4 x 4 into 512 tokens. A tiny
text encoder (learned token embeddings, one transformer layer) turns a caption into
``encoder_hidden_states``. Trained with rectified flow and 10% caption dropout, so classifier-free
guidance works. ``load_default()`` reads the weights shipped in this package, no network needed.
"""

from __future__ import annotations

import dataclasses
import json
from importlib import resources
from typing import Sequence

import torch
from torch import nn

from cachepass.demo.sampling import sample
from cachepass.demo.shapes import COLORS, DIRECTIONS, SHAPES, ClipSpec

SPEC = ClipSpec()
TRANSFORMER_CONFIG = dict(
    patch_size=(1, 4, 4), num_attention_heads=4, attention_head_dim=32, in_channels=3, out_channels=3,
    text_dim=64, freq_dim=64, ffn_dim=512, num_layers=8, cross_attn_norm=True,
    qk_norm="rms_norm_across_heads", eps=1e-6, rope_max_seq_len=64,
)
VOCAB = ("<pad>", "a", "moving", *COLORS, *SHAPES, *DIRECTIONS)
MAX_TOKENS = 8
WEIGHTS = "demo_model.safetensors"
CARD = "demo_model.json"


class TinyTextEncoder(nn.Module):
    """Caption -> [B, MAX_TOKENS, 64]: token + position embeddings, one transformer encoder layer."""

    def __init__(self, dim: int = 64):
        super().__init__()
        self.tokens = nn.Embedding(len(VOCAB), dim)
        self.positions = nn.Parameter(torch.zeros(MAX_TOKENS, dim))
        self.layer = nn.TransformerEncoderLayer(dim, nhead=2, dim_feedforward=2 * dim, dropout=0.0, batch_first=True)

    @staticmethod
    def tokenize(captions: Sequence[str]) -> torch.Tensor:
        index = {w: i for i, w in enumerate(VOCAB)}
        ids = torch.zeros(len(captions), MAX_TOKENS, dtype=torch.long)
        for row, text in enumerate(captions):
            words = text.lower().split()
            unknown = [w for w in words if w not in index]
            if unknown or len(words) > MAX_TOKENS:
                raise ValueError(
                    f"caption {text!r}: words must come from {list(VOCAB[1:])} (at most {MAX_TOKENS}); "
                    f"unknown: {unknown}"
                )
            ids[row, : len(words)] = torch.tensor([index[w] for w in words])
        return ids

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        x = self.tokens(ids) + self.positions
        return self.layer(x, src_key_padding_mask=None)


def build_transformer():
    from diffusers import WanTransformer3DModel

    return WanTransformer3DModel(**TRANSFORMER_CONFIG)


@dataclasses.dataclass
class DemoModel:
    """The trained transformer, its text encoder, and a sampler with separate CFG calls."""

    transformer: nn.Module
    text_encoder: TinyTextEncoder
    card: dict

    @property
    def device(self) -> torch.device:
        return next(self.transformer.parameters()).device

    def to(self, device) -> "DemoModel":
        self.transformer.to(device)
        self.text_encoder.to(device)
        return self

    @torch.no_grad()
    def encode(self, captions: Sequence[str]) -> torch.Tensor:
        return self.text_encoder(TinyTextEncoder.tokenize(captions).to(self.device))

    def noise(self, n: int, seed: int) -> torch.Tensor:
        g = torch.Generator().manual_seed(seed)
        return torch.randn(n, 3, SPEC.frames, SPEC.size, SPEC.size, generator=g).to(self.device)

    @torch.no_grad()
    def generate(self, captions: Sequence[str], *, seed: int = 0, steps: int = 20, guidance: float = 4.0,
                 transformer=None, progress=None) -> torch.Tensor:
        """Clips [B, 3, F, H, W] in [-1, 1]; ``transformer`` overrides the model (e.g. a compiled one).

        One caption per call batch: the conditional and unconditional calls alternate, as
        ``StepCacheConfig(separate_cfg=True)`` expects.
        """
        fn = self.transformer if transformer is None else transformer
        cond = {"encoder_hidden_states": self.encode(captions)}
        uncond = {"encoder_hidden_states": self.encode([""] * len(captions))}

        def velocity(x, sigma, kwargs):
            if progress is not None:
                progress.update(1)
            timestep = (sigma * 1000).reshape(1).expand(x.shape[0]).float()
            return fn(hidden_states=x, timestep=timestep, return_dict=False, **kwargs)[0]

        latents = self.noise(len(captions), seed)
        return sample(velocity, latents, cond, uncond, steps, guidance=guidance).clamp(-1, 1)


def load_default(device: str | torch.device = "cpu") -> DemoModel:
    """The shipped demo model, on ``device``, in eval mode."""
    from safetensors.torch import load_file

    files = resources.files("cachepass.demo")
    weights = load_file(str(files / WEIGHTS))
    card = json.loads((files / CARD).read_text())
    transformer, text_encoder = build_transformer(), TinyTextEncoder()
    for prefix, module in (("transformer.", transformer), ("text_encoder.", text_encoder)):
        module.load_state_dict({k[len(prefix):]: v.float() for k, v in weights.items() if k.startswith(prefix)})
    model = DemoModel(transformer.eval(), text_encoder.eval(), card)
    return model.to(device)
