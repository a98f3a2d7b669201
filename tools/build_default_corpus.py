#!/usr/bin/env python3
"""Build the extra training text of neox_rt's default model: the Python sources of permissively licensed PyPI
packages, pinned below, as one xz file (``.corpus/extra.txt.xz``, ignored by git) plus a per-package manifest
(``tools/default_model_corpus.json``, committed; the model card lists it).

Steps (all deterministic for the pinned versions)::

    python tools/build_default_corpus.py            # download (pip) + filter + write .corpus/extra.txt.xz

1. ``pip download --no-deps --only-binary :all:`` each ``name==version`` of :data:`PACKAGES` (CPython 3.12,
   manylinux x86_64 wheels where the package has compiled parts) into :data:`WHEELS_DIR`. Nothing is built or
   installed: wheels are zip files and only their ``*.py`` members are read.
2. The license comes from the wheel's METADATA (``License-Expression``, else the ``License ::`` classifiers,
   else the ``License`` field; :data:`LICENSE_OVERRIDES` where that is missing or is the license's full text).
   A package is kept only if every license it names is one of MIT, BSD, Apache-2.0, PSF, ISC
   (:func:`classify`); anything else (GPL, LGPL, MPL, unknown) drops the whole package.
3. Files: ``*.py`` only (no ``.pyi`` stubs); skipped: vendored third-party trees (:data:`VENDORED_DIRS`),
   test folders (:data:`TEST_DIRS`), non-UTF-8 files, files with NUL bytes or the tokenizer's special tokens,
   files over 1 MB and machine-made files (:func:`looks_generated`); at most :data:`MAX_PACKAGE_CHARS`
   characters per package (files in path order).
   ``\\r\\n`` becomes ``\\n`` (as reading the stdlib in text mode does).
4. Held-out protection: the default model's held-out stdlib files (``HELDOUT_FILES`` of
   ``tools/train_default_model.py``) must not leak into training. A file is dropped if its name is one of
   theirs, or if it shares :data:`LEAK_MIN_SHARED` or more distinct long lines (>= :data:`LEAK_LINE_CHARS`
   characters stripped) with those files of every local Python found (3.6-3.13 when the corpus was built).
   ``train_default_model.py`` repeats the line check against the training machine's own held-out files.
5. Exact duplicates (sha256 of the text) are dropped, first occurrence kept (packages in :data:`PACKAGES`
   order, files in wheel-path order).
6. Output: the kept files, in that order, joined by ``\\x00`` (:data:`SEPARATOR`), xz preset 9e, at
   ``.corpus/extra.txt.xz``; ``.corpus/extra_files.tsv`` lists package, path and characters of each file;
   the manifest records per package name, version, license, files and characters, and the corpus's sha256.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import lzma
import os
import re
import subprocess
import sys
import time
import zipfile
from email.parser import HeaderParser

TOOLS = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(TOOLS)
CORPUS_DIR = os.path.join(REPO, ".corpus")
WHEELS_DIR = os.environ.get("NEOX_RT_CORPUS_WHEELS", "/tmp/neox_rt_corpus_wheels")
"""Where the wheels are downloaded (outside .corpus, which travels to the GPU machine whole)."""
OUT_PATH = os.path.join(CORPUS_DIR, "extra.txt.xz")
FILES_TSV = os.path.join(CORPUS_DIR, "extra_files.tsv")
MANIFEST_PATH = os.path.join(TOOLS, "default_model_corpus.json")
SEPARATOR = "\x00"
"""Between files in extra.txt.xz (files holding a NUL are dropped)."""

LEAK_LINE_CHARS = 30
LEAK_MIN_SHARED = 3
MAX_FILE_BYTES = 1_000_000

# Pinned: the newest wheels on PyPI for CPython 3.12 when the corpus was built (cherrypy left out: its metadata
# names "Freely Distributable" next to BSD). Order matters for dedupe.
PACKAGES = """
django==6.1.3 sympy==1.14.0 numpy==2.5.5 scipy==1.18.1 pandas==3.1.1 networkx==3.7 requests==2.34.2
flask==3.1.3 jinja2==3.1.6 werkzeug==3.1.9 click==8.5.1 attrs==26.1.0 pydantic==2.14.4 sqlalchemy==2.1.9
twisted==26.10.0 tornado==6.6.1 matplotlib==3.11.2 scikit-learn==1.9.1 setuptools==84.2.1 pip==26.3
black==26.10.1 pytest==9.2.0 astropy==8.0.2 statsmodels==0.15.0 sphinx==9.1.1 pygments==2.21.0
ipython==9.19.1 jedi==0.20.1 parso==0.8.7 mypy==2.4.1 dask==2026.11.0 xarray==2026.9.0 bokeh==3.10.2
scikit-image==0.26.0 boto3==1.44.18 transformers==5.25.0 aiohttp==3.14.5 httpx==0.29.0 fastapi==0.165.0
starlette==1.10.0 celery==5.7.0 kombu==5.7.0 redis==8.2.0 pyparsing==3.3.3 pyyaml==6.0.4 rich==15.0.0
textual==8.2.8 alembic==1.20.1 marshmallow==4.4.0 scrapy==2.19.0 beautifulsoup4==4.15.0 gunicorn==27.0.1
urllib3==2.8.0 idna==3.21 markdown==3.11.3 nltk==3.10.4 datasets==5.2.0 diffusers==0.42.1 accelerate==1.16.0
numba==0.68.1 sqlglot==30.31.0 openpyxl==3.1.5 babel==2.19.0 coverage==7.18.0 flake8==7.5.0
pycodestyle==2.15.0 pyflakes==4.1.0 isort==9.0.2 virtualenv==21.15.14 traitlets==5.16.1 nbconvert==7.17.2
nbformat==5.11.1 jupyter-server==2.21.1 ipykernel==7.4.0 huggingface-hub==2.4.0 fsspec==2026.9.0
sqlparse==0.6.1 docker==7.2.0 moto==5.2.6 more-itertools==11.2.1 toolz==1.2.0 sortedcontainers==2.4.0
oauthlib==4.0.1 sentry-sdk==2.76.0 prompt-toolkit==3.0.53 pexpect==4.9.0 psutil==7.2.2 pycparser==3.12
mako==1.4.3 peewee==4.5.3 djangorestframework==3.18.3 sanic==25.12.1 falcon==4.4.0 bottle==0.13.5
mitmproxy==12.3.1 jax==0.12.0.1 flax==0.12.12 optax==0.2.8 keras==3.15.1 lightning==2.6.6
torchmetrics==1.9.0 gymnasium==1.4.0 shapely==2.2.0 seaborn==0.13.2 holoviews==1.23.2 param==2.4.2
panel==1.10.0 numpydoc==1.11.0 sphinx-gallery==0.22.1 pymc==6.4.0 pytensor==3.3.8 wagtail==8.0.1
strawberry-graphql==0.341.2 graphene==3.4.3 tortoise-orm==1.1.9 pyproj==3.8.0 geopandas==1.2.0
hatchling==1.33.0 poetry-core==2.5.0 pluggy==1.7.0 packaging==26.4 sqlmodel==0.0.50 arrow==1.4.0
pendulum==3.3.0 python-dateutil==4.0.0 cryptography==51.0.1 pyopenssl==26.4.0 h11==0.16.0 httpcore==1.0.9
anyio==4.16.0 trio==0.35.0
""".split()

LICENSE_OVERRIDES: dict[str, str] = {"peewee": "MIT"}
"""Package (normalised name) -> license, where the wheel's metadata names none (peewee's LICENSE file: MIT)."""

PERMISSIVE = ("MIT", "BSD", "Apache-2.0", "PSF", "ISC", "0BSD", "Zlib", "CC0-1.0")
"""Accepted licenses (0BSD, Zlib and CC0-1.0 appear only next to BSD-3-Clause, for numpy's bundled parts)."""

TEST_DIRS = frozenset({"test", "tests", "testing", "unittests", "unit_tests"})
"""Test suites are left out: the held-out text is library code, and tests are the most repetitive part."""

MAX_PACKAGE_CHARS = 8_000_000
"""At most this many characters from one package (files in path order), so no package dominates."""

VENDORED_DIRS = frozenset({"_vendor", "vendor", "vendored", "_vendored", "extern", "_extern", "externals",
                           "_externals", "third_party", "thirdparty", "_thirdparty", "__pycache__"})
"""Directories of third-party code bundled by a package (possibly under other licenses)."""


def norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def log(msg: str) -> None:
    print(f"[build_default_corpus] {msg}", flush=True)


# ----------------------------------------------------------------------------------------------------

def download(specs: list[str], dest: str = WHEELS_DIR) -> dict[str, str]:
    """spec -> wheel path, downloading the missing ones with pip (one process per package)."""
    os.makedirs(dest, exist_ok=True)
    have = {}
    for f in os.listdir(dest):
        if f.endswith(".whl"):
            name, version = f.split("-")[:2]
            have[f"{norm(name)}=={version}"] = os.path.join(dest, f)
    out = {}
    for spec in specs:
        name, version = spec.split("==")
        key = f"{norm(name)}=={version}"
        if key not in have:
            log(f"pip download {spec}")
            subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--only-binary", ":all:",
                            "--python-version", "3.12", "--implementation", "cp", "--abi", "cp312",
                            "--platform", "manylinux_2_17_x86_64", "--platform", "manylinux2014_x86_64",
                            "--platform", "manylinux_2_28_x86_64", "-d", dest, spec], check=True)
            for f in os.listdir(dest):
                n, v = f.split("-")[:2]
                if f.endswith(".whl") and norm(n) == norm(name) and v == version:
                    have[key] = os.path.join(dest, f)
        out[spec] = have[key]
    return out


