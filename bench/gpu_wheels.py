"""The wheelhouse the GPU check carries to a CUDA machine that has no package index.

    bench/gpu_wheels.sh [DIR]               # default .gpu-wheels/ (git-ignored)
    python bench/gpu_wheels.py --dest DIR [--limit-mib 60] [--bnb-cuda 130] [--image bench/gpu/image-packages.txt]

The device machine (see BENCHMARKS.md, "The GPU check") runs an image whose Python 3.12 already
holds torch (CUDA 13), accelerate, numpy, pandas, pyarrow, tokenizers, safetensors and ~200 more
(``bench/gpu/image-packages.txt``). It can reach no index, and all that travels there (the repo's
files plus the carried wheels) must fit in 64 MiB. So this downloads, for CPython 3.12 on
manylinux x86-64, only what ``bench/gpu_check.py``'s steps import that the image lacks, and the
packages those need in turn that the image lacks (or holds at a version they refuse):

- the roots in :data:`CARRY` always, at ``pyproject.toml``'s pins: trl, bitsandbytes, lm-eval,
  datasets, and transformers and peft although the image has them (transformers 5.17 there, the
  project's code and every CPU number in BENCHMARKS.md are on the pinned 5.23.0; peft's version
  there is unknown and the adapters go through it);
- the other packages the steps import (:data:`IMPORTED`: torch, accelerate, numpy, pydantic, ...)
  are the image's where it has them, pyproject's pins or not (numpy 2.5.2 there, 2.4.6 pinned),
  unless a carried package's requirement refuses the image's known version, or puts an upper
  bound on a package whose version there is unknown (fsspec for datasets);
- torch, triton and the CUDA libraries are never carried (:data:`NEVER`).

A version not pinned by pyproject is the one installed in the Python running this (the project's
tested environment), if it satisfies the requirement, else pip's newest that does. Requirements are
read from each wheel's own METADATA, with the device's markers (Python 3.12.3, Linux, x86_64). A
package with no wheel (sqlitedict, word2number, rouge-score) is built here from its sdist, and only
kept if the build is pure Python.

bitsandbytes' wheel (43 MB) ships its native library for every CUDA and ROCm version; the device's
torch is CUDA 13.0, so the carried copy keeps ``libbitsandbytes_cpu.so`` and
``libbitsandbytes_cuda130.so`` only (``--bnb-cuda 130``; ``--bnb-cuda all`` keeps every one), its
RECORD rewritten to match.

Writes ``DIR/requirements.txt`` (every carried package, pinned: what ``bench/gpu_check.sh`` installs
with ``--no-index --find-links DIR``) and ``DIR/MANIFEST.json``, prints each wheel's size and the
total, and exits 1 when the wheels plus the files that travel with the working tree (tracked and
untracked-not-ignored) exceed ``--limit-mib`` (60: the device takes 64).
"""

from __future__ import annotations

import argparse
import base64
import email.parser
import hashlib
import json
import re
import shutil
import subprocess
import sys
import tempfile
import zipfile
from collections import deque
from pathlib import Path
from typing import Callable

try:
    from packaging.requirements import Requirement
    from packaging.specifiers import SpecifierSet
    from packaging.utils import canonicalize_name, parse_wheel_filename
except ImportError:  # pip's vendored copy
    from pip._vendor.packaging.requirements import Requirement
    from pip._vendor.packaging.specifiers import SpecifierSet
    from pip._vendor.packaging.utils import canonicalize_name, parse_wheel_filename

ROOT = Path(__file__).resolve().parents[1]
IMAGE_FILE = ROOT / "bench" / "gpu" / "image-packages.txt"

# What gpu_check's steps import (bench_train.py, bench_eval.py, tasks.make_data, tempering.train.*,
# tempering.scorecard/scoring, tempering.config; traced with an import hook: neither prefect,
# great-expectations, dvc, dvclive, wandb, gguf nor datasketch is imported).
CARRY = ("trl", "bitsandbytes", "lm-eval", "datasets", "transformers", "peft")
IMPORTED = ("torch", "accelerate", "numpy", "pandas", "pyyaml", "jinja2", "safetensors", "tokenizers",
              "huggingface-hub", "pydantic")
NEVER = ("torch", "triton", "torchvision", "torchaudio")
NEVER_PREFIXES = ("nvidia-", "cuda-")

