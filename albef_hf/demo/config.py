"""Every default of the demo, in one dataclass: the world, the model, the training budget, the evaluation."""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace
from typing import Any

__all__ = ["RECIPES", "DemoConfig"]


# (batch size, optimizer steps, peak learning rate) of the demo's training, by whether it trains in bf16.
# Where bf16 is native (a CPU with AVX512-BF16 or AMX, a GPU), 1000 steps of 64 pairs at 1e-3: 28 TFLOP,
# zero-shot TR/IR@1 about 74-77/71-74. In fp32, 1450 steps of 24 pairs at 7e-4: 16 TFLOP for TR/IR@1
# 61-66/55-63 over seeds 0-2 (at equal compute, smaller batches and more steps learn faster: 1100 x 32 gave
# 59-62/58-62, 550 x 64 35.6/33.3; at batch 24 a peak of 1e-3 left seed 1 at 60.2/54.6), see
# benchmarks/demo_compute.md.
RECIPES = {True: (64, 1000, 1e-3), False: (24, 1450, 7e-4)}


@dataclass
class DemoConfig:
    """Settings of `python -m albef_hf.demo` (the README's first command).

    The defaults pretrain a small ALBEF on the synthetic world with the recipe of the precision the CPU computes
    natively (`RECIPES`) and then evaluate zero-shot retrieval on held-out scenes. `scale` multiplies the training budget: the
    steps and the time budget (which stops a slow machine's training early, so the demo still ends).
    """

    # run
    seed: int = 0
    output_dir: str = "outputs/demo"
    push_to_hub: str | None = None
    report_examples: int = 6

    # world: images of `image_size` px, scenes of 1-4 shapes; a fraction of the training captions is noisy
    image_size: int = 64
    train_images: int = 10_000
    noisy_caption_fraction: float = 0.1
    eval_images: int = 500

    # model: a ViT on 16-px patches and a BERT whose upper half fuses the image, over the world's own words;
    # `conv_stem_channels` ("32,64,128": stride-2 3x3 convolutions before the patch projection; empty: none)
    # is the vision tower that learns shapes from little data (benchmarks/probe_vision_supervised.py)
    patch_size: int = 16
    conv_stem_channels: str = ""
    hidden_size: int = 128
    vision_layers: int = 4
    text_layers: int = 4
    fusion_layer: int = 2
    num_attention_heads: int = 4
    intermediate_size: int = 512
    embed_dim: int = 128
    init_std: float = 0.05
    max_length: int = 40

    # objectives (the paper's ablations switch them): ITC, ITM with hard negatives, MLM, momentum distillation
    itc_weight: float = 1.0
    itm_weight: float = 1.0
    mlm_weight: float = 1.0
    hard_negatives: bool = True
    distill: bool = True

    # training: AlbefTrainer with momentum distillation; a feature queue (queue_size > 0) slows learning from
    # scratch at this scale (its features go stale while the model changes fast), so the batch is the queue.
    # batch_size, max_steps and learning_rate left at 0 come from RECIPES, by the precision the run trains in
    max_steps: int = 0
    scale: float = 1.0
    batch_size: int = 0
    learning_rate: float = 0.0
    min_lr: float = 1e-5
    warmup_steps: int = 100
    momentum: float = 0.99
    alpha: float = 0.4
    # distillation ramps from 0 to `alpha` over these first steps (the original ramps over its first epoch, which
    # the demo's short runs do not complete: the fp32 recipe's 1450 steps of 24 are 0.7 of an epoch, and alpha
    # stayed below 0.3 with that ramp; over 200 steps the 1100 x 32 recipe gained 3-6 points of R@1 on seed 2)
    alpha_warmup_steps: int = 200
    queue_size: int = 0
    bf16: str = "auto"
    time_budget_minutes: float | None = 9.0
    dataloader_workers: int = 0
    logging_steps: int = 25

    # evaluation: ITC ranking re-ranked with ITM over each query's top k
    retrieval_k: int = 16
    eval_batch_size: int = 128
    # grounding in the report: Grad-CAM of ITC on this ViT block (in this small world the early, still local
    # blocks localise; the paper's ITM Grad-CAM on the fusion layers is measured too, and does not)
    gradcam_itc_block: int = 1

    @property
    def steps(self) -> int:
        """Optimizer steps of this run: `max_steps * scale` (after `with_recipe`)."""
        if not self.max_steps:
            raise ValueError("max_steps is 0 (the recipe's): call with_recipe(bf16) first")
        return max(1, round(self.max_steps * self.scale))

    @property
    def stem_channels(self) -> list[int] | None:
        """`conv_stem_channels` as `AlbefVisionConfig` takes it (None: no stem)."""
        if not self.conv_stem_channels:
            return None
        try:
            return [int(channels) for channels in self.conv_stem_channels.split(",")]
        except ValueError:
            raise ValueError(
                "conv_stem_channels takes comma-separated channel counts such as 32,64,128, got "
                f"{self.conv_stem_channels!r}"
            ) from None

    def with_recipe(self, bf16: bool) -> DemoConfig:
        """This config with `batch_size`, `max_steps` and `learning_rate` left at 0 taken from
        `RECIPES[bf16]`."""
        batch_size, max_steps, learning_rate = RECIPES[bf16]
        return replace(
            self,
            batch_size=self.batch_size or batch_size,
            max_steps=self.max_steps or max_steps,
            learning_rate=self.learning_rate or learning_rate,
        )

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)
