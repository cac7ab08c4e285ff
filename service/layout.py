"""The OpenVINO Model Server layout, `<repository>/<name>/<version>/model.xml`: which folders
are versions. Plain paths, no OpenVINO, so that the command line reads it without loading the
runtime."""

from __future__ import annotations

from pathlib import Path


def version_number(text: str) -> int | None:
    """A version directory's or a request's version as a number: up to 18 ASCII digits (an
    int64, as OVMS), so that "+1", " 1" or other scripts' digits (which int() reads) are not
    taken for version 1."""
    return int(text) if len(text) <= 18 and text.isascii() and text.isdigit() else None


def version_dirs(model_dir: Path) -> dict[int, Path]:
    """{version: directory} for one model's numeric sub-directories (the OVMS layout). Version
    0 is not one (a request's 0 or empty version means the newest); where "1" and "01" both
    exist, "1" is version 1 on every scan (directory order would pick either)."""
    if not model_dir.is_dir():
        return {}
    found: dict[int, Path] = {}
    for path in sorted(model_dir.iterdir(), key=lambda p: (len(p.name), p.name), reverse=True):
        number = version_number(path.name)
        if number and path.is_dir():
            found[number] = path  # the shortest name, the canonical one, comes last
    return found


def resolve_version_dir(path: Path, version: str = "") -> Path:
    """models/<name> -> its highest numeric version directory, or `version` (the --version a
    command was given) where one is; a version dir stays as is, and refuses another version."""
    if (path / "model.xml").is_file() or path.suffix == ".xml":
        if version:
            raise FileNotFoundError(f"--version {version}: --model-path {path} is one version "
                                    "already; give the model's folder, models/<name>")
        return path
    numbered = version_dirs(path)
    if not numbered:
        raise FileNotFoundError(f"--model-path {path}: no model.xml and no version directories")
    if not version:
        return numbered[max(numbered)]
    number = version_number(version)
    if number not in numbered:
        raise FileNotFoundError(f"--version {version}: {path} has versions "
                                f"{', '.join(map(str, sorted(numbered)))}")
    return numbered[number]


# Model files OpenVINO Model Server serves from a version folder that xaiserve does not: it
# compiles the IR `xaiserve export` writes (model.xml, preprocessing and saliency map inside).
FOREIGN_MODEL_FILES = ("*.onnx", "*.tflite", "saved_model.pb", "*.xml")
# a Hugging Face model's folder (save_pretrained): its config.json and one of these
PRETRAINED_CONFIG_FILE = "config.json"
PRETRAINED_WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")
# files whose folder is the export's source (a SavedModel, a Hugging Face model's folder)
FOLDER_SOURCE_FILES = ("saved_model.pb", *PRETRAINED_WEIGHT_FILES)
# an image processor's settings (Hugging Face, Optimum): the export reads mean and scale there
PROCESSOR_FILE = "preprocessor_config.json"


def foreign_model_files(version_dir: Path) -> list[str]:
    """The model files in a version folder that has no model.xml (an OVMS repository's
    model.onnx, or a Hugging Face model's folder), which a server would otherwise pass over
    without a word."""
    patterns = FOREIGN_MODEL_FILES + (PRETRAINED_WEIGHT_FILES
                                      if (version_dir / PRETRAINED_CONFIG_FILE).is_file()
                                      else ())
    return sorted({path.name for pattern in patterns
                   for path in version_dir.glob(pattern) if path.is_file()})


def export_hint(version_dir: Path, files: list[str]) -> str:
    """What to say of a version folder that holds `files` and no model.xml."""
    repository, name = version_dir.parent.parent, version_dir.parent.name
    in_folder = any(file in FOLDER_SOURCE_FILES for file in files)
    source = version_dir if in_folder else version_dir / files[0]
    options = ("(its preprocessor_config.json gives the size, mean and scale)"
               if (version_dir / PROCESSOR_FILE).is_file()
               else "with the --mean and --scale the model takes")
    return (f"{version_dir} holds {', '.join(files)} and no model.xml, so it is not served: "
            "xaiserve serves the IR `xaiserve export` writes (preprocessing and saliency map "
            f"inside); run `xaiserve export {source} --repository {repository} "
            f"--name {name}` {options}")