# The device's Python, for environment markers and wheel tags.
MARKERS = {"python_version": "3.12", "python_full_version": "3.12.3", "implementation_name": "cpython",
           "implementation_version": "3.12.3", "platform_python_implementation": "CPython",
           "sys_platform": "linux", "platform_system": "Linux", "platform_machine": "x86_64",
           "os_name": "posix", "platform_release": "", "platform_version": "", "extra": ""}
PLATFORMS = ([f"manylinux_2_{n}_x86_64" for n in range(39, 16, -1)]
             + ["manylinux2014_x86_64", "manylinux2010_x86_64", "manylinux1_x86_64"])


class PlanError(RuntimeError):
    pass


def norm(name: str) -> str:
    return canonicalize_name(name)


def never_carried(name: str) -> bool:
    return name in NEVER or name.startswith(NEVER_PREFIXES)


def load_image(path: Path = IMAGE_FILE) -> dict[str, str | None]:
    """``name -> version`` (None where the version there is unknown)."""
    out: dict[str, str | None] = {}
    for line in path.read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            name, _, version = line.partition("==")
            out[norm(name)] = version.strip() or None
    return out


def pyproject_pins(path: Path = ROOT / "pyproject.toml") -> dict[str, str]:
    import tomllib

    pins = {}
    for dep in tomllib.loads(path.read_text())["project"]["dependencies"]:
        req = Requirement(dep)
        exact = [s.version for s in req.specifier if s.operator == "=="]
        if exact:
            pins[norm(req.name)] = exact[0]
    return pins


def installed_versions() -> dict[str, str]:
    from importlib import metadata

    return {norm(d.metadata["Name"]): d.version for d in metadata.distributions() if d.metadata["Name"]}


def roots(pins: dict[str, str]) -> list[str]:
    """What the check's steps import, as requirements: :data:`CARRY` at pyproject's pins, the rest
    (:data:`IMPORTED`) unpinned, so that the machine's own copies stay."""
    return [f"{norm(n)}=={pins[norm(n)]}" for n in CARRY] + [n for n in IMPORTED if norm(n) not in map(norm, CARRY)]


def has_upper_bound(spec: SpecifierSet) -> bool:
    return any(s.operator in ("<", "<=", "==", "===", "~=") for s in spec)


class Carried:   # (plain classes: tests load this file by path, where dataclasses cannot resolve it)
    def __init__(self, version: str, requires: list[str], needed_by: list[str] | None = None,
                 file: str | None = None, size: int = 0, note: str = ""):
        self.version, self.requires, self.needed_by = version, requires, needed_by or []
        self.file, self.size, self.note = file, size, note


class Plan:
    def __init__(self):
        self.carried: dict[str, Carried] = {}
        self.from_image: dict[str, str] = {}   # name -> why the image's copy does
        # Image packages of unknown version that a carried package needs at a lower bound: a spare
        # wheel is carried for each (when small), which pip takes only if the image's copy is too old.
        self.spares: dict[str, str] = {}       # name -> the specifier asked


Fetch = Callable[[str, str], tuple[str, list[str]]]   # (name, "==1.0" or a specifier) -> (version, Requires-Dist)


