"""ALBEF / BLIP fusion model (arch ``fusion``): align the towers, then fuse them with cross-attention.

Layout (ALBEF, Li et al. 2021; BLIP, Li et al. 2022)::

    image tower ──► image tokens (B, T, C) ──────────────┬──────────────┐
         └─► pooled ─► image_proj ─► ITC features         │ K/V          │ K/V
    text tower (text-only layers) ──► text tokens (B, L, H)              │
         └─► pooled ─► text_proj ─► ITC features          ▼              │
                                   fusion layers (self-attn + cross-attn + MLP) ─► fused [CLS] ─► itm_head (2-way)
                                                                        └─► masked tokens ─► mlm_head (tied)
    caption decoder (causal self-attn + cross-attn + MLP, tied embeddings) ◄────────┘ ─► next-token logits

The text tower's layers are the text-only first layers of ALBEF's text encoder and ``fusion_layers`` more layers
cross-attend to the image tokens (ALBEF: 6 + 6 for BERT-base). The ITM head reads the fused [CLS]; the MLM head and
the decoder's LM head are tied to the text tower's word embeddings (one vocabulary matrix). ``encode_image`` /
``encode_text`` / ``forward`` are those of the dual encoder, so retrieval, zero-shot, merging and serving never
branch on the arch.

Cross-attention keys and values depend only on the image: :meth:`FusionEncoder.image_kv` computes them once per
image and every caller (ITM re-ranking, caption generation) reuses them for all candidate captions
(``kv_index`` maps each row to its image; one image shared by all rows needs no copy at all).

Momentum teachers are not part of this module: the ``albef`` objective owns them (see
:mod:`vlalign.objectives.albef`); :meth:`FusionModel.momentum_teacher` returns the copy it keeps.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from vlalign.errors import ConfigError
from vlalign.models.config import ModelConfig
from vlalign.models.registry import register_arch
from vlalign.models.clip import CLIPModel

KV = tuple[torch.Tensor, torch.Tensor]  # (keys, values), each (N, heads, T, head_dim)


@dataclass
class FusionOptions:
    """``arch_options`` of the ``fusion`` arch."""

    fusion_layers: int = 2  # layers after the text tower that cross-attend to the image tokens (ALBEF: 6 of BERT-base's 12)
    decoder_layers: int = 2  # captioning decoder layers (causal self-attn + cross-attn); 0 = no decoder (ALBEF)
    mlm_head: bool = True  # masked-language-model head tied to the word embeddings (ALBEF); false for BLIP
    mlp_ratio: int = 4  # MLP width of the fusion and decoder layers, as a multiple of the text width
    dropout: float = 0.0  # dropout in the fusion and decoder layers (attention and residual branches)

    def __post_init__(self) -> None:
        checks = [
            (isinstance(self.fusion_layers, int) and self.fusion_layers >= 1, "fusion_layers", "an integer >= 1"),
            (isinstance(self.decoder_layers, int) and self.decoder_layers >= 0, "decoder_layers", "an integer >= 0"),
            (isinstance(self.mlm_head, bool), "mlm_head", "true or false"),
            (isinstance(self.mlp_ratio, int) and self.mlp_ratio >= 1, "mlp_ratio", "an integer >= 1"),
            (0.0 <= float(self.dropout) < 1.0, "dropout", "a float in [0, 1)"),
        ]
        for ok, name, expected in checks:
            if not ok:
                raise ConfigError(f"arch fusion: arch_options.{name}={getattr(self, name)!r}; expected {expected}.")


# ------------------------------------------------------------------------------------------------
# Attention blocks
# ------------------------------------------------------------------------------------------------


def _heads(x: torch.Tensor, heads: int) -> torch.Tensor:
    """(B, L, H) -> (B, heads, L, H / heads)."""
    b, n, width = x.shape
    return x.view(b, n, heads, width // heads).transpose(1, 2)


def _merge_heads(x: torch.Tensor) -> torch.Tensor:
    """(B, heads, L, d) -> (B, L, heads * d)."""
    b, h, n, d = x.shape
    return x.transpose(1, 2).reshape(b, n, h * d)


class SelfAttention(nn.Module):
    """Multi-head self-attention over the text tokens, with a key-padding mask and optionally causal."""

    def __init__(self, width: int, heads: int, dropout: float) -> None:
        super().__init__()
        self.heads, self.dropout = heads, dropout
        self.qkv = nn.Linear(width, 3 * width)
        self.out = nn.Linear(width, width)

    def forward(self, x: torch.Tensor, key_mask: torch.Tensor | None, causal: bool = False) -> torch.Tensor:
        """``x`` (B, L, H), ``key_mask`` (B, L) (1 = real token) -> (B, L, H)."""
        q, k, v = (_heads(t, self.heads) for t in self.qkv(x).chunk(3, dim=-1))  # 3 x (B, h, L, d)
        mask = None
        if key_mask is not None:
            mask = key_mask.bool()[:, None, None, :]  # (B, 1, 1, L)
            if causal:
                n = x.shape[1]
                mask = mask & torch.ones(n, n, dtype=torch.bool, device=x.device).tril()  # (B, 1, L, L)
        attn = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=self.dropout if self.training else 0.0,
                                              is_causal=causal and mask is None)  # (B, h, L, d)
        return self.out(_merge_heads(attn))  # (B, L, H)


class CrossAttention(nn.Module):
    """Multi-head attention from the text tokens to the image tokens; the image's K/V can be computed once."""

    def __init__(self, width: int, image_dim: int, heads: int, dropout: float) -> None:
        super().__init__()
        self.heads, self.dropout = heads, dropout
        self.q = nn.Linear(width, width)
        self.kv = nn.Linear(image_dim, 2 * width)
        self.out = nn.Linear(width, width)

    def image_kv(self, image_tokens: torch.Tensor) -> KV:
        """(N, T, C) image tokens -> keys and values, each (N, heads, T, d): all this layer needs of the image."""
        k, v = self.kv(image_tokens).chunk(2, dim=-1)  # 2 x (N, T, H)
        return _heads(k, self.heads), _heads(v, self.heads)

    def forward(self, x: torch.Tensor, kv: KV, kv_index: torch.Tensor | None = None) -> torch.Tensor:
        """``x`` (B, L, H) attends to image keys/values ``kv`` (N, h, T, d) -> (B, L, H).

        Row b uses image ``kv_index[b]``; without ``kv_index`` row b uses image b, or the one image when N == 1.
        One image shared by every row is broadcast to the rows (an expanded view: nothing of the image is copied or
        recomputed per row); rows of several images gather their cached K/V by index (a copy, no matmul).
        """
        k, v = kv
        q = _heads(self.q(x), self.heads)  # (B, h, L, d)
        b = q.shape[0]
        if k.shape[0] == 1 and b > 1 and (kv_index is None or bool((kv_index == 0).all())):
            k, v = k.expand(b, -1, -1, -1), v.expand(b, -1, -1, -1)  # (B, h, T, d) views of the one image
        elif kv_index is not None:
            k, v = k[kv_index], v[kv_index]  # (B, h, T, d) gathered, no recomputation
        elif k.shape[0] != b:
            raise ValueError(f"cross-attention: {b} text rows but keys/values of {k.shape[0]} images; pass kv_index.")
        attn = F.scaled_dot_product_attention(q, k, v, dropout_p=self.dropout if self.training else 0.0)  # (B, h, L, d)
        return self.out(_merge_heads(attn))  # (B, L, H)