def wheel_metadata(zf: zipfile.ZipFile):
    name = next(n for n in zf.namelist() if n.endswith(".dist-info/METADATA") and n.count("/") == 1)
    return HeaderParser().parsestr(zf.read(name).decode("utf-8", "replace"))


_CLASSIFIERS = {
    "MIT License": "MIT", "MIT No Attribution License (MIT-0)": "MIT", "BSD License": "BSD",
    "Apache Software License": "Apache-2.0", "Python Software Foundation License": "PSF",
    "ISC License (ISCL)": "ISC",
}


def classify(meta, name: str) -> tuple[str, bool]:
    """(license as recorded, permissive?) from a wheel's METADATA."""
    if norm(name) in LICENSE_OVERRIDES:
        lic = LICENSE_OVERRIDES[norm(name)]
    elif meta.get("License-Expression"):
        lic = meta["License-Expression"].strip()
    else:
        found = []
        for c in meta.get_all("Classifier") or []:
            if c.startswith("License ::"):
                found.append(c.split("::")[-1].strip())
        if found:
            lic = " AND ".join(_CLASSIFIERS.get(c, c) for c in found)
        else:
            lic = (meta.get("License") or "").strip().splitlines()[0] if meta.get("License") else "UNKNOWN"
    # every license named must be permissive (an "OR" of permissive and other is fine: we take the permissive one)
    alternatives = re.split(r"\s+OR\s+", lic.replace("(", " ").replace(")", " "))
    def ok(term: str) -> bool:
        parts = [p.strip() for p in re.split(r"\s+AND\s+|\s+WITH\s+", term) if p.strip()]
        return bool(parts) and all(_permissive(p) for p in parts)
    return lic, any(ok(a) for a in alternatives)


