"""Scorer throughput: one image per forward (the relabelling loop of the Diffusion-DPO paper's code) vs
batched scoring (``diffdpo.rewards``, ``batch_size=32``), side by side, same images, same scores.

    python -m benchmarks.bench_scorers [--n 64] [--arch tiny|real|ViT-B-32|ViT-H-14] [--device cpu|cuda]
    python -m benchmarks.bench_scorers --arch real --device cuda --dtype float16 --n 256 --json scorers.json  # GPU


Every scorer of ``diffdpo.rewards`` is built from weights saved to a temporary folder and loaded through
the same ``build_scorer`` path a user takes (random weights: no downloads). ``--arch tiny`` (default)
registers a small open_clip architecture so the run takes seconds on a CPU; a real architecture name
measures the real network (``ViT-H-14`` is PickScore's and HPSv2's, worth it on a GPU). PickScore uses a
transformers ``CLIPModel`` of the matching size. ``--arch real`` gives each scorer its released architecture
(:data:`REAL_ARCHS`: CLIP score and the aesthetic head on ViT-L-14, HPSv2 on ViT-H-14, PickScore a CLIP-H
``CLIPModel``), random weights; the prepared GPU measurement. Reported per scorer: images/s at batch 1 and batch 32,
the ratio, and the largest score difference between the two (batching must not change scores).
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

TINY = {"embed_dim": 64, "vision_cfg": {"image_size": 64, "layers": 2, "width": 128, "head_width": 32, "patch_size": 16},
        "text_cfg": {"context_length": 32, "vocab_size": 49408, "width": 128, "heads": 4, "layers": 2}}


#: The released architecture of each scorer (``--arch real``): docs/rewards.md cites each.
REAL_ARCHS = {"clip": "ViT-L-14", "hpsv2": "ViT-H-14", "aesthetic": "ViT-L-14", "pickscore": "ViT-H-14"}


def _open_clip_weights(root: Path, arch: str) -> tuple[str, Path]:
    import open_clip
    from safetensors.torch import save_file

    if arch == "tiny":
        arch = "bench-tiny"
        (root / f"{arch}.json").write_text(json.dumps(TINY))
        open_clip.add_model_config(root)
    path = root / f"clip-{arch}.safetensors"
    if path.is_file():
        return arch, path
    torch.manual_seed(0)
    model = open_clip.create_model(arch)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    return arch, path


def _aesthetic_head(root: Path, clip_arch: str) -> Path:
    import open_clip
    from safetensors.torch import save_file

    from diffdpo.rewards import AestheticMLP

    dim = open_clip.get_model_config(clip_arch)["embed_dim"]
    torch.manual_seed(1)
    path = root / "head.safetensors"
    save_file({k: v.contiguous() for k, v in AestheticMLP(dim).state_dict().items()}, str(path))
    return path


def _pickscore_folder(root: Path, arch: str) -> Path:
    """A transformers CLIPModel + processor of the size of ``arch`` (tiny, or ViT-B/H-like), saved."""
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor, CLIPTokenizer

    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for ch in [chr(c) for c in range(33, 127)]:
        vocab.setdefault(ch, len(vocab))
        vocab.setdefault(ch + "</w>", len(vocab))
    tokenizer = CLIPTokenizer(vocab=vocab, merges=[])
    size = {"tiny": 64}.get(arch, 224)
    hidden = {"tiny": 128, "ViT-B-32": 768, "ViT-H-14": 1280}.get(arch, 768)
    layers = {"tiny": 2, "ViT-B-32": 12, "ViT-H-14": 32}.get(arch, 12)
    patch = {"tiny": 16, "ViT-B-32": 32, "ViT-H-14": 14}.get(arch, 32)
    processor = CLIPProcessor(image_processor=CLIPImageProcessor(size={"shortest_edge": size},
                                                                 crop_size={"height": size, "width": size}),
                              tokenizer=tokenizer)
    folder = root / f"pickscore-{arch}"
    processor.save_pretrained(folder)
    ids = {"bos_token_id": 0, "eos_token_id": 1, "pad_token_id": 1}
    config = CLIPConfig(
        text_config={"vocab_size": len(vocab), "hidden_size": min(hidden, 1024), "intermediate_size": 4 * min(hidden, 1024),
                     "num_hidden_layers": min(layers, 24), "num_attention_heads": 4 if arch == "tiny" else 16,
                     "max_position_embeddings": 77, **ids},
        vision_config={"image_size": size, "patch_size": patch, "hidden_size": hidden, "intermediate_size": 4 * hidden,
                       "num_hidden_layers": layers, "num_attention_heads": 4 if arch == "tiny" else 16},
        projection_dim=64 if arch == "tiny" else 1024)
    torch.manual_seed(2)
    CLIPModel(config).save_pretrained(folder)
    return folder


def _time(scorer, images, prompts, repeats: int) -> tuple[float, torch.Tensor]:
    scores = scorer(images[:2], prompts[:2])  # warm-up
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        scores = scorer(images, prompts)
        best = min(best, time.perf_counter() - t0)
    return len(images) / best, scores


def main(argv: list[str] | None = None) -> int:
    from PIL import Image

    from diffdpo.rewards import build_scorer

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--n", type=int, default=64, help="images scored per measurement")
    parser.add_argument("--arch", default="tiny",
                        help="tiny (registered here), real (each scorer's released architecture), or an open_clip name")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32", help="float32 | float16 | bfloat16")
    parser.add_argument("--scorers", default="clip,hpsv2,aesthetic,pickscore", help="comma-separated subset")
    parser.add_argument("--json", default=None, help="also write the table as JSON to this file")
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    parser.add_argument("--repeats", type=int, default=2, help="timed repeats; the fastest counts")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    rng = np.random.default_rng(0)
    images = [Image.fromarray(rng.integers(0, 255, (256, 256, 3), dtype=np.uint8)) for _ in range(args.n)]
    prompts = [f"a photo of object {i}" for i in range(args.n)]
    names = [n for n in args.scorers.split(",") if n]
    unknown = sorted(set(names) - set(REAL_ARCHS))
    if unknown:
        parser.error(f"--scorers: unknown {', '.join(unknown)}; use a subset of {', '.join(REAL_ARCHS)}")
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        kw = {"device": args.device, "dtype": args.dtype}

        def build(name: str, bs: int):
            arch, clip_path = _open_clip_weights(root, REAL_ARCHS[name] if args.arch == "real" else args.arch)
            if name == "pickscore":
                return arch, build_scorer("pickscore", _pickscore_folder(root, args.arch if args.arch != "real"
                                                                         else REAL_ARCHS[name]), batch_size=bs, **kw)
            if name == "aesthetic":
                head = _aesthetic_head(root, arch)
                return arch, build_scorer("aesthetic", head, clip_path=clip_path, arch=arch, batch_size=bs, **kw)
            return arch, build_scorer(name, clip_path, arch=arch, batch_size=bs, **kw)  # type: ignore[arg-type]

        print(f"{args.n} images 256x256, --arch {args.arch}, device {args.device}, {args.dtype}, "
              f"{args.threads} threads, best of {args.repeats}")
        print(f"{'scorer':<10} {'arch':<11} {'batch 1 img/s':>14} {'batch 32 img/s':>15} {'ratio':>7} {'max |diff|':>11}")
        for name in names:
            arch, scorer = build(name, 1)
            one, s1 = _time(scorer, images, prompts, args.repeats)
            del scorer
            many, s32 = _time(build(name, 32)[1], images, prompts, args.repeats)
            diff = float((s1.float() - s32.float()).abs().max())
            rows.append({"scorer": name, "arch": arch, "batch1_images_per_s": one, "batch32_images_per_s": many,
                         "ratio": many / one, "max_abs_diff": diff})
            print(f"{name:<10} {arch:<11} {one:>14.1f} {many:>15.1f} {many / one:>6.2f}x {diff:>11.2e}")
    if args.json:
        Path(args.json).write_text(json.dumps({"settings": vars(args), "rows": rows}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