class FusionLayer(nn.Module):
    """A post-LN BERT layer with cross-attention: self-attn (optionally causal), cross-attn to the image, MLP."""

    def __init__(self, width: int, image_dim: int, heads: int, mlp_ratio: int, dropout: float, causal: bool) -> None:
        super().__init__()
        self.causal = causal
        self.self_attn = SelfAttention(width, heads, dropout)
        self.norm1 = nn.LayerNorm(width, eps=1e-12)
        self.cross_attn = CrossAttention(width, image_dim, heads, dropout)
        self.norm2 = nn.LayerNorm(width, eps=1e-12)
        self.mlp = nn.Sequential(nn.Linear(width, mlp_ratio * width), nn.GELU(), nn.Linear(mlp_ratio * width, width))
        self.norm3 = nn.LayerNorm(width, eps=1e-12)
        self.drop = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None, kv: KV, kv_index: torch.Tensor | None) -> torch.Tensor:
        """(B, L, H) -> (B, L, H)."""
        x = self.norm1(x + self.drop(self.self_attn(x, mask, self.causal)))
        x = self.norm2(x + self.drop(self.cross_attn(x, kv, kv_index)))
        return self.norm3(x + self.drop(self.mlp(x)))


class FusionEncoder(nn.Module):
    """The cross-attending layers of the text encoder (ALBEF's last layers), or the decoder's (causal) layers."""

    def __init__(self, layers: int, width: int, image_dim: int, heads: int, mlp_ratio: int, dropout: float,
                 causal: bool = False) -> None:
        super().__init__()
        self.layers = nn.ModuleList(FusionLayer(width, image_dim, heads, mlp_ratio, dropout, causal) for _ in range(layers))

    def image_kv(self, image_tokens: torch.Tensor) -> list[KV]:
        """The cross-attention keys/values of every layer for (N, T, C) image tokens: the per-image K/V cache."""
        return [layer.cross_attn.image_kv(image_tokens) for layer in self.layers]

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None, image_tokens: torch.Tensor | None = None,
                kv: list[KV] | None = None, kv_index: torch.Tensor | None = None) -> torch.Tensor:
        """Text states (B, L, H) with mask (B, L), fused with ``image_tokens`` (B, T, C) or a K/V cache -> (B, L, H)."""
        if kv is None:
            if image_tokens is None:
                raise ValueError("fusion: pass image_tokens or their K/V cache (image_kv).")
            kv = self.image_kv(image_tokens)
        for layer, layer_kv in zip(self.layers, kv):
            x = layer(x, mask, layer_kv, kv_index)
        return x