def plan(fetch: Fetch, image: dict[str, str | None], pins: dict[str, str], installed: dict[str, str] | None = None,
         carry: tuple[str, ...] = CARRY, imported: tuple[str, ...] = IMPORTED) -> Plan:
    """Which packages to carry (and at which version) and which the image provides.

    ``fetch`` downloads (or, in tests, looks up) one package and returns its version and its
    Requires-Dist lines; nothing else touches the network."""
    installed = installed or {}
    specs: dict[str, SpecifierSet] = {}
    extras: dict[str, set[str]] = {}
    by: dict[str, list[str]] = {}
    out = Plan()
    forced = {norm(n) for n in carry}
    queue: deque[tuple[Requirement, str]] = deque()
    for name in carry:
        n = norm(name)
        if never_carried(n):
            raise PlanError(f"{n}: never carried (the image's build must be used)")
        if n not in pins:
            raise PlanError(f"{n}: carried at pyproject.toml's pin, and pyproject.toml pins none")
        queue.append((Requirement(f"{n}=={pins[n]}"), "gpu_check"))
    for name in imported:
        queue.append((Requirement(name), "gpu_check"))

    while queue:
        req, who = queue.popleft()
        name = norm(req.name)
        specs[name] = specs.get(name, SpecifierSet()) & req.specifier
        extras.setdefault(name, set()).update(req.extras)
        if who not in by.setdefault(name, []):
            by[name].append(who)
        spec = specs[name]
        if name in out.carried:
            c = out.carried[name]
            if who not in c.needed_by:
                c.needed_by.append(who)
            if not spec.contains(c.version, prereleases=True):
                raise PlanError(f"{name} {c.version} is carried, but {who} needs {name}{spec}")
            continue
        have = image[name] if name in image else "absent"
        if never_carried(name):
            if have == "absent":
                raise PlanError(f"{name}: needed by {who} and never carried, but the image lacks it")
            if have is not None and not spec.contains(have, prereleases=True):
                raise PlanError(f"{name}: the image's {have} does not satisfy {who}'s {name}{spec}; "
                                "it is never carried")
            out.from_image[name] = f"{have or 'version unknown'} (never carried)"
            continue
        if name not in forced and have != "absent":
            if have is not None and spec.contains(have, prereleases=True):
                out.from_image[name] = have
                continue
            if have is None and not has_upper_bound(spec):
                out.from_image[name] = f"version unknown; {spec or 'any version'} asked"
                continue
        # Carry it: pyproject's pin, else the tested environment's version, else pip's newest.
        version = pins.get(name) or installed.get(name)
        if version and not spec.contains(version, prereleases=True):
            if name in pins:
                raise PlanError(f"{name}: pyproject.toml pins {version}, but {who} needs {name}{spec}")
            version = None
        got, requires = fetch(name, f"=={version}" if version else str(spec))
        out.from_image.pop(name, None)
        out.carried[name] = Carried(got, requires, needed_by=list(by[name]))
        for line in requires:
            r = Requirement(line)
            wanted = {""} | extras.get(name, set())
            if r.marker is None or any(r.marker.evaluate(dict(MARKERS, extra=e)) for e in wanted):
                queue.append((Requirement(str(r).split(";", 1)[0]), name))
    out.spares = {n: str(specs[n]) for n in sorted(out.from_image)
                  if image.get(n) is None and not never_carried(n) and str(specs[n])}
    return out


# ---- the real fetch: pip download for the device's platform, one package at a time


def wheel_metadata(path: Path) -> tuple[str, list[str]]:
    with zipfile.ZipFile(path) as z:
        meta = next(n for n in z.namelist() if n.count("/") == 1 and n.endswith(".dist-info/METADATA"))
        msg = email.parser.Parser().parsestr(z.read(meta).decode())
    return msg["Version"], msg.get_all("Requires-Dist") or []


def pure(path: Path) -> bool:
    _, _, _, tags = parse_wheel_filename(path.name)
    return all(t.abi == "none" and t.platform == "any" for t in tags)


class PipFetch:
    def __init__(self, dest: Path, python: str = sys.executable):
        self.dest, self.python = dest, python
        self.files: dict[str, Path] = {}
        self.notes: dict[str, str] = {}

    def _existing(self, name: str, want: str) -> Path | None:
        if not want.startswith("=="):
            return None
        for f in self.dest.glob("*.whl"):
            n, v, _, _ = parse_wheel_filename(f.name)
            if norm(n) == name and str(v) == want[2:]:
                return f
        return None

    def __call__(self, name: str, want: str) -> tuple[str, list[str]]:
        found = self._existing(name, want)
        if found is None:
            with tempfile.TemporaryDirectory() as tmp:
                base = [self.python, "-m", "pip", "download", "-q", "--no-deps", "-d", tmp,
                        "--disable-pip-version-check"]
                binary = base + ["--only-binary=:all:", "--python-version", "3.12", "--implementation", "cp",
                                 "--abi", "cp312", "--abi", "abi3", "--abi", "none"]
                for p in PLATFORMS:
                    binary += ["--platform", p]
                proc = subprocess.run(binary + [f"{name}{want}"], capture_output=True, text=True)
                if proc.returncode != 0:
                    if "No matching distribution" not in proc.stderr and "from versions: none" not in proc.stderr:
                        raise PlanError(f"pip download {name}{want}: {proc.stderr.strip()[-800:]}")
                    # No wheel for the device: build one here from the sdist; keep it only if pure.
                    proc = subprocess.run([self.python, "-m", "pip", "wheel", "-q", "--no-deps", "--no-binary", name,
                                           "--disable-pip-version-check", "-w", tmp, f"{name}{want}"],
                                          capture_output=True, text=True)
                    if proc.returncode != 0:
                        raise PlanError(f"pip wheel {name}{want} (no wheel for the device): "
                                        f"{proc.stderr.strip()[-800:]}")
                    self.notes[name] = "built here from its sdist (pure Python)"
                got = [f for f in Path(tmp).iterdir() if f.suffix == ".whl"]
                if len(got) != 1:
                    raise PlanError(f"{name}{want}: expected one wheel, got {[f.name for f in got]}")
                if name in self.notes and not pure(got[0]):
                    raise PlanError(f"{got[0].name}: built from an sdist for this machine, not pure Python")
                found = self.dest / got[0].name
                shutil.move(str(got[0]), found)
        self.files[name] = found
        return wheel_metadata(found)


