"""Stage-1 training: the motion encoder (with identity decoupling) and the flow-warping renderer.

A source and a target frame of the same clip (adjacent with probability ``p_adjacent``): the
renderer gets the source's appearance latent and skip features and the target's motion code and
must reproduce the target. Losses (weights from the config, defaults 1 / 0.1 / 1 / 0.1 / 0.1):
  rec         L1(recon, target)
  perceptual  VGG19 features of recon vs target (weights from ``vgg_weights``; ``random`` only in tests)
  adv         non-saturating GAN loss against the StyleGAN2 discriminator
  mi          CLUB upper bound of the mutual information between the identity embedding and the
              identity-excluded (motion) embedding; the density head itself learns by maximum
              likelihood on detached embeddings (``club_nll``, an extra term that only moves it)
  id          AAM-softmax (margin 0.2, scale 30) over the clip identities on the identity
              embeddings of source, target and an augmented face of another identity

    python -m training.train_motion_encoder --config configs/train_stage1.yaml data=DATA out=RUN vgg_weights=vgg19.pth
    torchrun --nproc_per_node 4 -m training.train_motion_encoder --config ... (same options)
"""
from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call
from torch.nn.parallel import DistributedDataParallel as DDP

from models.checkpoints import export_official, load_stage1
from models.errors import AnitalkerError
from models.stage1 import Stage1, Stage1Dims

from .common import (CsvLog, TrainLoop, autocast, autocast_dtype, load_training_state, mean_over_ranks, optimizer_to,
                     save_training_state, setup_runtime, sync_buffers, teardown)
from .config import load_config, to_dict
from .data import FramePairs
from .losses import (AAMSoftmax, Discriminator, VGG19Features, augment, club, club_likelihood_loss,
                     d_nonsaturating, g_nonsaturating, perceptual_loss)


@dataclass(frozen=True)
class Stage1TrainConfig:
    data: str = "data"
    out: str = "runs/stage1"
    init: str = ""                     # official or project stage-1 file to fine-tune (its dims win)
    model: Stage1Dims = field(default_factory=Stage1Dims)
    vgg_weights: str = ""              # torchvision vgg19 ImageNet .pth; "random" (tests only)
    vgg_channel_divisor: int = 1       # > 1 only with random weights (tests)
    p_adjacent: float = 0.2            # how often the target is the frame right after the source
    batch_size: int = 8                # per process
    lr: float = 2e-3                   # LIA's Adam settings (lr 2e-3, betas 0, 0.99)
    d_lr: float = 2e-3
    beta1: float = 0.0
    beta2: float = 0.99
    w_rec: float = 1.0
    w_perceptual: float = 0.1
    w_adv: float = 1.0
    w_mi: float = 0.1
    w_id: float = 0.1
    aam_margin: float = 0.2
    aam_scale: float = 30.0
    max_steps: int = 500_000
    log_every: int = 50
    save_every: int = 2000
    keep_every: int = 0
    workers: int = 4
    seed: int = 0
    precision: str = "auto"
    device: str = "auto"
    export: str = ""                   # at the end, also write the official key layout here
    progress: bool = True


