"""Write the sample photos that ship with scikit-image, scikit-learn and matplotlib as JPEGs."""

from __future__ import annotations

import sys
from pathlib import Path

import cv2
import numpy as np


def sample_photos() -> dict[str, np.ndarray]:
    """Real RGB photos available offline, by name."""
    import skimage.data as data

    return {
        "chelsea": data.chelsea(),
        "coffee": data.coffee(),
        "astronaut": data.astronaut(),
        "rocket": data.rocket(),
    }


def main(out: str) -> None:
    folder = Path(out)
    folder.mkdir(parents=True, exist_ok=True)
    for name, rgb in sample_photos().items():
        cv2.imwrite(str(folder / f"{name}.jpg"), cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR),
                    [cv2.IMWRITE_JPEG_QUALITY, 95])


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "out/photos")