class TokenHead(nn.Module):
    """BERT's prediction head: dense + GELU + LayerNorm, then logits over the vocabulary with the word-embedding
    matrix as weights (tied) and a bias of its own."""

    def __init__(self, width: int, word_embeddings: nn.Embedding) -> None:
        super().__init__()
        self.dense = nn.Linear(width, width)
        self.norm = nn.LayerNorm(width, eps=1e-12)
        self.decoder = nn.Linear(width, word_embeddings.num_embeddings)
        self.decoder.weight = word_embeddings.weight  # tied: (V, H)
        nn.init.zeros_(self.decoder.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(..., H) -> (..., V) logits."""
        return self.decoder(self.norm(F.gelu(self.dense(x))))


class CaptionDecoder(nn.Module):
    """BLIP's image-grounded text decoder (CoCa's captioner): tied word embeddings + own positions, causal
    self-attention and cross-attention layers, an LM head tied to the word embeddings."""

    def __init__(self, word_embeddings: nn.Embedding, layers: int, image_dim: int, heads: int, mlp_ratio: int,
                 dropout: float, max_length: int) -> None:
        super().__init__()
        width = word_embeddings.embedding_dim
        self.word_embeddings = word_embeddings  # shared with the text tower (not a copy)
        self.position_embeddings = nn.Embedding(max_length, width)
        self.norm = nn.LayerNorm(width, eps=1e-12)
        self.layers = FusionEncoder(layers, width, image_dim, heads, mlp_ratio, dropout, causal=True)
        self.head = TokenHead(width, word_embeddings)
        self.max_length = max_length

    def image_kv(self, image_tokens: torch.Tensor) -> list[KV]:
        """Per-image K/V cache of the decoder's cross-attention (reused at every generation step)."""
        return self.layers.image_kv(image_tokens)

    def hidden(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, image_tokens: torch.Tensor | None = None,
               kv: list[KV] | None = None, kv_index: torch.Tensor | None = None) -> torch.Tensor:
        """(B, L) ids -> (B, L, H) decoder states; position i sees tokens <= i and the image."""
        n = input_ids.shape[1]
        if n > self.max_length:
            raise ValueError(f"caption decoder: {n} tokens exceed its {self.max_length} positions (text.context_length).")
        positions = torch.arange(n, device=input_ids.device)
        x = self.norm(self.word_embeddings(input_ids) + self.position_embeddings(positions))  # (B, L, H)
        return self.layers(x, attention_mask, image_tokens, kv, kv_index)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, image_tokens: torch.Tensor | None = None,
                kv: list[KV] | None = None, kv_index: torch.Tensor | None = None) -> torch.Tensor:
        """(B, L) ids -> (B, L, V) next-token logits."""
        return self.head(self.hidden(input_ids, attention_mask, image_tokens, kv, kv_index))


# ------------------------------------------------------------------------------------------------
# Sampling
# ------------------------------------------------------------------------------------------------


