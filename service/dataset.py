"""An evaluation data set on disk: the torchvision ImageFolder layout plus optional ground truth.

    DATASET/<class>/<name>.png|.jpg|...      one sub-folder per class (images in folders below
                                             it count for the class, as in ImageFolder)
    DATASET/<class>/<name>.mask.png          optional: the object's pixels (non-zero = object)
    DATASET/boxes.json                       optional: {"<class>/<name>.jpg": [[x0, y0, x1, y1]]}

Boxes are in the image's own pixels, (x0, y0) inclusive, (x1, y1) exclusive, inside the image; a mask wins over boxes when
an image has both. A class folder is matched to the model's labels by name (case and `_` versus
space ignored), else a numeric folder name is the class id; anything else is an error that names
the folder. No torch: the server side and Ray workers read data sets too.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

import cv2
import numpy as np

from .images import ImageError, read_image
from .shared_interest import ground_truth_mask

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".webp", ".tif", ".tiff")
MASK_SUFFIX = ".mask.png"
BOXES_FILE = "boxes.json"


class DatasetError(ValueError):
    """The data set's layout or ground truth is wrong; the message names the path and the fix."""


@dataclass(frozen=True)
class DatasetItem:
    """One image: where it is, its class, and where its ground truth is (if any)."""

    path: str
    relative: str  # "<class>/<name>", the image's id in reports
    class_name: str
    label: int
    mask_path: str | None = None
    boxes: tuple[tuple[float, float, float, float], ...] | None = None

    def as_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "DatasetItem":
        boxes = d.get("boxes")
        return cls(d["path"], d["relative"], d["class_name"], int(d["label"]), d.get("mask_path"),
                   None if boxes is None else tuple(tuple(float(v) for v in b) for b in boxes))


def _norm(name: str) -> str:
    return name.strip().lower().replace("_", " ")


def class_ids(folders: list[str], labels: list[str]) -> dict[str, int]:
    """Folder name -> model class id: by label name, else a numeric folder name. A name that
    several labels share (ImageNet has two "crane"s, a bird and a machine) is refused: the
    folder must say which by its id."""
    by_name: dict[str, list[int]] = {}
    for i, label in enumerate(labels):
        by_name.setdefault(_norm(label), []).append(i)
    mapping = {}
    for folder in folders:
        if _norm(folder) in by_name:
            ids = by_name[_norm(folder)]
            if len(ids) > 1:
                raise DatasetError(f"class folder {folder!r}: the model has {len(ids)} labels of "
                                   f"that name (ids {', '.join(map(str, ids))}); name the "
                                   "folder by its class id")
            mapping[folder] = ids[0]
        elif folder.isdigit() and int(folder) < len(labels):
            mapping[folder] = int(folder)
        else:
            shown = ", ".join(labels[:5]) + (", ..." if len(labels) > 5 else "")
            raise DatasetError(
                f"class folder {folder!r}: neither one of the model's {len(labels)} labels "
                f"({shown}) nor a class id 0..{len(labels) - 1}; rename the folder")
    return mapping


def _read_boxes(root: Path) -> dict[str, tuple]:
    path = root / BOXES_FILE
    if not path.is_file():
        return {}
    try:
        raw = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise DatasetError(f"{path}: not readable JSON ({exc}); write "
                           '{"<class>/<image>": [[x0, y0, x1, y1], ...]}') from None
    if not isinstance(raw, dict):
        raise DatasetError(f"{path}: expected an object mapping image paths to box lists")
    boxes = {}
    for key, value in raw.items():
        try:
            boxes[key] = tuple(tuple(float(v) for v in box) for box in value)
            if any(len(b) != 4 for b in boxes[key]):
                raise ValueError
        except (TypeError, ValueError):
            raise DatasetError(f"{path}: {key!r}: expected a list of [x0, y0, x1, y1] boxes") \
                from None
    return boxes


def scan_dataset(root: str | Path, labels: list[str]) -> list[DatasetItem]:
    """All images under `root` in a stable order (class folder, then file name)."""
    root = Path(root)
    if not root.is_dir():
        raise DatasetError(f"DATASET {root}: not a directory; give a folder with one "
                           "sub-folder of images per class")
    folders = sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not folders:
        raise DatasetError(f"DATASET {root}: no class sub-folders; put the images of class C "
                           "in DATASET/C/")
    mapping = class_ids(folders, labels)
    boxes = _read_boxes(root)
    items = []
    for folder in folders:
        for path in _image_files(root / folder):
            mask = path.with_name(path.name[:-len(path.suffix)] + MASK_SUFFIX)
            relative = path.relative_to(root).as_posix()
            items.append(DatasetItem(str(path), relative, folder, mapping[folder],
                                     str(mask) if mask.is_file() else None,
                                     boxes.get(relative)))
    if not items:
        raise DatasetError(f"DATASET {root}: no images ({', '.join(IMAGE_SUFFIXES)}) in the "
                           "class folders")
    unknown = set(boxes) - {item.relative for item in items}
    if unknown:
        raise DatasetError(f"{root / BOXES_FILE}: boxes for images that do not exist: "
                           f"{sorted(unknown)[:3]}; keys are '<class>/<file name>'")
    return items


def _image_files(folder: Path) -> list[Path]:
    """The images in a class folder and the folders below it (ImageFolder walks them too, and
    skipping them would drop images without a word), in path order; hidden files and folders,
    such as `.ipynb_checkpoints`, and the masks are not images of the data set."""
    found = []
    for path in sorted(folder.rglob("*")):
        hidden = any(part.startswith(".") for part in path.relative_to(folder).parts)
        name = path.name.lower()
        if hidden or name.endswith(MASK_SUFFIX) or not name.endswith(IMAGE_SUFFIXES):
            continue
        if path.is_file():
            found.append(path)
    return found


def load_image(item: DatasetItem) -> np.ndarray:
    try:
        return read_image(item.path)
    except ImageError as exc:
        raise DatasetError(str(exc)) from None


def load_ground_truth(item: DatasetItem, height: int, width: int) -> np.ndarray | None:
    """The object's pixels as bool [height, width] (the image's own size), or None."""
    if item.mask_path is not None:
        try:
            mask = read_image(item.mask_path, cv2.IMREAD_GRAYSCALE)
        except ImageError:
            raise DatasetError(f"{item.mask_path}: not a decodable mask image (PNG expected)") \
                from None
        if mask.shape != (height, width):
            raise DatasetError(f"{item.mask_path}: mask is {mask.shape[1]}x{mask.shape[0]}, "
                               f"the image {width}x{height}; masks must match their image")
        return mask > 0
    if item.boxes is not None:
        try:
            return ground_truth_mask(height, width, boxes=item.boxes)
        except ValueError as exc:
            raise DatasetError(f"{BOXES_FILE}: {item.relative!r}: {exc}") from None
    return None