class EncoderLoss(nn.Module):
    """Generator-side losses in one forward (DDP hooks forward only)."""

    def __init__(self, net: Stage1, vgg: VGG19Features | None, aam: AAMSoftmax, cfg: Stage1TrainConfig):
        super().__init__()
        self.net, self.vgg, self.aam, self.cfg = net, vgg, aam, cfg

    def forward(self, batch: dict, disc: nn.Module, gen: torch.Generator):
        net, cfg = self.net, self.cfg
        src, tgt = batch["source"], batch["target"]
        wa_s, feats = net.enc.net_app(src)
        wa_t, _ = net.enc.net_app(tgt)
        wa_o, _ = net.enc.net_app(augment(batch["other"], gen))
        recon = net.render(wa_s, net.enc.motion_code(wa_t), feats)
        parts = {"rec": F.l1_loss(recon, tgt)}
        parts["perceptual"] = perceptual_loss(self.vgg, recon, tgt) if cfg.w_perceptual else recon.new_zeros(())
        parts["adv"] = g_nonsaturating(disc(recon))
        wa = torch.cat([wa_s, wa_t, wa_o])
        dec = net.enc.net_decouping
        ident, motion = dec.identity_net(wa), dec.identity_excluded_net(wa)
        # The encoder minimises the CLUB bound through a frozen copy of the density head's weights;
        # the head learns only from the likelihood term on detached embeddings.
        frozen = {k: v.detach() for k, v in dec.identity_net_density.named_parameters()}
        parts["mi"] = club(functional_call(dec.identity_net_density, frozen, (ident,)), motion)
        parts["club_nll"] = club_likelihood_loss(dec.identity_net_density(ident.detach()), motion.detach())
        labels = torch.cat([batch["identity"], batch["identity"], batch["other_identity"]])
        parts["id"] = self.aam(ident, labels)
        total = (cfg.w_rec * parts["rec"] + cfg.w_perceptual * parts["perceptual"] + cfg.w_adv * parts["adv"]
                 + cfg.w_mi * parts["mi"] + cfg.w_id * parts["id"] + parts["club_nll"])
        return total, parts, recon.detach()


class DiscriminatorLoss(nn.Module):
    def __init__(self, disc: Discriminator):
        super().__init__()
        self.disc = disc

    def forward(self, real, fake):
        return d_nonsaturating(self.disc(real), self.disc(fake))


def build(cfg: Stage1TrainConfig, resume: dict | None) -> Stage1:
    if resume is not None:
        net = Stage1(Stage1Dims(**resume["dims"]))
        net.load_state_dict(resume["state_dict"])
    elif cfg.init:
        net = load_stage1(cfg.init)
    else:
        torch.manual_seed(cfg.seed)
        net = Stage1(cfg.model)
    return net


def make_vgg(cfg: Stage1TrainConfig) -> VGG19Features | None:
    """The perceptual network, or None when w_perceptual is 0 and no weights are given."""
    if not cfg.vgg_weights and not cfg.w_perceptual:
        return None
    if not cfg.vgg_weights:
        raise AnitalkerError("the perceptual loss needs ImageNet VGG19 weights: set vgg_weights=PATH "
                             "(torchvision's vgg19-dcbb9e9d.pth), or w_perceptual=0 to train without it")
    vgg = VGG19Features(cfg.vgg_channel_divisor)
    return vgg if cfg.vgg_weights == "random" else vgg.load_pretrained(cfg.vgg_weights)