def nucleus_filter(probs: torch.Tensor, top_p: float) -> torch.Tensor:
    """Nucleus (top-p) sampling distribution: keep the smallest set of most likely tokens whose mass reaches
    ``top_p`` (always at least the top one), renormalised. ``probs`` (B, V) rows summing to 1 -> (B, V).
    Equally likely tokens are taken in vocabulary order (a stable sort), so the kept set never depends on the kernel."""
    sorted_probs, order = probs.sort(dim=-1, descending=True, stable=True)  # (B, V)
    before = sorted_probs.cumsum(dim=-1) - sorted_probs  # (B, V) mass of the strictly more likely tokens
    keep_sorted = before < top_p  # the first token always (before = 0 < top_p)
    keep = torch.zeros_like(keep_sorted).scatter(-1, order, keep_sorted)  # (B, V) back in vocabulary order
    kept = probs * keep
    return kept / kept.sum(dim=-1, keepdim=True)


# ------------------------------------------------------------------------------------------------
# The model
# ------------------------------------------------------------------------------------------------


class FusionModel(CLIPModel):
    """Dual towers for ITC plus fusion layers, ITM and MLM heads and a caption decoder (ALBEF / BLIP).

    Parameter prefixes: ``image_tower.``, ``text_tower.``, ``image_proj.``, ``text_proj.``, ``logit_scale`` (as the
    dual encoder, so stages freeze the towers the same way), ``fusion.``, ``itm_head.``, ``mlm_head.``, ``decoder.``.
    """

    def __init__(self, cfg: ModelConfig, vocab_size: int, load_pretrained: bool = True,
                 options: FusionOptions | None = None) -> None:
        super().__init__(cfg, vocab_size, load_pretrained)  # towers, projections, logit scale (and bias)
        options = options or FusionOptions()
        self.options = options
        image_dim = self.image_proj.in_features
        transformer_cfg = self.text_tower.transformer.config
        width, heads = self.text_tower.output_dim, int(transformer_cfg.num_attention_heads)
        words = self.text_tower.transformer.get_input_embeddings()  # (V, H) shared by the MLM and LM heads
        self.fusion = FusionEncoder(options.fusion_layers, width, image_dim, heads, options.mlp_ratio, options.dropout)
        self.itm_head = nn.Linear(width, 2)  # fused [CLS] -> (no match, match) logits
        self.mlm_head = TokenHead(width, words) if options.mlm_head else None
        self.decoder = (CaptionDecoder(words, options.decoder_layers, image_dim, heads, options.mlp_ratio, options.dropout,
                                       cfg.text.context_length) if options.decoder_layers else None)
        for module in (self.fusion, self.itm_head, self.mlm_head, self.decoder):
            if module is not None:
                module.apply(lambda m: _init_new(m, words.weight))

    # ----- the dual-encoder surface (evaluation, merging, serving) is CLIPModel's -----

    def text_outputs(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, L) ids and mask -> ``(tokens (B, L, H), pooled (B, H))`` of the text-only layers."""
        return self.text_tower.outputs(input_ids, attention_mask)

    # ----- fusion and heads -----

    def image_kv(self, image_tokens: torch.Tensor) -> list[KV]:
        """Per-image cross-attention keys/values of every fusion layer for (N, T, C) tokens (the re-ranking cache)."""
        return self.fusion.image_kv(image_tokens)

    def fuse(self, text_tokens: torch.Tensor, text_mask: torch.Tensor, image_tokens: torch.Tensor | None = None,
             kv: list[KV] | None = None, kv_index: torch.Tensor | None = None) -> torch.Tensor:
        """Text-only states (B, L, H) fused with the image (tokens (B, T, C) or a K/V cache + ``kv_index``) -> (B, L, H)."""
        return self.fusion(text_tokens, text_mask, image_tokens, kv, kv_index)

    def itm_logits(self, text_tokens: torch.Tensor, text_mask: torch.Tensor, image_tokens: torch.Tensor | None = None,
                   kv: list[KV] | None = None, kv_index: torch.Tensor | None = None) -> torch.Tensor:
        """(B, 2) image-text matching logits (no match, match) from the fused [CLS]."""
        fused = self.fuse(text_tokens, text_mask, image_tokens, kv, kv_index)  # (B, L, H)
        return self.itm_head(fused[:, 0])  # (B, 2)

    def mlm_logits(self, fused: torch.Tensor) -> torch.Tensor:
        """Fused states (..., H) -> (..., V) masked-token logits."""
        if self.mlm_head is None:
            raise ConfigError("this fusion model has no MLM head (arch_options.mlm_head: false); set it or drop the MLM term.")
        return self.mlm_head(fused)

    def caption_hidden(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                       image_tokens: torch.Tensor | None = None, kv: list[KV] | None = None) -> torch.Tensor:
        """(B, L) caption ids (starting with [CLS] as BOS) -> (B, L, H) decoder states (apply ``decoder.head``)."""
        if self.decoder is None:
            raise ConfigError("this fusion model has no caption decoder (arch_options.decoder_layers: 0); set it > 0.")
        return self.decoder.hidden(input_ids, attention_mask, image_tokens, kv)

    @torch.no_grad()
    def generate(self, pixels: torch.Tensor, bos_id: int, eos_id: int, pad_id: int, banned_ids: list[int],
                 max_length: int = 20, min_length: int = 3, top_p: float = 0.9, temperature: float = 1.0,
                 generator: torch.Generator | None = None, image_tokens: torch.Tensor | None = None) -> torch.Tensor:
        """Captions for (B, 3, H, W) images by nucleus sampling (BLIP's CapFilt captioner): (B, <=max_length) ids,
        starting with ``bos_id``, ``pad_id`` after ``eos_id``. The image's cross-attention K/V are computed once.

        ``banned_ids`` (e.g. [PAD], [CLS], [MASK], [UNK]) are never sampled; ``eos_id`` not before ``min_length`` tokens.
        ``image_tokens`` (B, T, C), when the caller has them already, replace running the image tower on ``pixels``.
        """
        if self.decoder is None:
            raise ConfigError("this fusion model has no caption decoder (arch_options.decoder_layers: 0); it cannot caption.")
        max_length = min(max_length, self.decoder.max_length)
        if image_tokens is None:
            image_tokens = self.image_outputs(pixels)[0]  # (B, T, C)
        kv = self.decoder.image_kv(image_tokens)  # per image, reused at every step
        b = pixels.shape[0]
        ids = torch.full((b, 1), bos_id, dtype=torch.long, device=pixels.device)  # (B, 1)
        done = torch.zeros(b, dtype=torch.bool, device=pixels.device)  # (B,)
        for step in range(max_length - 1):
            logits = self.decoder(ids, torch.ones_like(ids), kv=kv)[:, -1].float() / temperature  # (B, V)
            logits[:, banned_ids] = -math.inf
            if step + 1 < min_length:
                logits[:, eos_id] = -math.inf
            probs = nucleus_filter(logits.softmax(dim=-1), top_p)  # (B, V)
            sampled = torch.multinomial(probs.cpu(), 1, generator=generator).to(ids.device).squeeze(1)  # (B,)
            sampled = torch.where(done, torch.full_like(sampled, pad_id), sampled)
            ids = torch.cat([ids, sampled[:, None]], dim=1)
            done |= sampled == eos_id
            if bool(done.all()):
                break
        return ids

    # ----- momentum teacher -----

    def momentum_teacher(self) -> FusionModel:
        """A deep copy for EMA distillation without the parts a teacher never runs (decoder, ITM head)."""
        memo = {id(self.decoder): None, id(self.itm_head): None}
        return copy.deepcopy(self, memo)


def _init_new(module: nn.Module, words: torch.Tensor) -> None:
    """BERT initialisation of the layers the towers do not provide: N(0, 0.02) weights, zero biases, unit norms.
    The word-embedding matrix ``words`` (the text tower's, tied into the heads and the decoder) is left alone."""
    weight = getattr(module, "weight", None)
    if weight is words:
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)
        return
    if isinstance(module, (nn.Linear, nn.Embedding)):
        nn.init.normal_(module.weight, std=0.02)
        if getattr(module, "bias", None) is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, nn.LayerNorm):
        nn.init.ones_(module.weight)
        nn.init.zeros_(module.bias)


@register_arch("fusion", options=FusionOptions)
def build_fusion(cfg: ModelConfig, vocab_size: int, load_pretrained: bool = True,
                 options: FusionOptions | None = None) -> FusionModel:
    """ALBEF / BLIP: towers + cross-attention fusion, ITM / MLM heads and a caption decoder."""
    return FusionModel(cfg, vocab_size=vocab_size, load_pretrained=load_pretrained, options=options)