def _permissive(term: str) -> bool:
    t = term.strip().rstrip(".,;")
    if re.search(r"GPL|MPL|Mozilla|EPL|CDDL|AGPL|Commercial|Proprietary|UNKNOWN|CC-BY-SA|HPND|Unlicense", t, re.I):
        return False
    return bool(re.match(r"^(MIT(-0|-CMU)?|MIT License|BSD(-[234]-Clause)?(-Clear)?|BSD License|"
                         r"BSD[- ]?[23]?[- ]?clause|new BSD|Modified BSD|3-clause BSD|Simplified BSD|"
                         r"Apache(-2\.0| 2\.0| Software License| License,? Version 2\.0| License 2\.0|"
                         r" License)?|Apache Software License 2\.0|PSF(-2\.0)?|Python-2\.0|"
                         r"Python Software Foundation License|ISC|0BSD|Zlib|CC0-1\.0|Apache 2\.0 License|"
                         r"LLVM-exception|Apache-2\.0 WITH LLVM-exception)$", t, re.I))


def looks_generated(text: str) -> bool:
    """Data or machine output rather than code people write: very long lines, or a "generated" banner."""
    lines = text.split("\n")
    if not lines:
        return True
    if max(len(x) for x in lines) > 2000:
        return True
    if len(text) / max(1, len(lines)) > 120:
        return True
    head = text[:600].lower()
    return bool(re.search(r"(auto-?generated|generated by|do not edit|automatically generated)", head))


