"""ALBEF / BLIP objectives: ITC with momentum teacher, feature queues and distillation; ITM with hard negatives;
image-conditioned MLM; the captioning (LM) loss. Registered as ``albef`` and ``blip`` (same terms, BLIP defaults).

The total is a weighted sum ``loss = λ_itc·itc + λ_itm·itm + λ_mlm·mlm + λ_lm·lm``; a term whose λ is 0 is not
computed. Every computed term (and the current distillation weight ``alpha``) is returned, so the loop logs it.

**ITC with momentum distillation** (ALBEF §3.3, BLIP §3.2). A momentum teacher θ_t (an EMA copy of the model, updated
after every optimizer step as θ_t ← m·θ_t + (1−m)·θ_s with two foreach calls) encodes the batch; its features, and the
last ``queue_size`` momentum features of each modality, are the columns every student row is scored against::

    s_i2t = scale · v_i · [t'_batch ; t'_queue]ᵀ          (B, B + Q)
    y_i2t = α · softmax(scale · v'_i · [t'_batch ; t'_queue]ᵀ) + (1 − α) · P_i / |P_i|
    itc   = ½ (−Σ_j y_i2t log softmax(s_i2t) + the same text→image)

``P_i`` are the positive columns: the image's own caption (ALBEF's and BLIP's pre-training), and with
``mask_same_image`` every column with the same image id (ALBEF's and BLIP's retrieval fine-tuning, ``idx_queue``: an
image seen in an earlier batch with another caption is a positive, not a negative). α ramps linearly from 0 over the
first ``alpha_ramp_epochs`` epochs (ALBEF: 1, BLIP pre-training: 2). The queues start as ALBEF's and BLIP's do, full
of random unit vectors (``queue_init: random``), or empty (``queue_init: empty``: only momentum features are ever
scored). Under torch.distributed each rank scores its rows against its own momentum batch and the queue; the queue
takes the momentum features gathered from every rank, so all ranks hold the same queue.

**ITM with hard negatives** (ALBEF §3.2). For each image one negative caption of the batch is drawn with probability
∝ softmax(scale · similarity) + ``negative_weight_floor`` over its non-positive captions (captions of the same image
get probability exactly 0, so are never drawn), and one negative image for each caption; the ITM head classifies the
B positive and 2B negative fused pairs. The similarity is student × momentum teacher (``itm_negatives: teacher``,
ALBEF's and BLIP's pre-training: ``sim_i2t[:, :bs]``, the student rows against the teacher's batch columns) or
student × student (``itm_negatives: student``, BLIP's retrieval fine-tuning). BLIP's pre-training floor is 1e-4.
docs/conventions.md compares every such convention with the reference code.

**MLM** (ALBEF §3.1): 15% of the real tokens are selected, except [CLS] (and [PAD]); with ``mlm_mask_sep: false``
no special token, [SEP] included, is ever selected. Of those 80% become [MASK], 10% a random token, 10% stay; the
fused states predict them (cross-entropy, mixed with the teacher's soft predictions with weight α when
``mlm_distill``). **LM** (BLIP's captioner, CoCa): the caption decoder predicts each next token (BOS = [CLS]).

**Where the teacher and the queues live: here, in the objective**, not in the model. They are training state (like
optimizer moments): a stage's checkpoint holds them under ``objective`` (restored exactly on resume), while the
model's state dict (what merging interpolates, registration hashes, serving loads, and the next stage starts from)
stays the student alone. Merging a queue would average unrelated features and copy one pointer; a next stage starts
with a fresh teacher (= its initial student, as ALBEF's ``copy_params``) and fresh queues (per ``queue_init``). The
teacher is marked never-trainable and is not a parameter of the model, so no optimizer ever sees it.
"""

from __future__ import annotations

import copy
import logging
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from vlalign.errors import ConfigError
from vlalign.models.registry import mark_never_trainable
from vlalign.objectives.base import Objective, ObjectiveContext
from vlalign.objectives.registry import register_objective