def train(cfg: Stage1TrainConfig) -> dict:
    rt = setup_runtime(cfg.device)
    out = Path(cfg.out)
    resume = load_training_state(out)
    net = build(cfg, resume).to(rt.device).train()
    # Parameters the forward never uses (to_rgb1 is kept only for the official layout; noise is
    # never injected) stay frozen, so DDP's reducer does not wait for their gradients.
    for name, p in net.named_parameters():
        if name.startswith("dec.to_rgb1.") or name.endswith(".noise.weight"):
            p.requires_grad_(False)
    dims = net.dims
    ds = FramePairs(cfg.data, dims.size, cfg.p_adjacent, cfg.seed)
    torch.manual_seed(cfg.seed + 1)
    disc = Discriminator(dims).to(rt.device)
    aam = AAMSoftmax(dims.style_dim, ds.num_identities, cfg.aam_margin, cfg.aam_scale).to(rt.device)
    vgg = make_vgg(cfg)
    vgg = vgg.to(rt.device).eval() if vgg is not None else None
    betas = (cfg.beta1, cfg.beta2)
    trainable = [p for p in net.parameters() if p.requires_grad] + [*aam.parameters()]
    opt_g = torch.optim.Adam(trainable, lr=cfg.lr, betas=betas)
    opt_d = torch.optim.Adam(disc.parameters(), lr=cfg.d_lr, betas=betas)
    amp = autocast_dtype(cfg.precision, rt.device)
    scaler_g = torch.amp.GradScaler("cuda", enabled=amp == torch.float16)
    scaler_d = torch.amp.GradScaler("cuda", enabled=amp == torch.float16)
    if resume is not None:
        disc.load_state_dict(resume["disc"])
        aam.load_state_dict(resume["aam"])
        for o, k in ((opt_g, "opt_g"), (opt_d, "opt_d")):
            o.load_state_dict(resume[k])
            optimizer_to(o, rt.device)
        scaler_g.load_state_dict(resume["scaler_g"])
        scaler_d.load_state_dict(resume["scaler_d"])

    loop = TrainLoop(ds, cfg, rt, resume, "stage1")
    gmodel, dmodel = EncoderLoss(net, vgg, aam, cfg), DiscriminatorLoss(disc)
    if rt.distributed:
        ids = [rt.device.index] if rt.device.type == "cuda" else None
        gmodel, dmodel = DDP(gmodel, device_ids=ids), DDP(dmodel, device_ids=ids)
    aug_gen = torch.Generator()
    log = CsvLog(out / "log.csv", enabled=rt.main, resume_step=loop.step)
    if rt.main:
        out.mkdir(parents=True, exist_ok=True)
        print(f"stage 1 at {dims.size}px: {sum(p.numel() for p in net.parameters()):,} parameters, "
              f"{ds.num_identities} identities, {len(ds)} pairs per epoch, {rt.world} process(es) on "
              f"{rt.device}, starting at step {loop.step}", file=sys.stderr)
    last = {}
    for batch, step in loop:
        aug_gen.manual_seed(cfg.seed * 1_000_003 + rt.rank * 7919 + step)
        # generator step: the discriminator judges but does not learn
        disc.requires_grad_(False)
        with autocast(amp, rt.device):
            total, parts, recon = gmodel(batch, disc, aug_gen)
        opt_g.zero_grad(set_to_none=True)
        scaler_g.scale(total).backward()
        scaler_g.step(opt_g)
        scaler_g.update()
        # discriminator step on the same reconstructions
        disc.requires_grad_(True)
        with autocast(amp, rt.device):
            d_loss = dmodel(batch["target"], recon)
        opt_d.zero_grad(set_to_none=True)
        scaler_d.scale(d_loss).backward()
        scaler_d.step(opt_d)
        scaler_d.update()
        if loop.due(cfg.log_every):
            last = mean_over_ranks({"loss": total.detach(), **{k: v.detach() for k, v in parts.items()},
                                    "d_loss": d_loss.detach()}, rt)
            log.write(loop.step, {**last, "epoch": loop.epoch})
            loop.bar.set_postfix(rec=f"{last['rec']:.4f}")
        if rt.main and loop.due(cfg.save_every):
            save_training_state(out, net, net, {
                "disc": disc.state_dict(), "aam": aam.state_dict(), "opt_g": opt_g.state_dict(),
                "opt_d": opt_d.state_dict(), "scaler_g": scaler_g.state_dict(),
                "scaler_d": scaler_d.state_dict(), **loop.position(), "config": to_dict(cfg)},
                cfg.keep_every, loop.step)
            if loop.step == cfg.max_steps and cfg.export:
                export_official(cfg.export, net)
    sync_buffers(net, rt)
    net.eval()
    teardown(rt)
    return {"step": loop.step, "model": net, **last}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="train_motion_encoder", description=__doc__.split("\n\n")[0])
    p.add_argument("--config", default="configs/train_stage1.yaml", help="YAML recipe (default %(default)s)")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="e.g. data=DATA out=RUN vgg_weights=vgg19.pth")
    args = p.parse_args(argv)
    train(load_config(Stage1TrainConfig, args.config, args.overrides))
    return 0


if __name__ == "__main__":
    sys.exit(main())