# ---- bitsandbytes: keep the device's CUDA library only


def slim_bitsandbytes(path: Path, keep_cuda: str) -> tuple[Path, list[str]]:
    """Rewrite the wheel in place without the native libraries for other CUDA/ROCm/XPU versions."""
    keep = {"libbitsandbytes_cpu.so", f"libbitsandbytes_cuda{keep_cuda}.so"}
    lib = re.compile(r"^bitsandbytes/libbitsandbytes_[a-z0-9_]+\.(so|dll|dylib)$")
    with zipfile.ZipFile(path) as z:
        names = z.namelist()
        dropped = [n for n in names if lib.match(n) and n.rsplit("/", 1)[1] not in keep]
        if not dropped:
            return path, []
        if not any(n.endswith(f"libbitsandbytes_cuda{keep_cuda}.so") for n in names):
            raise PlanError(f"{path.name}: has no libbitsandbytes_cuda{keep_cuda}.so (--bnb-cuda)")
        tmp = path.with_suffix(".slim")
        with zipfile.ZipFile(tmp, "w", zipfile.ZIP_DEFLATED) as w:
            for info in z.infolist():
                if info.filename in dropped:
                    continue
                data = z.read(info)
                if info.filename.endswith(".dist-info/RECORD"):
                    rows = [r for r in data.decode().splitlines() if r.split(",", 1)[0] not in dropped]
                    data = ("\n".join(rows) + "\n").encode()
                w.writestr(info, data)
    tmp.replace(path)
    return path, dropped


def record_ok(path: Path) -> bool:
    """Every file of the wheel is in its RECORD with the right hash (RECORD itself excepted)."""
    with zipfile.ZipFile(path) as z:
        rec = next(n for n in z.namelist() if n.endswith(".dist-info/RECORD"))
        rows = {r.split(",")[0]: r.split(",")[1] for r in z.read(rec).decode().splitlines() if r.strip()}
        for n in z.namelist():
            if n == rec or n.endswith("/"):
                continue
            digest = base64.urlsafe_b64encode(hashlib.sha256(z.read(n)).digest()).rstrip(b"=").decode()
            if rows.get(n) != f"sha256={digest}":
                return False
    return True


def travelling_bytes(root: Path = ROOT) -> int:
    """Bytes of what travels with the working tree: tracked plus untracked-not-ignored files."""
    files = subprocess.run(["git", "ls-files", "-z", "-co", "--exclude-standard"], cwd=root, capture_output=True,
                           check=True).stdout.split(b"\0")
    return sum((root / f.decode()).stat().st_size for f in files if f and (root / f.decode()).is_file())