log = logging.getLogger(__name__)

IGNORE = -100  # label of tokens without a target (cross_entropy's ignore_index)


@dataclass
class AlbefOptions:
    """Options of the ``albef`` objective (defaults: ALBEF pre-training)."""

    itc_weight: float = 1.0  # λ of the image-text contrastive term (with the queue and distillation)
    itm_weight: float = 1.0  # λ of image-text matching with hard negatives (needs arch fusion)
    mlm_weight: float = 1.0  # λ of image-conditioned masked language modelling (needs the MLM head)
    lm_weight: float = 0.0  # λ of the caption decoder's next-token loss (BLIP's captioner, CoCa; needs the decoder)
    momentum: float = 0.995  # EMA coefficient m of the teacher: θ_t ← m·θ_t + (1 − m)·θ_s after every step
    queue_size: int = 65536  # momentum features kept per modality (0: in-batch columns only)
    distill: bool = True  # momentum distillation: soft targets from the teacher (ITC, and MLM with mlm_distill)
    alpha: float = 0.4  # weight of the teacher's soft targets once ramped in
    alpha_ramp_epochs: float = 1.0  # α grows linearly from 0 over this many epochs (ALBEF: 1, BLIP: 2; 0: no ramp)
    hard_negatives: bool = True  # ITM negatives ∝ softmax(similarity); false: uniform over the non-positives
    itm_negatives: str = "teacher"  # hard-negative similarity: teacher = student × momentum teacher (ALBEF and BLIP
    #                                 pre-training); student = student × student (BLIP retrieval fine-tuning)
    negative_weight_floor: float = 0.0  # added to the hard-negative softmax before positives get 0 (BLIP: 1e-4)
    itm_same_text_positive: bool = False  # ITM: a caption whose tokens equal the row's own caption is no negative
    #                                       for its image (ALBEF, BLIP: false, only the same image id is excluded)
    mask_same_image: bool = False  # ITC: columns of the same image id are positives too (ALBEF/BLIP retrieval
    #                                fine-tuning); false: only the row's own pair (ALBEF and BLIP pre-training)
    mlm_mask_sep: bool = True  # MLM may select [SEP] (ALBEF: only [PAD] and [CLS] excluded); false: no special token
    queue_init: str = "random"  # random: queues start full of random unit vectors (ALBEF, BLIP); empty: start empty
    mlm_probability: float = 0.15  # fraction of the eligible tokens selected for MLM
    mlm_mask_ratio: float = 0.8  # of the selected: replaced by [MASK]
    mlm_random_ratio: float = 0.1  # of the selected: replaced by a random token (the rest stay unchanged)
    mlm_distill: bool = True  # MLM targets mixed with the teacher's predictions (weight α) when distill is on
    lm_label_smoothing: float = 0.0  # label smoothing of the LM loss (BLIP: 0.1)

    def __post_init__(self) -> None:
        weights = (self.itc_weight, self.itm_weight, self.mlm_weight, self.lm_weight)
        checks = [
            (all(w >= 0 for w in weights) and any(w > 0 for w in weights), "itc/itm/mlm/lm_weight",
             "non-negative with at least one > 0"),
            (0.0 <= self.momentum <= 1.0, "momentum", "in [0, 1], e.g. 0.995"),
            (isinstance(self.queue_size, int) and self.queue_size >= 0, "queue_size", "an integer >= 0"),
            (0.0 <= self.alpha <= 1.0, "alpha", "in [0, 1]"),
            (self.alpha_ramp_epochs >= 0, "alpha_ramp_epochs", ">= 0"),
            (self.itm_negatives in ("teacher", "student"), "itm_negatives", "teacher or student"),
            (self.negative_weight_floor >= 0, "negative_weight_floor", ">= 0 (BLIP: 1e-4)"),
            (self.queue_init in ("random", "empty"), "queue_init", "random or empty"),
            (0.0 < self.mlm_probability < 1.0, "mlm_probability", "in (0, 1)"),
            (self.mlm_mask_ratio >= 0 and self.mlm_random_ratio >= 0 and self.mlm_mask_ratio + self.mlm_random_ratio <= 1,
             "mlm_mask_ratio + mlm_random_ratio", "non-negative and at most 1"),
            (0.0 <= self.lm_label_smoothing < 1.0, "lm_label_smoothing", "in [0, 1)"),
        ]
        for ok, name, expected in checks:
            if not ok:
                got = f" (got {getattr(self, name)!r})" if hasattr(self, name) else ""
                raise ConfigError(f"objective albef/blip: objective_options.{name} must be {expected}{got}.")