def heldout_texts() -> dict[str, list[str]]:
    """Held-out file name -> its texts in every local Python 3 found (for the leak filter)."""
    sys.path.insert(0, TOOLS)
    from train_default_model import HELDOUT_FILES
    texts: dict[str, list[str]] = {n: [] for n in HELDOUT_FILES}
    import glob
    import sysconfig
    roots = {os.path.realpath(sysconfig.get_paths()["stdlib"])}
    for pattern in ("/usr/lib/python3.*", "/usr/local/lib/python3.*",
                    os.path.expanduser("~/.pyenv/versions/*/lib/python3.*")):
        for d in glob.glob(pattern):
            if re.search(r"python3\.\d+$", d) and os.path.isfile(os.path.join(d, "textwrap.py")):
                roots.add(os.path.realpath(d))
    for root in sorted(roots):
        for n in HELDOUT_FILES:
            p = os.path.join(root, n)
            if os.path.isfile(p):
                with open(p, encoding="utf-8") as f:
                    texts[n].append(f.read())
    log(f"held-out files from {len(roots)} stdlibs: {', '.join(sorted(roots))}")
    return texts


def long_lines(text: str, min_chars: int = LEAK_LINE_CHARS) -> set[str]:
    return {s for s in (x.strip() for x in text.split("\n")) if len(s) >= min_chars}


def leak_lines(heldout: dict[str, list[str]]) -> set[str]:
    lines = set()
    for texts in heldout.values():
        for t in texts:
            lines |= long_lines(t)
    return lines


def shares_heldout(text: str, lines: set[str], min_shared: int = LEAK_MIN_SHARED) -> bool:
    n = 0
    for s in long_lines(text):
        if s in lines:
            n += 1
            if n >= min_shared:
                return True
    return False


# ----------------------------------------------------------------------------------------------------

