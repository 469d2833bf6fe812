"""Configuration of one training stage: what it trains, with which objective, on what, and how (device, precision)."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields
from typing import Any

from vlalign.errors import ConfigError
from vlalign.reproducibility import DEFAULT_MODE, MODES


#: Values of the device, precision and compute fields.
DEVICES = ("auto", "cpu", "cuda")
PRECISIONS = ("fp32", "bf16", "fp16")
COMPUTES = ("local", "kubernetes")


@dataclass
class StageConfig:
    """One stage of multi-stage training (e.g. LiT-style projections only, then everything).

    The same config runs on CPU and GPU, in one process, under torchrun and in a Kubernetes pod: ``batch_size`` is
    the global batch of one optimizer step, split over the ranks and then into ``accumulate`` micro-batches.
    """

    name: str = "stage1"  # stage name; a checkpoint only resumes a stage of the same name
    trainable: list[str] = field(default_factory=lambda: ["all"])  # parameter-name prefixes to train, or ["all"]
    objective: str = "clip"  # registered objective (vlalign.objectives.list_objectives()), e.g. clip
    objective_options: dict[str, Any] = field(default_factory=dict)  # options of that objective (its dataclass)
    epochs: int = 1  # passes over the training images (ignored when max_steps is set)
    max_steps: int | None = None  # total optimizer steps; overrides epochs when set
    batch_size: int = 64  # global image-text pairs per optimizer step (each epoch drops its incomplete last batch)
    accumulate: int = 1  # micro-batches per optimizer step on each rank (contrastive losses stay exact)
    lr: float = 1e-3  # peak learning rate of AdamW
    weight_decay: float = 0.1  # AdamW decay on weight matrices (never on biases, norms or logit_scale)
    warmup_steps: int = 30  # linear warmup steps from 0 to lr, then cosine decay
    min_lr_ratio: float = 0.0  # the cosine ends at lr * min_lr_ratio
    seed: int = 0  # seeds model init, batch order, caption choice and augmentation
    checkpoint_every: int = 100  # save a resumable checkpoint every this many steps (0 = final only)
    grad_clip: float | None = 1.0  # max global gradient norm (None = no clipping)
    caption_langs: list[str] = field(default_factory=lambda: ["en"])  # caption languages to sample from
    num_workers: int = 0  # DataLoader worker processes (0 = load in the training process)
    shuffle_buffer: int = 1000  # streamed shards: samples mixed in each worker's shuffle buffer
    cache_in_memory: bool = False  # decode every training image once into RAM (tiny corpora) instead of streaming
    log_every: int = 10  # call TrainCallback.on_step and record history every this many steps
    device: str = "auto"  # auto (CUDA when available) | cpu | cuda
    precision: str = "fp32"  # fp32 | bf16 (autocast) | fp16 (autocast + gradient scaler)
    compile: bool = False  # torch.compile the model
    tf32: bool = True  # allow TF32 matrix maths on GPUs that have it
    grad_checkpointing: bool = False  # recompute tower activations in the backward pass (less memory)
    pin_memory: bool = True  # pinned host memory and non-blocking copies (CUDA only)
    compute: str = "local"  # local (this process / torchrun) | kubernetes (a Job on the cluster, see launch.k8s)
    reproducibility: str = DEFAULT_MODE  # portable (same bits on any x86-64 with AVX2) | native (fastest kernels here)
    cpu_threads: int | None = None  # CPU threads; None = 2 when portable, torch's default when native

    def __post_init__(self) -> None:
        self.trainable = list(self.trainable)
        self.caption_langs = list(self.caption_langs)
        checks = [
            (bool(self.trainable), "trainable", 'a non-empty list of parameter-name prefixes or ["all"]'),
            (self.epochs >= 1 or (self.max_steps or 0) >= 1, "epochs", ">= 1 (or set max_steps >= 1)"),
            (self.max_steps is None or self.max_steps >= 1, "max_steps", "None or an integer >= 1"),
            (self.batch_size >= 2, "batch_size", "an integer >= 2 (a contrastive batch needs negatives)"),
            (self.lr > 0, "lr", "a positive float"),
            (self.weight_decay >= 0, "weight_decay", "a float >= 0"),
            (self.warmup_steps >= 0, "warmup_steps", "an integer >= 0"),
            (0.0 <= self.min_lr_ratio <= 1.0, "min_lr_ratio", "a float in [0, 1]"),
            (self.checkpoint_every >= 0, "checkpoint_every", "an integer >= 0"),
            (self.grad_clip is None or self.grad_clip > 0, "grad_clip", "None or a positive float"),
            (bool(self.caption_langs), "caption_langs", 'a non-empty list such as ["en"] or ["en", "zh"]'),
            (self.num_workers >= 0, "num_workers", "an integer >= 0"),
            (self.log_every >= 1, "log_every", "an integer >= 1"),
            (self.accumulate >= 1, "accumulate", "an integer >= 1"),
            (self.batch_size % self.accumulate == 0, "accumulate", f"a divisor of batch_size ({self.batch_size})"),
            (self.shuffle_buffer >= 1, "shuffle_buffer", "an integer >= 1"),
            (self.device in DEVICES, "device", f"one of {list(DEVICES)}"),
            (self.precision in PRECISIONS, "precision", f"one of {list(PRECISIONS)}"),
            (self.compute in COMPUTES, "compute", f"one of {list(COMPUTES)}"),
            (self.reproducibility in MODES, "reproducibility", f"one of {list(MODES)}"),
            (self.cpu_threads is None or self.cpu_threads >= 1, "cpu_threads", "None or an integer >= 1"),
            (isinstance(self.objective_options, dict), "objective_options", "a mapping of option names to values"),
        ]
        for ok, name, expected in checks:
            if not ok:
                raise ConfigError(f"stage {self.name!r}: {name}={getattr(self, name)!r}, expected {expected}.")
        from vlalign.objectives.registry import objective_options  # late: objectives import training helpers

        objective_options(self.objective, self.objective_options)

    def to_dict(self) -> dict[str, Any]:
        """Plain dict of the fields (stored in checkpoints, logged as run parameters)."""
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> StageConfig:
        """Build from a dict, rejecting unknown fields with a :class:`ConfigError`."""
        allowed = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - allowed)
        if unknown:
            raise ConfigError(f"stage config: unknown field(s) {unknown}; allowed fields are {sorted(allowed)}.")
        return cls(**data)