@dataclass
class BlipOptions(AlbefOptions):
    """Options of the ``blip`` objective (defaults: BLIP pre-training): ITC + ITM + captioning LM (no MLM), label
    smoothing 0.1, the 1e-4 floor on the hard-negative weights, α ramped over 2 epochs."""

    mlm_weight: float = 0.0  # BLIP has no MLM
    lm_weight: float = 1.0  # BLIP's image-grounded decoder
    lm_label_smoothing: float = 0.1  # BLIP's LM label smoothing
    negative_weight_floor: float = 1e-4  # BLIP pre-training: softmax(sim) + 1e-4, then positives set to 0
    alpha_ramp_epochs: float = 2.0  # BLIP pre-training: "ramp up alpha in the first 2 epochs"


# ------------------------------------------------------------------------------------------------
# The formulas, as small pure functions (each unit-tested against a direct implementation)
# ------------------------------------------------------------------------------------------------


def ema_update(teacher: list[torch.Tensor], student: list[torch.Tensor], momentum: float) -> None:
    """θ_t ← m·θ_t + (1 − m)·θ_s in place, as two foreach calls (dinov2's ``update_teacher``)."""
    torch._foreach_mul_(teacher, momentum)
    torch._foreach_add_(teacher, student, alpha=1.0 - momentum)


def ramped_alpha(alpha: float, step: int, ramp_steps: int) -> float:
    """ALBEF's distillation weight: ``alpha · min(1, step / ramp_steps)`` (0-based step; no ramp when 0 steps)."""
    return alpha if ramp_steps <= 0 else alpha * min(1.0, step / ramp_steps)


def positive_mask(row_ids: torch.Tensor, col_ids: torch.Tensor, same_image: bool) -> torch.Tensor:
    """(B, K) bool positives of the ITC rows among the columns ``[batch ; queue]``.

    With ``same_image`` a column is positive when it shows the row's image (same id, BLIP); otherwise only the
    row's own pair, column b of row b (ALBEF: other captions of the image in the queue stay negatives).
    """
    if same_image:
        return row_ids[:, None] == col_ids[None, :]  # (B, K)
    b, k = row_ids.shape[0], col_ids.shape[0]
    return torch.eye(b, k, dtype=torch.bool, device=row_ids.device)  # (B, K)


def distillation_targets(positives: torch.Tensor, teacher_logits: torch.Tensor | None, alpha: float) -> torch.Tensor:
    """(B, K) ITC targets: ``α · softmax(teacher logits) + (1 − α) · positives / #positives`` (rows sum to 1)."""
    hard = positives.float() / positives.sum(dim=1, keepdim=True).clamp_min(1).float()  # (B, K)
    if teacher_logits is None or alpha == 0.0:
        return hard
    return alpha * teacher_logits.float().softmax(dim=1) + (1.0 - alpha) * hard