def mib(n: int) -> float:
    return round(n / 2**20, 2)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--dest", default=".gpu-wheels", help="the wheelhouse (git-ignored)")
    ap.add_argument("--limit-mib", type=float, default=60.0, help="wheels + the working tree that travels")
    ap.add_argument("--bnb-cuda", default="130", help="bitsandbytes' CUDA library to keep (torch.version.cuda "
                                                      "without the dot), or 'all'")
    ap.add_argument("--spare-max-mib", type=float, default=1.0, help="largest spare wheel carried")
    ap.add_argument("--image", default=str(IMAGE_FILE), help="the device image's packages")
    ap.add_argument("--python", default=sys.executable, help="the Python whose pip downloads")
    ap.add_argument("--roots", action="store_true", help="only print the check's own requirements (for an "
                    "install from an index: gpu_check.sh without WHEELS) and exit")
    a = ap.parse_args(argv)
    if a.roots:
        print("\n".join(roots(pyproject_pins())))
        return 0
    dest = Path(a.dest)
    if not dest.is_absolute():
        dest = Path.cwd() / dest
    dest.mkdir(parents=True, exist_ok=True)
    fetch = PipFetch(dest, a.python)
    installed = installed_versions()
    try:
        p = plan(fetch, load_image(Path(a.image)), pyproject_pins(), installed)
        spares: dict[str, Carried] = {}
        too_big: dict[str, str] = {}
        for name, spec in p.spares.items():
            have = installed.get(name)
            version, requires = fetch(name, f"=={have}" if have and SpecifierSet(spec).contains(have) else spec)
            size = fetch.files[name].stat().st_size
            if size > a.spare_max_mib * 2**20:
                fetch.files.pop(name).unlink()
                too_big[name] = f"{spec} asked; no spare carried ({mib(size)} MiB)"
            else:
                spares[name] = Carried(version, requires, file=fetch.files[name].name, size=size,
                                       note=f"spare: {spec} asked, the image's version unknown")
    except PlanError as exc:
        print(f"gpu_wheels: {exc}", file=sys.stderr)
        return 2
    keep = {f.name for f in fetch.files.values()}
    for f in dest.glob("*.whl"):   # two versions of one package stop the whole install
        if f.name not in keep:
            f.unlink()
    for name, c in p.carried.items():
        f = fetch.files[name]
        c.file, c.note = f.name, fetch.notes.get(name, "")
        if name == "bitsandbytes" and a.bnb_cuda != "all":
            _, dropped = slim_bitsandbytes(f, a.bnb_cuda)
            if dropped or not c.note:
                c.note = (f"native libraries for CPU and CUDA {a.bnb_cuda[:-1]}.{a.bnb_cuda[-1]} only "
                          f"(--bnb-cuda {a.bnb_cuda}; {len(dropped) or 'the others'} dropped)")
        c.size = f.stat().st_size
    (dest / "requirements.txt").write_text(
        "# bench/gpu_wheels.py: every carried package, pinned (pip install --no-index --find-links DIR -r this);\n"
        "# the spare wheels beside them are not listed: pip takes one only where the image's copy is too old\n"
        + "".join(f"{n}=={c.version}\n" for n, c in sorted(p.carried.items())))
    wheels = sum(c.size for c in p.carried.values()) + sum(c.size for c in spares.values())
    tree = travelling_bytes()
    manifest = {"target": "CPython 3.12, manylinux x86_64 (the device image 'cuda')", "bnb_cuda": a.bnb_cuda,
                "carried": {n: {"version": c.version, "file": c.file, "mib": mib(c.size), "needed_by": c.needed_by,
                                **({"note": c.note} if c.note else {})} for n, c in sorted(p.carried.items())},
                "spares": {n: {"version": c.version, "file": c.file, "mib": mib(c.size), "asked": p.spares[n]}
                           for n, c in sorted(spares.items())},
                "from_image": dict(sorted(p.from_image.items())),
                "from_image_unchecked": too_big,
                "wheels_mib": mib(wheels), "working_tree_mib": mib(tree)}
    # + 4 KiB for MANIFEST.json itself, written below
    total = wheels + tree + sum(f.stat().st_size for f in dest.iterdir() if f.is_file() and f.suffix != ".whl") + 4096
    manifest.update(total_mib=mib(total), limit_mib=a.limit_mib)
    (dest / "MANIFEST.json").write_text(json.dumps(manifest, indent=2) + "\n")

    rows = sorted({**p.carried, **spares}.items(), key=lambda kv: -kv[1].size)
    width = max(len(n) for n, _ in rows)
    print(f"{'package':<{width}}  {'version':<12} {'MiB':>6}  needed by")
    for n, c in rows:
        print(f"{n:<{width}}  {c.version:<12} {mib(c.size):>6.2f}  {', '.join(c.needed_by) or '-'}"
              + (f"  [{c.note}]" if c.note else ""))
    print(f"from the image: {', '.join(f'{n} ({v})' for n, v in sorted(p.from_image.items()))}")
    for n, why in too_big.items():
        print(f"from the image, unchecked: {n}: {why}: the install fails over to --no-deps if the image's is older")
    print(f"wheels: {len(p.carried)} carried + {len(spares)} spare, {mib(wheels)} MiB in {dest}; working tree "
          f"that travels: {mib(tree)} MiB; total {mib(total)} MiB (limit {a.limit_mib} MiB; the device takes 64)")
    if total > a.limit_mib * 2**20:
        print(f"gpu_wheels: too big: {mib(total)} MiB > {a.limit_mib} MiB", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
