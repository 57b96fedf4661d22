"""Train the demo model: rectified flow on procedural clips, with caption dropout for CFG.

    python -m cachepass.demo.train --out runs/demo --device cuda --minutes 7

Reproducible from ``--seed`` (data, init and noise come from seeded generators; GPU kernels may
still differ in the last bits). Resumable: ``--out`` keeps ``checkpoint.pt`` (model, EMA,
optimizer, step, generators) every ``--save-every`` steps; running again continues. At the end it
writes the EMA weights as fp16 safetensors plus the model card JSON and the loss curve PNG, which
are what ships in ``cachepass/demo/``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time

import torch
import torch.nn.functional as F

from cachepass.demo.model import CARD, TRANSFORMER_CONFIG, WEIGHTS, DemoModel, TinyTextEncoder, build_transformer
from cachepass.demo.shapes import COLORS, DIRECTIONS, SHAPES, caption, describe, random_batch


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--steps", type=int, default=12000)
    p.add_argument("--minutes", type=float, default=None, help="stop (and export) after this much training time")
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--lr", type=float, default=5e-4)
    p.add_argument("--warmup", type=int, default=300)
    p.add_argument("--caption-dropout", type=float, default=0.1)
    p.add_argument("--ema", type=float, default=0.999)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--save-every", type=int, default=1000)
    p.add_argument("--log-every", type=int, default=50)
    p.add_argument("--eval-seeds", type=int, default=4, help="seeds of the final pixel check (32 clips each)")
    return p.parse_args(argv)


def lr_at(step: int, args) -> float:
    if step < args.warmup:
        return args.lr * (step + 1) / args.warmup
    progress = (step - args.warmup) / max(1, args.steps - args.warmup)
    return args.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0))))


def main(argv=None) -> int:
    args = parse_args(argv)
    os.makedirs(args.out, exist_ok=True)
    device = torch.device(args.device)
    torch.manual_seed(args.seed)
    transformer, text = build_transformer().to(device), TinyTextEncoder().to(device)
    params = [*transformer.parameters(), *text.parameters()]
    ema = [p.detach().clone() for p in params]
    opt = torch.optim.AdamW(params, lr=args.lr, betas=(0.9, 0.99), weight_decay=0.01)
    data_gen = torch.Generator().manual_seed(args.seed + 1)
    noise_gen = torch.Generator(device=device).manual_seed(args.seed + 2)
    history, step, trained_s = [], 0, 0.0
    ckpt_path = os.path.join(args.out, "checkpoint.pt")
    if os.path.exists(ckpt_path):
        state = torch.load(ckpt_path, map_location=device, weights_only=False)
        transformer.load_state_dict(state["transformer"])
        text.load_state_dict(state["text"])
        opt.load_state_dict(state["opt"])
        for e, saved in zip(ema, state["ema"]):
            e.copy_(saved)
        data_gen.set_state(state["data_gen"].cpu())
        noise_gen.set_state(state["noise_gen"].to(noise_gen.get_state().device))
        history, step, trained_s = state["history"], state["step"], state["trained_s"]
        print(f"resumed at step {step} ({trained_s / 60:.1f} min trained)", flush=True)

    def save():
        torch.save({"transformer": transformer.state_dict(), "text": text.state_dict(), "opt": opt.state_dict(),
                    "ema": ema, "data_gen": data_gen.get_state(), "noise_gen": noise_gen.get_state(),
                    "history": history, "step": step, "trained_s": trained_s}, ckpt_path)

    n_params = sum(p.numel() for p in params)
    print(f"{n_params / 1e6:.2f}M parameters, batch {args.batch}, device {device}", flush=True)
    transformer.train()
    text.train()
    started, running = time.time(), []
    while step < args.steps and (args.minutes is None or trained_s + time.time() - started < args.minutes * 60):
        clips, captions = random_batch(args.batch, data_gen, device=device)
        drop = torch.rand(args.batch, generator=data_gen) < args.caption_dropout
        captions = ["" if d else c for c, d in zip(captions, drop.tolist())]
        ids = TinyTextEncoder.tokenize(captions).to(device)
        t = torch.sigmoid(torch.randn(args.batch, generator=noise_gen, device=device))  # logit-normal
        noise = torch.randn(clips.shape, generator=noise_gen, device=device)
        tt = t[:, None, None, None, None]
        noisy = (1 - tt) * clips + tt * noise
        for group in opt.param_groups:
            group["lr"] = lr_at(step, args)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            velocity = transformer(hidden_states=noisy, timestep=t * 1000, encoder_hidden_states=text(ids),
                                   return_dict=False)[0]
        loss = F.mse_loss(velocity.float(), noise - clips)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        with torch.no_grad():
            torch._foreach_lerp_(ema, [p.detach() for p in params], 1 - args.ema)
        running.append(loss.item())
        step += 1
        if step % args.log_every == 0:
            history.append((step, sum(running) / len(running)))
            running = []
            print(f"step {step} loss {history[-1][1]:.4f} lr {lr_at(step, args):.2e} "
                  f"{(trained_s + time.time() - started) / 60:.1f} min", flush=True)
        if step % args.save_every == 0:
            trained_s += time.time() - started
            started = time.time()
            save()
    trained_s += time.time() - started
    save()
    export(args, transformer, text, params, ema, history, step, trained_s, n_params, device)
    return 0


def export(args, transformer, text, params, ema, history, step, trained_s, n_params, device) -> None:
    """EMA weights -> fp16 safetensors, a model card, the loss curve, and a pixel-level check."""
    from safetensors.torch import save_file

    for p, e in zip(params, ema):
        p.data.copy_(e)
    transformer.eval()
    text.eval()
    tensors = {f"transformer.{k}": v.half().contiguous() for k, v in transformer.state_dict().items()}
    tensors.update({f"text_encoder.{k}": v.half().contiguous() for k, v in text.state_dict().items()})
    save_file(tensors, os.path.join(args.out, WEIGHTS))
    accuracy = evaluate(DemoModel(transformer, text, {}), device, seeds=range(args.eval_seeds))
    card = {
        "architecture": f"diffusers WanTransformer3DModel {TRANSFORMER_CONFIG} + TinyTextEncoder",
        "parameters": n_params,
        "data": "procedural clips: 8 frames of 32x32 RGB, shapes "
        + ", ".join(SHAPES)
        + "; colours "
        + ", ".join(COLORS)
        + "; directions "
        + ", ".join(DIRECTIONS)
        + "; plain, striped or checked backgrounds",
        "objective": "rectified flow (velocity = noise - data), logit-normal timesteps, "
        f"caption dropout {args.caption_dropout}, EMA {args.ema}",
        "steps": step,
        "batch": args.batch,
        "lr": args.lr,
        "seed": args.seed,
        "training_minutes": round(trained_s / 60, 2),
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "torch": torch.__version__,
        "final_loss": history[-1][1] if history else None,
        "pixel_check": accuracy,
        "loss_history": history,
        "command": "python -m cachepass.demo.train " + " ".join(sys.argv[1:]),
    }
    with open(os.path.join(args.out, CARD), "w") as f:
        json.dump(card, f, indent=1)
    plot_loss(history, os.path.join(args.out, "loss.png"))
    print(json.dumps({k: v for k, v in card.items() if k != "loss_history"}, indent=1), flush=True)


@torch.no_grad()
def evaluate(model: DemoModel, device, seeds=range(4)) -> dict:
    """Colour and direction measured on generated pixels for every colour x direction, a few seeds."""
    right = total = 0
    for seed in seeds:
        captions = [caption(c, SHAPES[(i + seed) % len(SHAPES)], d)
                    for i, (c, d) in enumerate((c, d) for c in COLORS for d in DIRECTIONS)]
        clips = model.generate(captions, seed=seed, steps=20)
        for clip, text in zip(clips, captions):
            color, direction, _ = describe(clip)
            words = text.split()
            right += (color == words[1]) + (direction == words[4])
            total += 2
    return {"attributes_right": right, "attributes_checked": total, "accuracy": right / total}


def plot_loss(history, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.2))
    ax.plot([s for s, _ in history], [loss for _, loss in history])
    ax.set_xlabel("step")
    ax.set_ylabel("flow-matching MSE")
    ax.set_yscale("log")
    ax.set_title("demo model training loss")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    sys.exit(main())