def soft_cross_entropy(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean over rows of ``−Σ_k targets · log softmax(logits)``: (B, K), (B, K) -> ()."""
    return -(targets * logits.float().log_softmax(dim=1)).sum(dim=1).mean()


def negative_weights(similarity: torch.Tensor, positives: torch.Tensor, hard: bool = True,
                     floor: float = 0.0) -> torch.Tensor:
    """(B, K) unnormalised probabilities of drawing each column as a row's ITM negative: ``softmax(similarity) +
    floor`` (all ones when not ``hard``), then exactly 0 at the positives. ALBEF pre-training:
    ``softmax(sim).fill_diagonal_(0)``; BLIP pre-training: ``(softmax(sim) + 1e-4).fill_diagonal_(0)``."""
    if hard:
        weights = similarity.float().softmax(dim=1) + floor  # (B, K)
    else:
        weights = torch.ones_like(similarity, dtype=torch.float)  # (B, K)
    return weights.masked_fill(positives, 0.0)


def draw_negatives(weights: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """For each row of ``weights`` (B, K), one column drawn ∝ its weights; (B,) long, −1 for a row of zeros."""
    has = weights.sum(dim=1) > 0  # (B,)
    picks = torch.full((weights.shape[0],), -1, dtype=torch.long, device=weights.device)
    if bool(has.any()):
        rows = weights[has]
        drawn = torch.multinomial(rows.cpu() if generator is not None else rows, 1, generator=generator).squeeze(1)
        picks[has] = drawn.to(weights.device)
    return picks


def sample_negatives(similarity: torch.Tensor, positives: torch.Tensor, hard: bool = True,
                     generator: torch.Generator | None = None, floor: float = 0.0) -> torch.Tensor:
    """For each row, one column index drawn ∝ softmax(similarity) + ``floor`` over its non-positive columns (uniform
    over them when not ``hard``); positives have probability exactly 0. (B,) long, −1 for a row whose columns are all
    positive."""
    return draw_negatives(negative_weights(similarity, positives, hard, floor), generator)


def mask_tokens(input_ids: torch.Tensor, attention_mask: torch.Tensor, special_ids: list[int], mask_id: int,
                vocab_size: int, probability: float = 0.15, mask_ratio: float = 0.8, random_ratio: float = 0.1,
                generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """BERT masking: each real, non-special token is selected with ``probability``; a selected token becomes
    [MASK] with ``mask_ratio``, a random token with ``random_ratio``, else stays. Returns the masked ids (B, L) and
    the labels (B, L): the original id where selected, ``IGNORE`` elsewhere."""
    device = input_ids.device

    def uniform() -> torch.Tensor:
        return torch.rand(input_ids.shape, generator=generator, device="cpu" if generator is not None else device).to(device)

    eligible = attention_mask.bool() & ~torch.isin(input_ids, torch.tensor(special_ids, device=device))  # (B, L)
    selected = eligible & (uniform() < probability)  # (B, L)
    draw = uniform()  # (B, L) one draw decides [MASK] / random / unchanged
    to_mask = selected & (draw < mask_ratio)
    to_random = selected & (draw >= mask_ratio) & (draw < mask_ratio + random_ratio)
    random_ids = torch.randint(vocab_size, input_ids.shape, generator=generator,
                               device="cpu" if generator is not None else device).to(device)
    masked = torch.where(to_mask, torch.full_like(input_ids, mask_id), input_ids)
    masked = torch.where(to_random, random_ids, masked)
    labels = torch.where(selected, input_ids, torch.full_like(input_ids, IGNORE))
    return masked, labels


def enqueue(queue: torch.Tensor, ptr: int, rows: torch.Tensor) -> int:
    """Write ``rows`` (n, ...) into the ring buffer ``queue`` (Q, ...) from ``ptr`` on (wrapping); the new pointer."""
    size, n = queue.shape[0], rows.shape[0]
    positions = (ptr + torch.arange(n, device=queue.device)) % size  # (n,) as if written one by one
    queue[positions[-size:]] = rows[-size:].to(queue.dtype)  # more rows than slots: the newest win
    return int((ptr + n) % size)


def random_queue(size: int, dim: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """ALBEF's and BLIP's initial queue: ``normalize(randn(D, Q), dim=0)`` (one random unit vector per entry), stored
    as rows (Q, D) like every queue here."""
    return F.normalize(torch.randn(dim, size, generator=generator), dim=0).T.contiguous()  # (Q, D)


# ------------------------------------------------------------------------------------------------
# The objective
# ------------------------------------------------------------------------------------------------


def _teacher_of(model: nn.Module) -> nn.Module:
    """The model's momentum copy (``momentum_teacher()`` when the arch defines one, else a deep copy), frozen."""
    make = getattr(model, "momentum_teacher", None)
    teacher = make() if callable(make) else copy.deepcopy(model)
    mark_never_trainable(teacher)
    return teacher.eval()


@register_objective("albef", options=AlbefOptions)
class AlbefObjective(Objective):
    """ITC (momentum teacher, queues, distillation) + ITM (hard negatives) + MLM + LM, weighted."""

    coupled_keys = ()  # each micro-batch is scored against its own batch and the queue (the queue is the big set)

    def __init__(self, options: AlbefOptions, context: ObjectiveContext) -> None:
        super().__init__(context)
        self.options = options
        model = context.model
        name = type(self).__name__
        if model is None:
            raise ConfigError(f"{name}: needs the model (ObjectiveContext.model) for its momentum teacher.")
        needs = [("itm_weight", "itm_logits"), ("mlm_weight", "mlm_logits"), ("lm_weight", "caption_hidden")]
        for weight, method in needs:
            if getattr(options, weight) > 0 and not hasattr(model, method):
                raise ConfigError(f"objective options {weight} > 0 need arch fusion (model {model.config.name!r} is arch "
                                  f"{model.config.arch!r}); set model.overrides.arch: fusion or set {weight}: 0.")
        if options.mlm_weight > 0 and getattr(model, "mlm_head", None) is None:
            raise ConfigError("objective option mlm_weight > 0 needs the MLM head; set arch_options.mlm_head: true or mlm_weight: 0.")
        if options.lm_weight > 0 and getattr(model, "decoder", None) is None:
            raise ConfigError("objective option lm_weight > 0 needs the caption decoder; set arch_options.decoder_layers > 0 "
                              "or lm_weight: 0.")
        self.teacher = _teacher_of(model)
        dim = int(model.config.embed_dim)
        size = options.queue_size
        self.register_buffer("image_queue", torch.zeros(size, dim))  # (Q, D) momentum image features
        self.register_buffer("text_queue", torch.zeros(size, dim))  # (Q, D) momentum text features
        self.register_buffer("id_queue", torch.full((size,), -1, dtype=torch.long))  # (Q,) image ids, -1 = empty
        self.register_buffer("queue_ptr", torch.zeros((), dtype=torch.long))  # () next slot to write
        self.register_buffer("queue_filled", torch.zeros((), dtype=torch.long))  # () valid slots (<= Q)
        if options.queue_init == "random" and size > 0:
            # ALBEF/BLIP: random unit vectors (image, then text), never positives (id -1). Drawn from a generator
            # seeded with the stage's seed (torch.initial_seed()), so every rank starts with the same queue and the
            # global random stream is not consumed.
            generator = torch.Generator().manual_seed(torch.initial_seed())
            self.image_queue.copy_(random_queue(size, dim, generator))
            self.text_queue.copy_(random_queue(size, dim, generator))
            self.queue_filled.fill_(size)
        self.register_buffer("steps_done", torch.zeros((), dtype=torch.long))  # () optimizer steps (α ramp)
        self._pending: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []  # momentum rows to enqueue
        self._pairs: tuple[list[torch.Tensor], list[torch.Tensor]] | None = None
        if options.mlm_weight > 0:
            from vlalign.models.towers import build_tokenizer_for

            tokenizer = build_tokenizer_for(model.config)
            # tokens MLM never selects: ALBEF's rule excludes [PAD] and [CLS] only ([SEP] may be masked); else every
            # special token
            excluded = {tokenizer.pad_token_id, tokenizer.cls_token_id} if options.mlm_mask_sep \
                else set(tokenizer.all_special_ids)
            self.mlm_excluded_ids = sorted(i for i in excluded if i is not None)
            self.mask_id = int(tokenizer.mask_token_id)
            self.vocab_size = int(model.mlm_head.decoder.weight.shape[0])

    def train(self, mode: bool = True) -> AlbefObjective:
        """The teacher always runs in eval mode (deterministic soft targets)."""
        super().train(mode)
        self.teacher.eval()
        return self

    # ----- α, teacher, queue -----

    def alpha(self) -> float:
        """The distillation weight at this step (0 without distillation)."""
        if not self.options.distill:
            return 0.0
        ramp = round(self.options.alpha_ramp_epochs * self.context.steps_per_epoch)
        return ramped_alpha(self.options.alpha, int(self.steps_done), ramp)

    def queue_columns(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The valid queue entries: image features (Q', D), text features (Q', D), image ids (Q',)."""
        filled = int(self.queue_filled)
        return self.image_queue[:filled], self.text_queue[:filled], self.id_queue[:filled]

    def after_step(self, model: nn.Module, step: int) -> None:
        """EMA of the teacher, then the batch's momentum features (from every rank) into the queues."""
        if self._pairs is None:
            student = dict(model.named_parameters())
            names = [n for n, _ in self.teacher.named_parameters() if n in student]
            teacher = dict(self.teacher.named_parameters())
            self._pairs = ([teacher[n].data for n in names], [student[n].data for n in names])
        with torch.no_grad():
            ema_update(self._pairs[0], self._pairs[1], self.options.momentum)
            if self._pending and self.options.queue_size > 0:
                image, text, ids = (torch.cat(parts) for parts in zip(*self._pending))  # (n, D), (n, D), (n,)
                if self.context.dist.distributed:
                    from vlalign.distributed.gather import gather_no_grad

                    image, text, ids = gather_no_grad(image), gather_no_grad(text), gather_no_grad(ids)
                ptr = int(self.queue_ptr)
                enqueue(self.image_queue, ptr, image)
                enqueue(self.text_queue, ptr, text)
                self.queue_ptr.fill_(enqueue(self.id_queue, ptr, ids))
                self.queue_filled.fill_(min(self.options.queue_size, int(self.queue_filled) + ids.shape[0]))
        self._pending.clear()
        self.steps_done += 1

    # ----- the terms -----

    def forward(self, out: dict[str, torch.Tensor], batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        opts = self.options
        model = self.context.model
        ids = batch["index"].to(out["image_features"].device).long()  # (B,) image ids
        alpha = self.alpha()
        with torch.no_grad():
            image_tokens_m, image_pooled_m = self.teacher.image_outputs(batch["pixels"])  # (B, T, C), (B, C)
            image_m = F.normalize(self.teacher.image_proj(image_pooled_m).float(), dim=-1)  # (B, D)
            text_pooled_m = self.teacher.text_tower.outputs(batch["input_ids"], batch["attention_mask"])[1]  # (B, H)
            text_m = F.normalize(self.teacher.text_proj(text_pooled_m).float(), dim=-1)  # (B, D)
        self._pending.append((image_m, text_m, ids))
        terms: dict[str, torch.Tensor] = {}
        total = out["image_features"].new_zeros(())
        if opts.itc_weight > 0:
            terms["itc"] = self.itc(out, image_m, text_m, ids, alpha)
            total = total + opts.itc_weight * terms["itc"]
        if opts.itm_weight > 0:
            same_text = None
            if opts.itm_same_text_positive:
                tokens = batch["input_ids"].to(ids.device)
                same_text = (tokens[:, None, :] == tokens[None, :, :]).all(dim=2)  # (B, B) identical captions
            terms["itm"], terms["itm_accuracy"] = self.itm(model, out, ids, image_m, text_m, same_text)
            total = total + opts.itm_weight * terms["itm"]
        if opts.mlm_weight > 0:
            terms["mlm"] = self.mlm(model, out, batch, image_tokens_m, alpha)
            total = total + opts.mlm_weight * terms["mlm"]
        if opts.lm_weight > 0:
            terms["lm"] = self.lm(model, out, batch)
            total = total + opts.lm_weight * terms["lm"]
        result = {"loss": total}
        result.update({k: v.detach() for k, v in terms.items()})
        result["alpha"] = torch.tensor(alpha, device=total.device)
        return result

    def itc(self, out: dict[str, torch.Tensor], image_m: torch.Tensor, text_m: torch.Tensor, ids: torch.Tensor,
            alpha: float) -> torch.Tensor:
        """Contrastive loss of the student rows against the momentum batch + queue, with distilled targets."""
        scale = out["logit_scale"].float()
        image_q, text_q, ids_q = self.queue_columns()
        image_cols = torch.cat([image_m, image_q.to(image_m.dtype)])  # (K, D), K = B + Q'
        text_cols = torch.cat([text_m, text_q.to(text_m.dtype)])  # (K, D)
        col_ids = torch.cat([ids, ids_q])  # (K,)
        positives = positive_mask(ids, col_ids, self.options.mask_same_image)  # (B, K)
        sim_i2t = scale * out["image_features"].float() @ text_cols.T  # (B, K)
        sim_t2i = scale * out["text_features"].float() @ image_cols.T  # (B, K)
        with torch.no_grad():
            teacher_i2t = scale * image_m @ text_cols.T if alpha > 0 else None  # (B, K)
            teacher_t2i = scale * text_m @ image_cols.T if alpha > 0 else None  # (B, K)
            targets_i2t = distillation_targets(positives, teacher_i2t, alpha)
            targets_t2i = distillation_targets(positives, teacher_t2i, alpha)
        return 0.5 * (soft_cross_entropy(sim_i2t, targets_i2t) + soft_cross_entropy(sim_t2i, targets_t2i))

    def itm_negative_weights(self, out: dict[str, torch.Tensor], image_m: torch.Tensor, text_m: torch.Tensor,
                             ids: torch.Tensor, same_text: torch.Tensor | None = None
                             ) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, B) weights of each image's negative captions and (B, B) of each caption's negative images.

        ``itm_negatives: teacher`` scores the student rows against the momentum teacher's batch features, as ALBEF's
        and BLIP's pre-training (``softmax(sim_i2t[:, :bs])`` with ``sim_i2t = image_feat @ text_feat_all / temp``);
        ``student`` scores student against student. Captions of the same image id get weight 0, and with
        ``same_text`` (B, B) (``itm_same_text_positive``) so do pairs whose captions are identical: a caption that
        is word for word one of the image's own describes it, so it is a false negative (templated and web corpora
        repeat captions across images; on the built-in data 38 % of the training pairs share their caption with
        another image, and an ITM head trained to reject them learns little more than its label prior).
        """
        opts = self.options
        scale = out["logit_scale"].float()
        image, text = out["image_features"].float().detach(), out["text_features"].float().detach()  # (B, D) each
        if opts.itm_negatives == "teacher":
            sim_i2t = scale * image @ text_m.float().T  # (B, B) student images x teacher captions
            sim_t2i = scale * text @ image_m.float().T  # (B, B) student captions x teacher images
        else:
            sim_i2t = scale * image @ text.T  # (B, B) student x student
            sim_t2i = sim_i2t.T
        positives = ids[:, None] == ids[None, :]  # (B, B) same image
        if same_text is not None:
            positives = positives | same_text
        return (negative_weights(sim_i2t, positives, opts.hard_negatives, opts.negative_weight_floor),
                negative_weights(sim_t2i, positives.T, opts.hard_negatives, opts.negative_weight_floor))

    def itm(self, model: nn.Module, out: dict[str, torch.Tensor], ids: torch.Tensor, image_m: torch.Tensor,
            text_m: torch.Tensor, same_text: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """ITM cross-entropy over the B positive pairs and the 2B hard-negative pairs; and its accuracy."""
        text_tokens, text_mask, image_tokens = out["text_tokens"], out["text_mask"], out["image_tokens"]
        with torch.no_grad():
            weights_i2t, weights_t2i = self.itm_negative_weights(out, image_m, text_m, ids, same_text)  # (B, B) each
            neg_text = draw_negatives(weights_i2t)  # (B,) a caption per image
            neg_image = draw_negatives(weights_t2i)  # (B,) an image per caption
        logits = [model.itm_logits(text_tokens, text_mask, image_tokens)]  # (B, 2) matching pairs
        has_text, has_image = neg_text >= 0, neg_image >= 0
        rows = torch.nonzero(has_text).squeeze(1)  # images with a negative caption
        if rows.numel():
            logits.append(model.itm_logits(text_tokens[neg_text[rows]], text_mask[neg_text[rows]], image_tokens[rows]))
        rows = torch.nonzero(has_image).squeeze(1)  # captions with a negative image
        if rows.numel():
            logits.append(model.itm_logits(text_tokens[rows], text_mask[rows], image_tokens[neg_image[rows]]))
        logits = torch.cat(logits).float()  # (B + n1 + n2, 2)
        labels = torch.zeros(logits.shape[0], dtype=torch.long, device=logits.device)
        labels[: text_tokens.shape[0]] = 1
        loss = F.cross_entropy(logits, labels)
        return loss, (logits.argmax(dim=1) == labels).float().mean().detach()

    def mlm(self, model: nn.Module, out: dict[str, torch.Tensor], batch: dict[str, Any], image_tokens_m: torch.Tensor,
            alpha: float) -> torch.Tensor:
        """Masked-token cross-entropy of the fused states (mixed with the teacher's soft predictions)."""
        opts = self.options
        masked, labels = mask_tokens(batch["input_ids"], batch["attention_mask"], self.mlm_excluded_ids, self.mask_id,
                                     self.vocab_size, opts.mlm_probability, opts.mlm_mask_ratio, opts.mlm_random_ratio)
        selected = labels != IGNORE  # (B, L)
        mask = batch["attention_mask"]
        fused = model.fuse(model.text_outputs(masked, mask)[0], mask, out["image_tokens"])  # (B, L, H)
        logits = model.mlm_logits(fused[selected]).float()  # (n, V) only where a token is to be predicted
        if logits.shape[0] == 0:
            return fused.sum() * 0.0  # no token selected in this batch (tiny batches): a zero that keeps the graph
        loss = F.cross_entropy(logits, labels[selected])
        if alpha > 0 and opts.mlm_distill:
            with torch.no_grad():
                teacher_fused = self.teacher.fuse(self.teacher.text_outputs(masked, mask)[0], mask, image_tokens_m)
                soft = self.teacher.mlm_logits(teacher_fused[selected]).float().softmax(dim=1)  # (n, V)
            loss = (1.0 - alpha) * loss + alpha * soft_cross_entropy(logits, soft)
        return loss

    def lm(self, model: nn.Module, out: dict[str, torch.Tensor], batch: dict[str, Any]) -> torch.Tensor:
        """Next-token cross-entropy of the caption decoder ([CLS] as BOS, up to and including [SEP])."""
        ids, mask = batch["input_ids"], batch["attention_mask"]
        hidden = model.caption_hidden(ids, mask, out["image_tokens"])  # (B, L, H)
        valid = mask[:, 1:].bool()  # (B, L-1) positions whose next token is real
        logits = model.decoder.head(hidden[:, :-1][valid]).float()  # (n, V)
        return F.cross_entropy(logits, ids[:, 1:][valid], label_smoothing=self.options.lm_label_smoothing)


@register_objective("blip", options=BlipOptions)
class BlipObjective(AlbefObjective):
    """BLIP pre-training: ITC (momentum, queue with same-image positives) + ITM (hard negatives) + captioning LM."""
