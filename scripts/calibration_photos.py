"""Write a folder of real photos and their crops/flips for INT8 calibration and validation.

The base photos ship with scikit-image, scikit-learn and matplotlib (nothing is downloaded).
A few hundred images come from random crops (50 to 100% of the side, any place, some
stretched) and mirror images of them; the full photos come first. Different seeds give
different crops of the same photos, so a calibration folder (seed 0) and a validation folder
(seed 1) never share an image, but they do share scenes: a weaker check than a held-out set.

    python scripts/calibration_photos.py out/calibration --count 300 --seed 0
    python scripts/calibration_photos.py out/validation --count 300 --seed 1
"""

from __future__ import annotations

import argparse
from pathlib import Path

import cv2
import numpy as np


def base_photos() -> dict[str, np.ndarray]:
    """Real photos available offline, RGB u8 [H, W, 3] (gray ones made RGB)."""
    import skimage.data as data
    from matplotlib import cbook
    from sklearn.datasets import load_sample_images

    photos = {name: getattr(data, name)() for name in
              ("astronaut", "cat", "chelsea", "coffee", "rocket", "camera", "clock", "coins")}
    samples = load_sample_images()
    for name, image in zip(("china", "flower"), samples.images):
        photos[name] = image
    with cbook.get_sample_data("grace_hopper.jpg") as fh:
        encoded = np.frombuffer(fh.read(), np.uint8)
    photos["grace_hopper"] = cv2.cvtColor(cv2.imdecode(encoded, cv2.IMREAD_COLOR),
                                          cv2.COLOR_BGR2RGB)
    return as_rgb(photos)


def held_out_photos() -> dict[str, np.ndarray]:
    """Other real photos shipped with scikit-image, none of them in `base_photos`: scenes a model
    tuned on crops of the base photos has never seen (benchmarks/int8_qat.py)."""
    import skimage.data as data

    left, right, _ = data.stereo_motorcycle()
    photos = {"motorcycle_left": left, "motorcycle_right": right}
    for name in ("brick", "grass", "gravel", "moon", "hubble_deep_field", "retina",
                 "immunohistochemistry"):
        photos[name] = getattr(data, name)()
    return as_rgb(photos)


def as_rgb(photos: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Gray photos made RGB, alpha dropped."""
    return {k: np.stack([v] * 3, -1) if v.ndim == 2 else v[..., :3] for k, v in photos.items()}


def crops(photos: dict[str, np.ndarray], count: int, seed: int) -> dict[str, np.ndarray]:
    """`count` images by name: the full photos first, then random crops, half of them mirrored."""
    rng = np.random.default_rng(seed)
    names = sorted(photos)
    out: dict[str, np.ndarray] = {n: photos[n] for n in names[:count]}
    i = 0
    while len(out) < count:
        name = names[i % len(names)]
        image = photos[name]
        h, w = image.shape[:2]
        side = rng.uniform(0.5, 1.0)
        ch = max(16, int(h * side * rng.uniform(0.8, 1.0)))
        cw = max(16, int(w * side * rng.uniform(0.8, 1.0)))
        top = int(rng.integers(0, h - ch + 1))
        left = int(rng.integers(0, w - cw + 1))
        crop = image[top:top + ch, left:left + cw]
        if rng.random() < 0.5:
            crop = crop[:, ::-1]
        out[f"{name}_{i:04d}"] = np.ascontiguousarray(crop)
        i += 1
    return out


def write_folder(folder: Path, count: int = 300, seed: int = 0,
                 photos: dict[str, np.ndarray] | None = None) -> list[Path]:
    """`count` JPEGs of `photos` (default: `base_photos()`) and their crops."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for name, rgb in crops(base_photos() if photos is None else photos, count, seed).items():
        path = folder / f"{name}.jpg"
        cv2.imwrite(str(path), cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR),
                    [cv2.IMWRITE_JPEG_QUALITY, 92])
        paths.append(path)
    return paths


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path)
    parser.add_argument("--count", type=int, default=300)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    paths = write_folder(args.out, args.count, args.seed)
    print(f"{len(paths)} images in {args.out}")


if __name__ == "__main__":
    main()
