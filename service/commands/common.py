"""What every command shares: exit codes, one-line errors, option types and the checks of
where results go, made before any work."""

from __future__ import annotations

import argparse
import errno
import os
import sys
from pathlib import Path

EXIT_USAGE = 2
EXIT_INTERRUPTED = 130  # as a shell reports a command ended by SIGINT


def fail(verb: str, message: str) -> int:
    print(f"xaiserve {verb}: error: {message}", file=sys.stderr)
    return EXIT_USAGE


_WHAT_TO_DO = {errno.ENOSPC: "free some space or write elsewhere",
               errno.EDQUOT: "free some space or write elsewhere",
               errno.EROFS: "write elsewhere",
               errno.EACCES: "give a path this user may use"}


def os_error_line(exc: OSError) -> str:
    """'<file>: <reason>; <what to do>' for a file a command could not read or write."""
    where = f"{exc.filename}: " if exc.filename else ""
    advice = _WHAT_TO_DO.get(exc.errno)
    return f"{where}{exc.strerror or exc}" + (f"; {advice}" if advice else "")


class DependentOptions:
    """Options that act only with another one (--int8, --reference), recorded as they are
    added: given without it they would be ignored, and a pipeline would believe its export
    gated; `refuse_without` names them instead."""

    def __init__(self, group, needs: str):
        self.group, self.needs = group, needs
        self.actions: list[argparse.Action] = []

    def add(self, *flags, **kwargs) -> None:
        self.actions.append(self.group.add_argument(*flags, **kwargs))

    def refuse_without(self, args, fix: str) -> None:
        """ValueError naming the options given (not at their defaults)."""
        given = [action.option_strings[0] for action in self.actions
                 if getattr(args, action.dest) != action.default]
        if given:
            raise ValueError(f"{', '.join(given)}: {'go' if len(given) > 1 else 'goes'} with "
                             f"{self.needs}; without it {fix}")


def true_or_false(text: str) -> bool:
    """An argparse type: true or false, in any case (as Triton's boolean flags)."""
    if text.lower() not in ("true", "false"):
        raise argparse.ArgumentTypeError(f"{text!r}: give true or false")
    return text.lower() == "true"


def bounded_int(low: int, high: int):
    """An argparse type: an integer in [low, high] (argparse names the option when not)."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
        if not low <= value <= high:
            raise argparse.ArgumentTypeError(f"{value}: expected {low}..{high}")
        return value
    return parse


def floats(text: str) -> list[float]:
    return [float(v) for v in text.replace(",", " ").split()]


def prepared_out(path: Path) -> Path:
    """--out made before the work starts: a file in its place fails now, not after a run
    whose results would then be lost."""
    if path.exists() and not path.is_dir():
        raise ValueError(f"--out {path}: is a file; give a folder")
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ValueError(f"--out {path}: cannot create it ({exc.strerror})") from None
    if not os.access(path, os.W_OK):
        raise ValueError(f"--out {path}: not writable; give a folder this user can write")
    return path


def check_outputs(images: list[Path], out: Path) -> None:
    """Results are written as <out>/<stem>.json and <stem>_overlay.png: two inputs with one
    stem would overwrite each other's, and an input that is one of those files itself."""
    seen: dict[str, Path] = {}
    written: set[Path] = set()
    for path in images:
        if path.stem in seen:
            raise ValueError(f"{seen[path.stem]} and {path} would write the same results "
                             f"({path.stem}.json); rename one or explain them in two runs")
        seen[path.stem] = path
        written |= {(out / f"{path.stem}{suffix}").resolve()
                    for suffix in (".json", "_overlay.png")}
    for path in images:
        if path.resolve() in written:
            raise ValueError(f"{path}: the results would be written over it; give another --out")


def add_client_options(p) -> None:
    """How a client reaches a server (TLS, its token) and how often it tries."""
    p.add_argument("--retries", type=bounded_int(0, 4), default=4,
                   help="with --server: times an UNAVAILABLE call (a server restarting, a version "
                        "compiling) is tried again, with backoff (0.5 s doubling; default 4)")
    add_access_options(p)


def add_access_options(p) -> None:
    """How a client is let in: TLS files and its token (security.ServerAccess)."""
    p.add_argument("--tls-ca", type=Path, default=None,
                   help="PEM CA that signed the server's certificate: connect over TLS")
    p.add_argument("--tls-cert", type=Path, default=None, help="client certificate (mutual TLS)")
    p.add_argument("--tls-key", type=Path, default=None, help="private key of --tls-cert")
    p.add_argument("--token-file", type=Path, default=None,
                   help="file with the server's bearer token (or set $XAISERVE_TOKEN)")


def server_access(args):
    """The ServerAccess the options give (the token from --token-file or $XAISERVE_TOKEN);
    ConfigError naming the flag of a file that cannot be read."""
    from ..security import ServerAccess

    return ServerAccess.read(args.tls_ca, args.tls_cert, args.tls_key, args.token_file)
