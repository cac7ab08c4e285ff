"""Synthetic images whose truth is known (object masks), and a small CNN trained on them.

Importable as `torch:tests.synthetic:small_cnn` so the real export command can load it."""

from __future__ import annotations

import numpy as np

SIZE = 64
CLASSES = ("red", "green", "blue")
CLASSES4 = CLASSES + ("yellow",)  # four classes: enough for 2x2 grid pointing game mosaics
COLOURS = {"red": (230, 40, 40), "green": (40, 230, 40), "blue": (40, 40, 230),
           "yellow": (230, 230, 40)}
SHAPES = ("square", "disk", "cross")


def make_dataset(count: int, seed: int, classes: tuple[str, ...] = CLASSES
                 ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """u8 images [n, 64, 64, 3], labels [n], object masks [n, 64, 64] (bool).

    One object per image, of a random shape at a random place on a grey noisy background; its
    colour is the class."""
    rng = np.random.default_rng(seed)
    images = rng.integers(60, 140, size=(count, SIZE, SIZE, 3)).astype(np.uint8)
    labels = rng.integers(0, len(classes), size=count)
    masks = np.zeros((count, SIZE, SIZE), dtype=bool)
    yy, xx = np.mgrid[:SIZE, :SIZE]
    for i, label in enumerate(labels):
        r = 8
        cy, cx = rng.integers(r + 1, SIZE - r - 1, size=2)
        dy, dx = np.abs(yy - cy), np.abs(xx - cx)
        shape = SHAPES[rng.integers(len(SHAPES))]
        if shape == "square":
            mask = (dy <= r - 1) & (dx <= r - 1)
        elif shape == "disk":
            mask = dy ** 2 + dx ** 2 <= r ** 2
        else:
            mask = ((dy <= 2) & (dx <= r)) | ((dx <= 2) & (dy <= r))
        masks[i] = mask
        images[i][mask] = COLOURS[classes[label]]
    return images, labels, masks


def write_image_folder(root, images: np.ndarray, labels: np.ndarray, masks: np.ndarray | None,
                       classes: tuple[str, ...] = CLASSES) -> None:
    """The `xaiserve evaluate` layout: root/<class>/img_NNN.png (+ img_NNN.mask.png)."""
    import cv2
    from pathlib import Path

    for i, (image, label) in enumerate(zip(images, labels)):
        folder = Path(root) / classes[label]
        folder.mkdir(parents=True, exist_ok=True)
        cv2.imwrite(str(folder / f"img_{i:03d}.png"), cv2.cvtColor(image, cv2.COLOR_RGB2BGR))
        if masks is not None:
            cv2.imwrite(str(folder / f"img_{i:03d}.mask.png"), masks[i].astype(np.uint8) * 255)


def small_cnn(num_classes: int = len(CLASSES)):
    import torch.nn as nn

    return nn.Sequential(
        nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(32, 32, 3, padding=1), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(32, num_classes),
    )


def small_cnn4():
    """The same CNN for the four classes of CLASSES4."""
    return small_cnn(len(CLASSES4))


def small_vit():
    """A ViT small enough to train on the synthetic images in seconds (timm's VisionTransformer,
    so the export sees what a timm ViT gives it): 8 x 8 tokens of 8 px, a class token, and one
    block, so that the class token entering the block the method masks holds nothing of the
    image and the class must come from the tokens that block reads. With more blocks this task
    is solved before the last one, and the class token alone decides there (maps nearly flat in
    f32); classes: CLASSES plus "none" (no object), so that no colour wins by default."""
    from timm.models.vision_transformer import VisionTransformer

    return VisionTransformer(img_size=SIZE, patch_size=8, embed_dim=64, depth=1, num_heads=4,
                             mlp_ratio=2.0, num_classes=len(CLASSES) + 1)


# `xaiserve export` arguments for small_vit (a checkpoint of train_small_vit's to be added)
SMALL_VIT_EXPORT = ("torch:tests.synthetic:small_vit", "--input-size", str(SIZE),
                    "--mean", "0,0,0", "--scale", "255,255,255")


def mlp():
    """A classifier with no spatial feature map: saliency insertion cannot work on it."""
    import torch.nn as nn

    return nn.Sequential(nn.Flatten(), nn.Linear(3 * SIZE * SIZE, 32), nn.ReLU(),
                         nn.Linear(32, len(CLASSES)))


def train_small_cnn(steps: int = 150, seed: int = 0, classes: tuple[str, ...] = CLASSES):
    """Train on x / 255 (the export gets --mean 0 --scale 255) for a few seconds."""
    import torch

    torch.manual_seed(seed)
    images, labels, _ = make_dataset(1024, seed, classes)
    return fit(small_cnn(len(classes)), images, labels, steps, 3e-3, seed)


def train_small_vit(steps: int = 300, seed: int = 0):
    """small_vit trained on 1024 synthetic images and 256 without an object (class "none"),
    x / 255 as for the CNN; about 4 s."""
    import torch

    torch.manual_seed(seed)
    return fit(small_vit(), *with_empty_images(seed), steps, 1e-3, seed)


def with_empty_images(seed: int) -> tuple[np.ndarray, np.ndarray]:
    """1024 synthetic images and 256 without an object, labelled len(CLASSES) ("none")."""
    images, labels, _ = make_dataset(1024, seed)
    rng = np.random.default_rng(seed + 1)
    empty = rng.integers(60, 140, size=(256, SIZE, SIZE, 3)).astype(np.uint8)
    return (np.concatenate([images, empty]),
            np.concatenate([labels, np.full(len(empty), len(CLASSES))]))


def fit(model, images: np.ndarray, labels: np.ndarray, steps: int, lr: float, seed: int):
    """Adam on cross-entropy, batches of 32 drawn with a seeded generator; the model in eval."""
    import torch

    x = torch.from_numpy(images.transpose(0, 3, 1, 2).astype(np.float32) / 255.0)
    y = torch.from_numpy(labels)
    optimiser = torch.optim.Adam(model.parameters(), lr=lr)
    generator = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        idx = torch.randint(0, len(x), (32,), generator=generator)
        loss = torch.nn.functional.cross_entropy(model(x[idx]), y[idx])
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
    return model.eval()