def build(specs: list[str], out_path: str = OUT_PATH, manifest_path: str = MANIFEST_PATH,
          dry_run: bool = False) -> dict:
    t0 = time.time()
    wheels = download(specs)
    heldout = heldout_texts()
    heldout_names = set(heldout)
    bad_lines = leak_lines(heldout)
    seen: set[bytes] = set()
    docs: list[str] = []
    rows: list[str] = []
    packages, excluded = [], []
    for spec in specs:
        name, version = spec.split("==")
        zf = zipfile.ZipFile(wheels[spec])
        meta = wheel_metadata(zf)
        lic, ok = classify(meta, name)
        if not ok:
            excluded.append(dict(name=name, version=version, license=lic))
            log(f"excluded {spec}: license {lic!r}")
            continue
        stats = dict(name=name, version=version, license=lic, wheel=os.path.basename(wheels[spec]), files=0,
                     chars=0, skipped=dict(vendored=0, tests=0, over_cap=0, not_utf8=0, special=0, large=0, generated=0,
                                           heldout_name=0, heldout_lines=0, duplicate=0))
        sk = stats["skipped"]
        for member in sorted(zf.namelist()):
            if not member.endswith(".py"):
                continue
            parts = member.split("/")
            if any(p in VENDORED_DIRS for p in parts[:-1]) or ".data/" in member and "/scripts/" in member:
                sk["vendored"] += 1
                continue
            if any(p in TEST_DIRS for p in parts[:-1]):
                sk["tests"] += 1
                continue
            if stats["chars"] >= MAX_PACKAGE_CHARS:
                sk["over_cap"] += 1
                continue
            info = zf.getinfo(member)
            if info.file_size > MAX_FILE_BYTES:
                sk["large"] += 1
                continue
            raw = zf.read(member)
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError:
                sk["not_utf8"] += 1
                continue
            text = text.replace("\r\n", "\n").replace("\r", "\n")
            if text.startswith("\ufeff"):
                text = text[1:]
            if not text.strip():
                continue
            if "\x00" in text or "<|endoftext|>" in text or "<|padding|>" in text:
                sk["special"] += 1
                continue
            if looks_generated(text):
                sk["generated"] += 1
                continue
            if parts[-1] in heldout_names:
                sk["heldout_name"] += 1
                continue
            if shares_heldout(text, bad_lines):
                sk["heldout_lines"] += 1
                log(f"  held-out lines in {name}:{member}")
                continue
            h = hashlib.sha256(text.encode("utf-8")).digest()
            if h in seen:
                sk["duplicate"] += 1
                continue
            seen.add(h)
            docs.append(text)
            rows.append(f"{name}\t{member}\t{len(text)}")
            stats["files"] += 1
            stats["chars"] += len(text)
        packages.append(stats)
        log(f"{spec:<32} {lic[:40]:<40} {stats['files']:>6} files {stats['chars'] / 1e6:8.2f} M chars")
    text = SEPARATOR.join(docs)
    raw = text.encode("utf-8")
    log(f"{len(docs):,} files, {len(text):,} characters, {len(raw):,} bytes; compressing (xz -9e)")
    if dry_run:
        with open(os.path.join(CORPUS_DIR, "extra.txt"), "wb") as f:
            f.write(raw)
        return {}
    os.makedirs(os.path.dirname(out_path), exist_ok=True)
    tmp = out_path + ".tmp"
    r = subprocess.run(["xz", "-9e", "-T0", "-c"], input=raw, stdout=open(tmp, "wb"), check=True)
    del r
    os.replace(tmp, out_path)
    with open(FILES_TSV, "w", encoding="utf-8") as f:
        f.write("package\tpath\tchars\n" + "\n".join(rows) + "\n")
    sha = hashlib.sha256(open(out_path, "rb").read()).hexdigest()
    manifest = dict(
        description="Extra training text of neox_rt's default model: *.py files of these PyPI wheels "
                    "(tools/build_default_corpus.py), joined by NUL, xz-compressed",
        path=os.path.relpath(out_path, REPO), sha256=sha, compressed_bytes=os.path.getsize(out_path),
        utf8_bytes=len(raw), files=len(docs), chars=len(text), separator="\\x00",
        filters=dict(max_file_bytes=MAX_FILE_BYTES, vendored_dirs=sorted(VENDORED_DIRS),
                     test_dirs=sorted(TEST_DIRS), max_package_chars=MAX_PACKAGE_CHARS,
                     leak_line_chars=LEAK_LINE_CHARS, leak_min_shared=LEAK_MIN_SHARED,
                     permissive=list(PERMISSIVE)),
        packages=packages, excluded=excluded)
    with open(manifest_path, "w", encoding="utf-8") as f:
        f.write("{\n")
        items = [(k, v) for k, v in manifest.items() if k not in ("packages", "excluded")]
        for k, v in items:
            f.write(f" {json.dumps(k)}: {json.dumps(v)},\n")
        for key in ("packages", "excluded"):
            f.write(f' "{key}": [\n')
            f.write(",\n".join("  " + json.dumps(p) for p in manifest[key]))
            f.write("\n ]" + ("," if key == "packages" else "") + "\n")
        f.write("}\n")
    log(f"wrote {out_path} ({os.path.getsize(out_path) / 2**20:.1f} MiB) and {manifest_path} "
        f"in {time.time() - t0:.0f} s")
    return manifest


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--survey", action="store_true", help="only print each wheel's license and *.py size")
    p.add_argument("--dry-run", action="store_true", help="write the uncompressed .corpus/extra.txt only")
    args = p.parse_args(argv)
    if args.survey:
        wheels = download(PACKAGES)
        for spec in PACKAGES:
            zf = zipfile.ZipFile(wheels[spec])
            lic, ok = classify(wheel_metadata(zf), spec.split("==")[0])
            size = sum(i.file_size for i in zf.infolist() if i.filename.endswith(".py"))
            print(f"{spec:<32} {'ok ' if ok else 'NO '} {size / 1e6:7.2f} MB  {lic[:70]!r}")
        return 0
    build(PACKAGES, dry_run=args.dry_run)
    return 0


if __name__ == "__main__":
    sys.exit(main())
