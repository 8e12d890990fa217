"""Training of the real-image testbed: a diffusers UNet on emoji renders, conditioned on MiniLM.

Pixel-space epsilon prediction (no VAE at 16-32 px) with diffusers' ``UNet2DConditionModel``
(three levels, cross-attention width 384 = MiniLM's token states) and the cosine noise schedule
(SD's scaled-linear one never reaches pure noise at this size). Captions are the world's
templates, half of them with the style named ("a photo of a dog in Noto style"), 10 % null for
classifier-free guidance. Training resumes from ``train_state.pt`` in the output folder.
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
from pathlib import Path
from typing import Any, NamedTuple

import torch

from bridge.realworld.concepts import STYLE_PHRASES, TEMPLATES
from bridge.realworld.text import HIDDEN_SIZE, MiniLMEncoder
from bridge.realworld.world import RealWorld

__all__ = [
    "CaptionBank",
    "TrainConfig",
    "TrainResult",
    "build_unet",
    "diffusion_loss",
    "measure_step_time",
    "scheduler",
    "train_unet",
]


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """Every knob of the UNet training (recorded in the run manifest).

    Attributes:
      block_out_channels, layers_per_block, attention_head_dim, norm_num_groups: UNet sizes.
      steps, batch_size, lr, warmup: AdamW with a one-cycle (warm-up then cosine) schedule.
      p_null: caption dropout. p_style: probability that a caption names the style.
      p_synonym: probability that a caption uses a synonym instead of the name (0: synonyms
        reach the model only through MiniLM's semantics, as paraphrases SD never saw).
      grad_clip: max gradient norm. checkpoint_every: steps between resumable states.
      seed: weights, data and noise seed.
    """

    block_out_channels: tuple[int, ...] = (32, 64, 128)
    layers_per_block: int = 1
    attention_head_dim: int = 2
    norm_num_groups: int = 8
    steps: int = 4000
    batch_size: int = 32
    lr: float = 1e-3
    warmup: float = 0.05
    p_null: float = 0.1
    p_style: float = 0.5
    p_synonym: float = 0.0
    grad_clip: float = 1.0
    checkpoint_every: int = 250
    seed: int = 0


def build_unet(size: int, cfg: TrainConfig = TrainConfig()):
    """Random ``UNet2DConditionModel`` for RGB ``size`` x ``size`` images, cross-attention 384."""
    from bridge.tiny import build_tiny_unet

    return build_tiny_unet(
        cfg.seed,
        sample_size=size,
        in_channels=3,
        block_out_channels=tuple(cfg.block_out_channels),
        cross_attention_dim=HIDDEN_SIZE,
        attention_head_dim=cfg.attention_head_dim,
        norm_num_groups=cfg.norm_num_groups,
        layers_per_block=cfg.layers_per_block,
    )


def scheduler():
    """The training noise schedule (DDPM, 1,000 steps, cosine betas)."""
    from diffusers import DDPMScheduler

    return DDPMScheduler(num_train_timesteps=1000, beta_schedule="squaredcos_cap_v2")


def diffusion_loss(unet, sched, x0, embeds, timesteps, noise) -> torch.Tensor:
    r"""Mean squared epsilon error :math:`\|\epsilon_\theta(x_t, t, c) - \epsilon\|^2 / n`."""
    pred = unet(sched.add_noise(x0, noise, timesteps), timesteps, embeds).sample
    return ((pred - noise) ** 2).mean()  # by hand: F.mse_loss breaks torch.func transforms


class CaptionBank:
    """Every training caption of a world, encoded once: ``embeds[index]`` for a drawn caption.

    Index layout: for concept ``c``, name variant ``v`` (0 = the name, then synonyms), template
    ``t`` and style slot ``s`` (0 = none, then the world's styles), plus one null prompt last.
    """

    def __init__(self, world: RealWorld, text: MiniLMEncoder, *, synonyms: bool) -> None:
        self.world, self.styles = world, (None, *world.styles)
        prompts, self.index = [], {}
        for c, name in enumerate(world.concepts):
            concept = world.concept(name)
            article = concept.article + " " if concept.article else ""
            variants = [concept.phrase] + (
                [article + s for s in concept.synonyms] if synonyms else []
            )
            for v, phrase in enumerate(variants):
                for t, template in enumerate(TEMPLATES):
                    for s, style in enumerate(self.styles):
                        tail = f" in {STYLE_PHRASES[style]}" if style in STYLE_PHRASES else ""
                        self.index[c, v, t, s] = len(prompts)
                        prompts.append(template.format(phrase=phrase) + tail)
        self.prompts = prompts + [""]
        self.variants = [
            1 + (len(world.concept(n).synonyms) if synonyms else 0) for n in world.concepts
        ]
        self.embeds = torch.cat(
            [
                text.encode_prompts(self.prompts[i : i + 256])
                for i in range(0, len(self.prompts), 256)
            ]
        )

    def draw(self, pair_ids: torch.Tensor, cfg: TrainConfig, gen: torch.Generator) -> torch.Tensor:
        """Caption embeddings ``(n, seq, 384)`` for images of ``pair_ids`` (seeded choices)."""
        n = len(pair_ids)
        u = torch.rand(n, 5, generator=gen)
        rows = []
        for i, pid in enumerate(pair_ids.tolist()):
            c, style = self.world.pairs[pid]
            if u[i, 0] < cfg.p_null:
                rows.append(len(self.prompts) - 1)
                continue
            variants = self.variants[c]
            v = 1 + int(u[i, 1] * (variants - 1)) if variants > 1 and u[i, 2] < cfg.p_synonym else 0
            t = int(u[i, 3] * len(TEMPLATES)) % len(TEMPLATES)
            s = self.styles.index(style) if u[i, 4] < cfg.p_style else 0
            rows.append(self.index[c, min(v, variants - 1), t, s])
        return self.embeds[torch.tensor(rows)]


class TrainResult(NamedTuple):
    """The trained UNet (eval mode), the loss of each step run now, and seconds a step."""

    unet: Any
    losses: list[float]
    step_seconds: float


def _lr_schedule(opt, cfg: TrainConfig):
    return torch.optim.lr_scheduler.OneCycleLR(
        opt, max_lr=cfg.lr, total_steps=cfg.steps, pct_start=cfg.warmup
    )


def train_unet(
    world: RealWorld,
    text: MiniLMEncoder,
    cfg: TrainConfig,
    out_dir: str | Path,
    *,
    progress: bool = True,
):
    """Train the UNet on ``world`` and save ``out_dir/unet`` and ``out_dir/scheduler``.

    A state (weights, optimizer, schedule, generator) is saved every ``checkpoint_every`` steps
    to ``out_dir/train_state.pt`` and training resumes from it; it is deleted at the end.

    Args:
      world: the concept world (pairs drawn uniformly). text: the frozen MiniLM encoder.
      cfg: training knobs. out_dir: output folder. progress: show a progress bar.

    Returns:
      :class:`TrainResult`.

    Raises:
      ValueError: if a saved state belongs to another config.
    """
    from tqdm.auto import tqdm

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    unet, sched = build_unet(world.size, cfg), scheduler()
    bank = CaptionBank(world, text, synonyms=cfg.p_synonym > 0)
    opt = torch.optim.AdamW(unet.parameters(), lr=cfg.lr, weight_decay=0.0)
    lr_sched = _lr_schedule(opt, cfg)
    gen = torch.Generator().manual_seed(cfg.seed)
    state_path, start = out / "train_state.pt", 0
    key = json.dumps({"cfg": dataclasses.asdict(cfg), "world": repr(world)}, sort_keys=True)
    if state_path.is_file():
        state = torch.load(state_path, weights_only=False)
        if state["key"] != key:
            raise ValueError(
                f"{state_path} was saved by another config; delete it or use another `--out`."
            )
        unet.load_state_dict(state["unet"])
        opt.load_state_dict(state["opt"])
        lr_sched.load_state_dict(state["lr"])
        gen.set_state(state["gen"])
        start = state["step"]
    unet.train()
    losses = []
    t0 = time.perf_counter()
    bar = tqdm(
        range(start, cfg.steps),
        desc="realworld unet",
        disable=not progress,
        initial=start,
        total=cfg.steps,
    )
    for step in bar:
        ids = torch.randint(0, len(world.pairs), (cfg.batch_size,), generator=gen)
        x0 = world.sample(ids, gen)
        cond = bank.draw(ids, cfg, gen)
        t = torch.randint(0, sched.config.num_train_timesteps, (cfg.batch_size,), generator=gen)
        noise = torch.randn(x0.shape, generator=gen)
        loss = diffusion_loss(unet, sched, x0, cond, t, noise)
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(unet.parameters(), cfg.grad_clip)
        opt.step()
        lr_sched.step()
        losses.append(loss.item())
        bar.set_postfix(loss=f"{losses[-1]:.4f}")
        done = step + 1
        if done % cfg.checkpoint_every == 0 and done < cfg.steps:
            state = {
                "key": key,
                "step": done,
                "unet": unet.state_dict(),
                "opt": opt.state_dict(),
                "lr": lr_sched.state_dict(),
                "gen": gen.get_state(),
            }
            torch.save(state, state_path.with_suffix(".tmp"))
            os.replace(state_path.with_suffix(".tmp"), state_path)
    seconds = (time.perf_counter() - t0) / max(len(losses), 1)
    unet.eval()
    unet.save_pretrained(out / "unet")
    sched.save_pretrained(out / "scheduler")
    state_path.unlink(missing_ok=True)
    return TrainResult(unet, losses, seconds)


def measure_step_time(world: RealWorld, text: MiniLMEncoder, cfg: TrainConfig, *, steps: int = 4):
    """Median wall time of one training step (data, forward, backward, AdamW), first step excluded.

    Returns:
      ``{"size", "parameters", "step_seconds", "cpu_seconds", "data_seconds", "load_average"}``:
      wall and process-CPU seconds a step. With one thread the CPU time is close to the wall
      time on an idle machine; the load average says how busy the machine was.
    """
    unet, sched = build_unet(world.size, cfg), scheduler()
    cond = text.encode_prompts(["a photo of a dog"]).expand(cfg.batch_size, -1, -1)
    opt = torch.optim.AdamW(unet.parameters(), lr=cfg.lr)
    gen = torch.Generator().manual_seed(cfg.seed)
    unet.train()
    times, cpu, data = [], [], []
    for _ in range(steps + 1):
        t0, c0 = time.perf_counter(), time.process_time()
        ids = torch.randint(0, len(world.pairs), (cfg.batch_size,), generator=gen)
        x0 = world.sample(ids, gen)
        t1 = time.perf_counter()
        t = torch.randint(0, 1000, (cfg.batch_size,), generator=gen)
        loss = diffusion_loss(unet, sched, x0, cond, t, torch.randn(x0.shape, generator=gen))
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(unet.parameters(), cfg.grad_clip)
        opt.step()
        times.append(time.perf_counter() - t0)
        cpu.append(time.process_time() - c0)
        data.append(t1 - t0)
    times, cpu, data = sorted(times[1:]), sorted(cpu[1:]), sorted(data[1:])
    return {
        "size": world.size,
        "parameters": sum(p.numel() for p in unet.parameters()),
        "step_seconds": times[len(times) // 2],
        "cpu_seconds": cpu[len(cpu) // 2],
        "data_seconds": data[len(data) // 2],
        "load_average": os.getloadavg()[0],
    }
