"""ITM re-ranking at k_test: the per-image K/V cache vs the LAVIS-style path that recomputes K/V for every pair.

Usage:
    .venv/bin/python benchmarks/bench_rerank.py [--model tiny-fusion] [--images 200] [--captions-per-image 5]
        [--k-test 128] [--batch-size 128] [--caption-tokens 14] [--image-size N] [--noise 7.0] [--seed 0] [--json OUT]
    .venv/bin/python benchmarks/bench_rerank.py --mode query --model vit-b16-bert-base-fusion --images 1000

One process, one model (random init: the weights do not change the work), eval mode, no gradients. Both paths score
the same candidate lists with :func:`vlalign.eval.rerank.rerank_score_matrices`:

- reference (``cache=False``): for each query, its ``k_test`` candidates are fused with the image tokens given per
  pair, as LAVIS does (``image_feats[i].repeat(k_test, 1, 1)``), in both directions; every fusion layer projects the
  image to keys and values again for every pair;
- cached (``cache=True``): the pairs of both directions are pooled (a pair in both lists is fused once), grouped by
  image, and each image's keys/values are computed once per layer for all its candidates.

The candidate lists come from planted-signal ITC embeddings (each caption = its image's embedding + noise, as
bench_retrieval.py), so the overlap of the two directions' lists is that of a model that retrieves well. The image
tokens and caption states are the model's own outputs on random pixels and random token ids (caption lengths uniform
in [tokens/2, 3*tokens/2]). FLOPs are counted with ``torch.utils.flop_counter`` (matmuls and attention; the CPU
attention kernel gets its formula here, 4*B*h*L*S*d). The script checks that both paths give the same scores
(allclose) and exits non-zero otherwise; it prints and writes (``--json``) time, FLOPs and pairs of each path and
their ratios.

``--mode query`` is for models too large to re-rank a whole set on a CPU (ViT-B/16 + BERT-base): it times and counts
one image against ``k_test`` captions both ways, measures the FLOPs of one image's K/V (every fusion layer) and of one
pair without them, and computes the whole-set FLOPs of both paths from the exact pair counts of planted-signal
candidate lists of ``--images`` x ``--captions-per-image`` (reference: every pair of both directions with its K/V;
cached: every distinct pair once plus every image's K/V once).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode, register_flop_formula

from vlalign.eval.rerank import RerankInputs, rerank_score_matrices
from vlalign.models import build_model, get_model_config


@register_flop_formula(torch.ops.aten._scaled_dot_product_flash_attention_for_cpu)
def _sdpa_cpu_flops(query, key, value, *args, out_shape=None, **kwargs) -> int:
    """QKᵀ and AV of the CPU attention kernel: 2 * (2 * B*h*L*S*d)."""
    b, h, length, d = query
    return 4 * b * h * length * key[-2] * d


def make_inputs(model, n_images: int, per_image: int, tokens: int, noise: float, seed: int, batch: int = 64
                ) -> tuple[RerankInputs, torch.Tensor]:
    """Model image tokens / caption states on random inputs, planted-signal ITC embeddings for the candidate lists."""
    cfg = model.config
    gen = torch.Generator().manual_seed(seed)
    size = cfg.image.image_size
    image_tokens = torch.cat([model.image_outputs(torch.randn(min(batch, n_images - s), 3, size, size, generator=gen))[0]
                              for s in range(0, n_images, batch)])  # (N, T, C)
    n_texts = n_images * per_image
    vocab = model.text_tower.transformer.get_input_embeddings().num_embeddings
    width = min(cfg.text.context_length, tokens * 3 // 2 + 1)
    lengths = torch.randint(max(3, tokens // 2), width + 1, (n_texts,), generator=gen)  # (M,)
    mask = (torch.arange(width)[None, :] < lengths[:, None]).long()  # (M, L)
    ids = torch.randint(5, vocab, (n_texts, width), generator=gen) * mask
    ids[:, 0] = 2
    states = torch.cat([model.text_outputs(ids[s:s + batch], mask[s:s + batch])[0] for s in range(0, n_texts, batch)])
    dim = 256
    image_emb = F.normalize(torch.randn(n_images, dim, generator=gen), dim=-1)  # (N, D)
    text_to_image = torch.arange(n_images).repeat_interleave(per_image)  # (M,)
    text_emb = F.normalize(image_emb[text_to_image] + torch.randn(n_texts, dim, generator=gen) * noise / dim**0.5, dim=-1)
    return RerankInputs(image_tokens, image_emb, states, mask, text_emb), text_to_image


def run(model, inputs: RerankInputs, k_test: int, batch_size: int, cache: bool) -> dict:
    """Wall time and FLOPs of one re-ranking pass (FLOPs counted in a second, identical pass)."""
    start = time.perf_counter()
    t2i, i2t, fused = rerank_score_matrices(model, inputs, k_test, batch_size, cache)
    seconds = time.perf_counter() - start
    with FlopCounterMode(display=False) as counter:
        rerank_score_matrices(model, inputs, k_test, batch_size, cache)
    return {"seconds": seconds, "flops": int(counter.get_total_flops()), "pairs_fused": int(fused), "t2i": t2i, "i2t": i2t}


def flops_of(fn) -> int:
    """FLOPs that ``fn()`` executes."""
    with FlopCounterMode(display=False) as counter:
        fn()
    return int(counter.get_total_flops())


def query_mode(model, args) -> dict:
    """One image against ``k_test`` captions (LAVIS's inner loop): time and FLOPs of the K/V-per-pair path and of the
    cache; then the whole-set FLOP ratio at ``--images`` x ``--captions-per-image`` from the measured per-pair and
    per-image FLOPs and the exact pair counts of planted-signal candidate lists (no model needed for those)."""
    from vlalign.eval.rerank import _pairs, candidate_lists

    cfg = model.config
    k = args.k_test
    inputs, _ = make_inputs(model, 1, k, args.caption_tokens, args.noise, args.seed)
    tokens, mask, image = inputs.text_tokens, inputs.text_mask, inputs.image_tokens  # (k, L, H), (k, L), (1, T, C)

    def uncached():
        return model.itm_logits(tokens, mask, image.expand(k, -1, -1))

    def cached():
        return model.itm_logits(tokens, mask, kv=model.image_kv(image))

    assert torch.allclose(uncached(), cached(), atol=1e-4)
    timings = {}
    for name, fn in (("reference", uncached), ("cached", cached)):
        fn()  # warm-up
        best = float("inf")
        for _ in range(args.repeats):
            start = time.perf_counter()
            fn()
            best = min(best, time.perf_counter() - start)
        timings[name] = {"seconds": best, "flops": flops_of(fn)}
    kv_flops = flops_of(lambda: model.image_kv(image))  # one image, every fusion layer
    pair_flops = (timings["cached"]["flops"] - kv_flops) / k  # fusion + ITM head of one pair, K/V excluded
    # exact pair counts of a retrieval set of this size (planted-signal ITC embeddings)
    gen = torch.Generator().manual_seed(args.seed)
    n, m, dim = args.images, args.images * args.captions_per_image, 256
    image_emb = F.normalize(torch.randn(n, dim, generator=gen), dim=-1)
    text_emb = F.normalize(image_emb.repeat_interleave(args.captions_per_image, 0)
                           + torch.randn(m, dim, generator=gen) * args.noise / dim**0.5, dim=-1)
    forward, backward = _pairs(*candidate_lists(image_emb, text_emb, k))
    total = forward.shape[0] + backward.shape[0]
    unique = int(torch.unique(torch.cat([forward, backward])[:, 0] * m + torch.cat([forward, backward])[:, 1]).numel())
    reference_flops = total * (pair_flops + kv_flops)  # K/V recomputed for every pair of both directions
    cached_flops = unique * pair_flops + n * kv_flops  # each pair once, each image's K/V once
    return {
        "mode": "query", "model": cfg.name, "image_size": cfg.image.image_size, "image_tokens": int(image.shape[1]),
        "fusion_layers": cfg.arch_options.get("fusion_layers"), "width": int(tokens.shape[-1]), "k_test": k,
        "mean_caption_tokens": float(mask.sum(1).float().mean()), "threads": torch.get_num_threads(),
        "query": {**timings, "time_ratio": timings["reference"]["seconds"] / timings["cached"]["seconds"],
                  "flop_ratio": timings["reference"]["flops"] / timings["cached"]["flops"]},
        "per_image_kv_flops": kv_flops, "per_pair_flops_without_kv": pair_flops,
        "set": {"images": n, "captions": m, "pairs_reference": total, "pairs_cached": unique,
                "flops_reference": reference_flops, "flops_cached": cached_flops,
                "flop_ratio": reference_flops / cached_flops},
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="tiny-fusion")
    parser.add_argument("--image-size", type=int, default=None, help="override the model's image size (e.g. 384)")
    parser.add_argument("--images", type=int, default=200)
    parser.add_argument("--captions-per-image", type=int, default=5)
    parser.add_argument("--k-test", type=int, default=128)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--caption-tokens", type=int, default=14, help="mean caption length in tokens")
    parser.add_argument("--noise", type=float, default=7.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--mode", choices=("full", "query"), default="full",
                        help="full: re-rank a whole set both ways; query: one image x k_test captions, then the "
                             "whole-set FLOP ratio from per-pair/per-image FLOPs and exact pair counts")
    parser.add_argument("--repeats", type=int, default=3, help="query mode: best of this many timed runs")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args(argv)

    overrides = {}
    if args.image_size:
        overrides = {"image": {"image_size": args.image_size, "timm_kwargs": {"img_size": args.image_size}}}
    cfg = get_model_config(args.model, **overrides)
    if cfg.arch != "fusion":
        cfg = get_model_config(args.model, **overrides, arch="fusion", arch_options={"decoder_layers": 0})
    torch.manual_seed(args.seed)
    model = build_model(cfg, load_pretrained=False).eval()
    if args.mode == "query":
        with torch.no_grad():
            result = query_mode(model, args)
        print(json.dumps(result, indent=2))
        if args.json:
            args.json.parent.mkdir(parents=True, exist_ok=True)
            args.json.write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
        return 0
    with torch.no_grad():
        inputs, _ = make_inputs(model, args.images, args.captions_per_image, args.caption_tokens, args.noise, args.seed)
        warm, _ = make_inputs(model, 4, 2, args.caption_tokens, args.noise, args.seed + 1)
        for cache in (True, False):  # thread pools and kernels paged in before timing
            rerank_score_matrices(model, warm, 4, args.batch_size, cache)
        cached = run(model, inputs, args.k_test, args.batch_size, cache=True)
        reference = run(model, inputs, args.k_test, args.batch_size, cache=False)
    same = True
    for key in ("t2i", "i2t"):
        finite = torch.isfinite(reference[key])
        same &= bool(torch.equal(torch.isfinite(cached[key]), finite))
        same &= bool(torch.allclose(cached[key][finite], reference[key][finite], atol=1e-4, rtol=1e-4))
    t = inputs.image_tokens.shape[1]
    result = {
        "model": cfg.name, "image_size": cfg.image.image_size, "image_tokens": t,
        "fusion_layers": cfg.arch_options.get("fusion_layers"), "width": int(inputs.text_tokens.shape[-1]),
        "images": args.images, "captions": args.images * args.captions_per_image, "k_test": args.k_test,
        "batch_size": args.batch_size, "mean_caption_tokens": float(inputs.text_mask.sum(1).float().mean()),
        "threads": torch.get_num_threads(),
        "reference": {k: v for k, v in reference.items() if k not in ("t2i", "i2t")},
        "cached": {k: v for k, v in cached.items() if k not in ("t2i", "i2t")},
        "time_ratio": reference["seconds"] / cached["seconds"],
        "flop_ratio": reference["flops"] / cached["flops"],
        "pair_ratio": reference["pairs_fused"] / cached["pairs_fused"],
        "scores_equal": same,
    }
    print(json.dumps(result, indent=2))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    if not same:
        print("the cached and the reference scores differ", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
