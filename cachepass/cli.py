"""``cachepass demo``: step caching under torch.compile on the bundled trained video model.

Generates a few captions uncached (eager) and with stepcache (compiled), prints time, speedup,
cached steps per CFG stream and PSNR / SSIM against the uncached clip, and writes a side-by-side
GIF (uncached | stepcache | amplified difference) and the table as JSON.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time

DEFAULT_CAPTIONS = ("a red circle moving right", "a cyan square moving up", "a yellow triangle moving left")
GIF_SCALE = 4
NOISY_SPREAD = 0.25  # repeats differing by more than this fraction make the table say its timings are noisy
DIFF_GAIN = 8


def _positive_int(minimum: int):
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer >= {minimum}, got {text!r}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"expected an integer >= {minimum}, got {value}")
        return value

    return parse


def _non_negative_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number >= 0, got {text!r}") from None
    if not value >= 0:
        raise argparse.ArgumentTypeError(f"expected a number >= 0, got {text}")
    return value


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="cachepass", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo", help="uncached vs stepcache on the bundled demo model", description=__doc__,
                          formatter_class=argparse.RawDescriptionHelpFormatter)
    demo.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N (default cpu)")
    demo.add_argument("--steps", type=_positive_int(2), default=40, help="denoising steps (default 40)")
    demo.add_argument("--threshold", type=_non_negative_float, default=0.08, help="residual diff threshold (default 0.08)")
    demo.add_argument("--taylorseer-order", type=_positive_int(0), default=1, help="TaylorSeer order, 0 = off (default 1)")
    demo.add_argument("--head", type=_positive_int(1), default=2, help="head blocks Fn (default 2 of 8)")
    demo.add_argument("--warmup", type=_positive_int(0), default=4, help="warmup steps (default 4)")
    demo.add_argument("--inner", choices=["inductor", "aot_eager", "eager"], default="inductor",
                      help="inner compiler (default inductor: ~30 s to compile on 2 CPU cores, then faster than "
                           "eager; aot_eager compiles in seconds but adds Python overhead per call)")
    demo.add_argument("--captions", nargs="+", default=list(DEFAULT_CAPTIONS), help="e.g. 'a red circle moving left'")
    demo.add_argument("--seed", type=int, default=0)
    demo.add_argument("--repeats", type=_positive_int(1), default=3,
                      help="timed runs per caption and variant, interleaved; the table shows the fastest, as timeit "
                           "does (default 3)")
    demo.add_argument("--out", default="cachepass-demo", help="output folder (default ./cachepass-demo)")
    return p


def main(argv=None) -> int:
    args = parser().parse_args(argv)
    try:
        return demo(args)
    except (ValueError, RuntimeError) as e:
        print(f"cachepass demo: error: {e}", file=sys.stderr)
        return 2


@dataclasses.dataclass
class Row:
    caption: str
    uncached_s: float
    stepcache_s: float
    speedup: float
    cached_steps: int
    cfg_cached_steps: int
    psnr: float
    ssim: float
    spread: float  # (slowest - fastest) / fastest over the row's repeats, the larger of the two variants


def demo(args) -> int:
    import torch

    import cachepass
    from cachepass.demo.model import load_default
    from cachepass.demo.quality import compare

    device = _parse_device(args.device)
    _check_captions(args.captions)
    _prepare_out(args.out)
    inner = args.inner
    cfg = cachepass.StepCacheConfig(num_head_blocks=args.head, threshold=args.threshold, warmup_steps=args.warmup,
                                    taylorseer_order=args.taylorseer_order, separate_cfg=True,
                                    num_inference_steps=args.steps)
    model = load_default(device)
    model.encode(args.captions)  # rejects unknown words before any work
    blocks = len(model.transformer.blocks)
    if args.head >= blocks:
        raise ValueError(f"--head {args.head}: the demo model has {blocks} blocks and caching needs middle blocks "
                         f"after the head; allowed 1-{blocks - 1}")
    compiled = cachepass.compile(model.transformer, cfg, inner=inner)
    print(f"demo model: {model.card['parameters'] / 1e6:.2f}M parameters, trained {model.card['steps']} steps; "
          f"device {device}, stepcache inner={inner}, {cfg.num_head_blocks} head blocks, "
          f"threshold {cfg.threshold}, TaylorSeer order {cfg.taylorseer_order}")

    with _progress(2 * args.steps, "compile (first stepcache generation)") as bar:
        compile_s = _timed(lambda: model.generate(args.captions[:1], seed=args.seed, steps=args.steps,
                                                  transformer=compiled, progress=bar), device)[1]
    rows, uncached_clips, cached_clips = [], [], []
    for text in args.captions:
        plain_times, fast_times = [], []
        for _ in range(args.repeats):  # interleaved, so a busy machine slows both alike
            with _progress(2 * args.steps, f"uncached   {text}") as bar:
                plain, seconds = _timed(lambda: model.generate([text], seed=args.seed, steps=args.steps, progress=bar),
                                        device)
                plain_times.append(seconds)
            with _progress(2 * args.steps, f"stepcache  {text}") as bar:
                fast, seconds = _timed(lambda: model.generate([text], seed=args.seed, steps=args.steps,
                                                              transformer=compiled, progress=bar), device)
                fast_times.append(seconds)
        plain_s, fast_s = min(plain_times), min(fast_times)
        (unit,) = cachepass.stats(model.transformer)
        q = compare(_frames(fast[0]), _frames(plain[0]))
        rows.append(Row(text, plain_s, fast_s, plain_s / fast_s, len(unit.cached_steps), len(unit.cfg_cached_steps),
                        q.psnr, q.ssim, max(_spread(plain_times), _spread(fast_times))))
        uncached_clips.append(plain[0])
        cached_clips.append(fast[0])

    gif = os.path.join(args.out, "demo.gif")
    write_gif(uncached_clips, cached_clips, gif)
    summary = {
        "device": str(device), "inner": inner, "repeats": args.repeats, "config": dataclasses.asdict(cfg) | {
            "steps_computation_policy": cfg.steps_computation_policy.value},
        "compile_s": compile_s, "steps": args.steps, "torch": torch.__version__,
        "timing": "fastest of the interleaved repeats per caption and variant (as timeit), summed over captions; "
                  "spread: (slowest - fastest) / fastest of a row's repeats",
        "uncached_s": sum(r.uncached_s for r in rows), "stepcache_s": sum(r.stepcache_s for r in rows),
        "rows": [_json_safe(dataclasses.asdict(r)) for r in rows],
    }
    summary["speedup"] = summary["uncached_s"] / summary["stepcache_s"]
    table = os.path.join(args.out, "table.json")
    with open(table, "w") as f:
        json.dump(summary, f, indent=1)
    print(format_table(rows, summary))
    print(f"wrote {gif} (uncached | stepcache | |difference| x{DIFF_GAIN}) and {table}")
    return 0


def _parse_device(text: str):
    import torch

    try:
        device = torch.device(text)
    except RuntimeError:
        device = None
    if device is None or device.type not in ("cpu", "cuda"):
        raise ValueError(f"--device {text!r}: allowed cpu, cuda or cuda:N")
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"--device {text}: no CUDA device is available")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ValueError(f"--device {text}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    return device


def _prepare_out(path: str) -> None:
    """Create the output folder and check it is writable before any generation work."""
    if os.path.exists(path) and not os.path.isdir(path):
        raise ValueError(f"--out {path!r} is an existing file; give a folder to write demo.gif and table.json into")
    try:
        os.makedirs(path, exist_ok=True)
    except OSError as e:
        raise ValueError(f"--out {path!r}: cannot create the folder ({e.strerror})") from None
    if not os.access(path, os.W_OK | os.X_OK):
        raise ValueError(f"--out {path!r}: the folder is not writable")


def format_table(rows: list[Row], summary: dict) -> str:
    lines = [
        f"{'caption':<32} {'uncached s':>10} {'stepcache s':>11} {'speedup':>7} {'cached c/u':>10} {'PSNR dB':>8} {'SSIM':>6}",
    ]
    for r in rows:
        lines.append(f"{r.caption:<32} {r.uncached_s:>10.2f} {r.stepcache_s:>11.2f} {r.speedup:>6.2f}x "
                     f"{f'{r.cached_steps}/{r.cfg_cached_steps}':>10} {r.psnr:>8.1f} {r.ssim:>6.3f}")
    lines.append(f"{'total':<32} {summary['uncached_s']:>10.2f} {summary['stepcache_s']:>11.2f} "
                 f"{summary['speedup']:>6.2f}x   (compile + first generation: {summary['compile_s']:.1f} s)")
    noisy = max((r.spread for r in rows), default=0.0)
    if noisy > NOISY_SPREAD:
        lines.append(f"timings are noisy: repeats of one row differ by up to {noisy:.0%} (a busy machine); the "
                     "speedups are rough estimates, run with more --repeats on an idle machine")
    return "\n".join(lines)


def _spread(times: list[float]) -> float:
    return (max(times) - min(times)) / min(times)


def _check_captions(captions: list[str]) -> None:
    empty = [i for i, text in enumerate(captions) if not text.strip()]
    if empty:
        raise ValueError(f"--captions: caption {empty[0] + 1} is empty; give a caption such as "
                         f"{DEFAULT_CAPTIONS[0]!r}")


def _json_safe(row: dict) -> dict:
    """PSNR of identical clips is infinite; JSON has no infinity, so it becomes null."""
    return {k: None if isinstance(v, float) and v == float("inf") else v for k, v in row.items()}


def _timed(fn, device):
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    out = fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return out, time.perf_counter() - start


def _frames(clip):
    """[3, F, H, W] in [-1, 1] -> [F, 3, H, W] in [0, 1]."""
    return ((clip.float().cpu().permute(1, 0, 2, 3) + 1) / 2).clamp(0, 1)


GIF_COLUMNS = ("uncached", "stepcache", f"|difference| x{DIFF_GAIN}")
GIF_HEADER = 16  # pixels above the panels for the column labels


def write_gif(uncached, cached, path: str) -> None:
    """One row per caption: uncached | stepcache | amplified absolute difference, every frame, columns labelled."""
    import torch
    from PIL import Image

    frames = []
    for t in range(uncached[0].shape[1]):
        rows = []
        for plain, fast in zip(uncached, cached):
            a, b = _frames(plain)[t], _frames(fast)[t]
            diff = ((a - b).abs() * DIFF_GAIN).clamp(0, 1)
            gap = torch.ones(3, a.shape[1], 2)
            rows.append(torch.cat([a, gap, b, gap, diff], dim=2))
        image = torch.cat([torch.cat([r, torch.ones(3, 2, r.shape[2])], dim=1) for r in rows], dim=1)
        array = (image.permute(1, 2, 0).numpy() * 255).astype("uint8")
        picture = Image.fromarray(array)
        picture = picture.resize((picture.width * GIF_SCALE, picture.height * GIF_SCALE), Image.NEAREST)
        frames.append(_with_column_labels(picture, panel_width=uncached[0].shape[-1] * GIF_SCALE, gap=2 * GIF_SCALE))
    frames[0].save(path, save_all=True, append_images=frames[1:], duration=180, loop=0)


def _with_column_labels(picture, panel_width: int, gap: int):
    from PIL import Image, ImageDraw

    canvas = Image.new("RGB", (picture.width, picture.height + GIF_HEADER), "white")
    canvas.paste(picture, (0, GIF_HEADER))
    draw = ImageDraw.Draw(canvas)
    for i, label in enumerate(GIF_COLUMNS):
        width = draw.textlength(label)
        draw.text((i * (panel_width + gap) + (panel_width - width) / 2, 2), label, fill="black")
    return canvas


def _progress(total: int, label: str):
    try:
        from tqdm import tqdm
    except ImportError:
        import contextlib

        return contextlib.nullcontext(None)
    return tqdm(total=total, desc=label, unit="call", leave=False)


if __name__ == "__main__":
    sys.exit(main())
