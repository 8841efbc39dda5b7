"""Extraction of the docs corpus from the docstrings and comments of pinned packages.

`st_moe.tasks.corpus` reads the shipped result; this module makes it (`extract_documents`), with
no package imported:
  1. the docstrings of every module, class and function (`ast`) and the blocks of whole-line `#`
     comments of each `.py` file of the packages in `PACKAGES` (files in sorted path order, tests
     and build-written files skipped), in line order;
  2. each cut into paragraphs at blank lines and section headers; doctest lines, reST directives
     and underlines, literal blocks, URL-only lines, numpydoc parameter lines ("x : int") dropped;
     a Google/Sphinx parameter line ("x (int): ...", ":param x: ...") keeps only its description;
     the lines of a paragraph joined with spaces; tool directives and licence lines dropped;
  3. a paragraph kept only if it reads as English (`is_prose`: 8 words or more, mostly plain
     words, common function words, few code characters, mostly ASCII);
  4. near-duplicates dropped corpus-wide in package then file order: a paragraph is dropped when
     half or more of its word 8-grams (hashed with BLAKE2b) are in paragraphs kept before
     (transformers copies docstrings between models with the name changed; boilerplate repeats);
  5. one document per source file (its kept paragraphs, one per line), kept if it has
     `MIN_DOCUMENT_CHARS` characters or more.
The result of a package depends only on the packages before it in `PACKAGES`, so a prefix of the
list regenerates a prefix of the corpus (the tests use the first three).
"""
import ast
import gc
import hashlib
import importlib.metadata
import importlib.util
import os
import re
from typing import Iterable

# (distribution name in requirements.lock, pinned version, import name), in the order duplicates
# are resolved. Left out: tensorflow_datasets (two pinned distributions, tensorflow-datasets and
# tfds-nightly, install into that one folder) and torch (its CPU and CUDA wheels differ).
PACKAGES = (
    # The project's own stack first (small: tests regenerate this prefix quickly).
    ("mesh-tensorflow", "0.1.21", "mesh_tensorflow"),
    ("t5", "0.9.4", "t5"),
    ("seqio-nightly", "0.0.18.dev20250227", "seqio"),
    # Pure-Python wheels (py3-none-any, py2-none-any).
    ("sympy", "1.14.0", "sympy"),
    ("networkx", "3.6.1", "networkx"),
    ("nltk", "3.10.4", "nltk"),
    ("mpmath", "1.3.0", "mpmath"),
    ("jax", "0.4.38", "jax"),
    ("flax", "0.10.2", "flax"),
    ("optax", "0.2.5", "optax"),
    ("keras", "2.12.0", "keras"),
    ("transformers", "5.24.0", "transformers"),
    ("huggingface_hub", "2.4.0", "huggingface_hub"),
    ("setuptools", "79.0.1", "setuptools"),
    ("Pygments", "2.21.0", "pygments"),
    ("rich", "15.0.0", "rich"),
    # Platform wheels (cp311 manylinux x86_64, the lock's platform): their .py files are the
    # project's sources as released; build-written files (_GENERATED) are skipped.
    ("scipy", "1.15.3", "scipy"),
    ("numpy", "1.24.3", "numpy"),
    ("pandas", "2.3.3", "pandas"),
    ("scikit-learn", "1.9.1", "sklearn"),
    ("matplotlib", "3.10.9", "matplotlib"),
    ("tensorflow", "2.12.1", "tensorflow"),
)
MIN_DOCUMENT_CHARS = 200
MIN_PARAGRAPH_WORDS = 8
SHINGLE = 8  # words per n-gram of the near-duplicate test
DUPLICATE_FRACTION = 0.5

_FUNCTION_WORDS = frozenset(
    "the a an of to in is are be it this that for with as on by or and not if from which can "
    "will when this these its into than then there their has have was were should must may use "
    "used returns return given each all any only also more".split())
_SECTION = re.compile(
    r"^(args|arguments|parameters|params|returns?|yields?|raises?|examples?|example usage|"
    r"notes?|references?|see also|attributes|methods|keyword arguments|kwargs|other parameters|"
    r"warnings?|todo|usage|inputs|outputs)\s*:?\s*$", re.IGNORECASE)
_UNDERLINE = re.compile(r"^\s*([-=~^*+#`:.])\1{2,}\s*$")
_URL = re.compile(r"https?://\S+|www\.\S+")
_NAMES = r"^\*{0,2}[A-Za-z_][\w.]*(, \*{0,2}[A-Za-z_][\w.]*)*"  # "x", "*args, **kwargs"
# ":param x: ...", "x (int, optional): ...", "x: ..." -> the text after the prefix.
_PARAM_PREFIXES = (
    re.compile(r"^:(param|type|raises?|returns?|rtype|var|ivar|cvar)\b[^:]*:\s*"),
    re.compile(_NAMES + r"\s*\(([^()]|\([^()]*\))*\)\s*:\s*"),
    re.compile(_NAMES + r"\s*:\s+"),
)
_NUMPYDOC_PARAM = re.compile(_NAMES + r"\s+:\s*\S.*$")  # "x : int, optional" (dropped)
_CODE_CHARS = re.compile(r"[=(){}\[\]<>_*/\\|@$#%^~`;]")
_WORD = re.compile(r"[A-Za-z]+(?:'[a-z]+)?")


# Files a build writes (build configuration, version strings): they may differ between wheels.
_GENERATED = frozenset(("__config__.py", "version.py", "_version.py", "_distributor_init.py",
                        "conftest.py", "setup.py"))


class PackageVersionError(RuntimeError):
  """An installed package differs from the version the corpus was extracted from."""


def source_files(import_name: str) -> list[tuple[str, str]]:
  """The `.py` files of one installed package, found without importing it.

  Args:
    import_name: the top-level module name, e.g. "sympy".

  Returns:
    [(path relative to the package's parent folder, absolute path)], sorted by relative path;
    `__pycache__` folders and tests (`tests`/`testing` folders, `test_*.py`) are skipped.
  """
  spec = importlib.util.find_spec(import_name)
  if spec is None or not spec.submodule_search_locations:
    raise PackageVersionError(f"package {import_name!r} is not installed as a package; install "
                              "requirements.lock (pip install --no-deps -r requirements.lock).")
  found = []
  for location in spec.submodule_search_locations:
    parent = os.path.dirname(location)
    for dirpath, dirnames, filenames in os.walk(location):
      dirnames[:] = [d for d in dirnames if d not in ("__pycache__", "tests", "testing", "test")]
      for name in filenames:
        if name.endswith(".py") and not name.startswith("test_") and name not in _GENERATED:
          path = os.path.join(dirpath, name)
          found.append((os.path.relpath(path, parent).replace(os.sep, "/"), path))
  return sorted(found)


def docstrings(source: str) -> list[tuple[int, str]]:
  """The docstrings of a module and of its classes and functions.

  Args:
    source: Python source text.

  Returns:
    [(line number of the docstring, cleaned docstring)] in source order; [] if it does not parse.
  """
  try:
    tree = ast.parse(source)
  except (SyntaxError, ValueError):
    return []
  found = []

  def visit(node):
    if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
      doc = ast.get_docstring(node, clean=True)
      if doc:
        found.append((node.body[0].lineno, doc))
    for child in ast.iter_child_nodes(node):
      if isinstance(child, (ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef, ast.If, ast.Try)):
        visit(child)

  visit(tree)
  return sorted(found)


_COMMENT = re.compile(r"^[ \t]*#(.*)$")
_SKIP_COMMENT = re.compile(
    r"^(!|-\*-|pylint:|noqa|type:|fmt:|isort:|mypy:|pragma|coding[:=]|copied from|modified from|"
    r"copyright|licensed under|spdx|limitations under|distributed under|you may not use|"
    r"unless required|see the license|without warranties)", re.IGNORECASE)


def comments(source: str) -> list[tuple[int, str]]:
  """Blocks of consecutive whole-line `#` comments, as text with one line per comment line.

  Args:
    source: Python source text.

  Returns:
    [(line number of the block's first line, block text)] in source order; lines of tool
    directives and licence boilerplate are dropped.
  """
  blocks, current, first = [], [], 0
  for number, line in enumerate(source.split("\n"), start=1):
    m = _COMMENT.match(line)
    if not m:
      if current:
        blocks.append((first, "\n".join(current)))
        current = []
      continue
    text = m.group(1).lstrip("#").strip()
    if _SKIP_COMMENT.match(text):
      continue
    if not current:
      first = number
    current.append(text)
  if current:
    blocks.append((first, "\n".join(current)))
  return blocks


def _strip_param_prefix(line: str) -> str:
  for pattern in _PARAM_PREFIXES:
    m = pattern.match(line)
    if m:
      return line[m.end():]
  return line


def paragraphs(docstring: str) -> list[str]:
  """Cuts a cleaned docstring into candidate prose paragraphs (lines joined, markup dropped)."""
  result, current = [], []
  in_literal = False  # inside the indented block after "::" or a reST directive
  in_doctest = False  # from a ">>>" line to the next blank line (its output included)
  in_fence = False  # between ``` lines (Markdown code)

  def flush():
    if current:
      result.append(" ".join(current))
      current.clear()

  for raw in docstring.split("\n"):
    line = raw.strip()
    indent = len(raw) - len(raw.lstrip())
    if line.startswith("```"):
      flush()
      in_fence = not in_fence
      continue
    if in_fence:
      continue
    if not line:
      flush()
      in_doctest = False
      continue
    if in_doctest or (in_literal and indent > 0):
      continue
    in_literal = False
    if (line.startswith((">>>", "...", ".. ", "$ ", "In [", "Out[")) or _UNDERLINE.match(line)
        or _SECTION.match(line)):
      flush()
      in_literal = line.startswith(".. ")
      in_doctest = line.startswith((">>>", "In ["))
      continue
    if _NUMPYDOC_PARAM.match(line) and len(line.split()) <= 12:  # "x : int, optional"
      flush()
      continue
    if not _URL.sub("", line).strip():
      flush()
      continue
    stripped = _strip_param_prefix(line)
    if stripped is not line:
      flush()
      line = stripped.strip()
      if not line:
        continue
    if line.endswith("::"):
      current.append(line[:-1])
      flush()
      in_literal = True
      continue
    if indent >= 4 and current == [] and _CODE_CHARS.search(line):
      continue
    current.append(line)
  flush()
  return [re.sub(r"\s+", " ", p).strip() for p in result]


def is_prose(paragraph: str) -> bool:
  """Whether a paragraph reads as English prose rather than code, markup or a list of names."""
  words = paragraph.split()
  if len(words) < MIN_PARAGRAPH_WORDS:
    return False
  if sum(ord(c) > 127 for c in paragraph) > 0.02 * len(paragraph):
    return False
  plain = [w for w in words if _WORD.fullmatch(w.strip(".,;:!?\"'()"))]
  if len(plain) < 0.7 * len(words):
    return False
  if sum(w.lower().strip(".,;:!?\"'()") in _FUNCTION_WORDS for w in words) < 0.15 * len(words):
    return False
  if len(_CODE_CHARS.findall(paragraph)) > 0.03 * len(paragraph):
    return False
  letters = sum(c.isalpha() for c in paragraph)
  return letters >= 0.7 * len(paragraph)


def _shingles(paragraph: str) -> set[int]:
  words = [w.lower() for w in _WORD.findall(paragraph)]
  grams = zip(*(words[i:] for i in range(SHINGLE)))
  if len(words) < SHINGLE:
    grams = [words]
  # A fixed hash (Python's hash() of str varies between processes).
  return {int.from_bytes(hashlib.blake2b(" ".join(g).encode(), digest_size=8).digest(), "little")
          for g in grams}


def extract_documents(packages: Iterable[tuple[str, str, str]] = PACKAGES,
                      check_versions: bool = True) -> list[dict]:
  """Extracts the corpus from the installed packages (see the module docstring).

  Args:
    packages: (distribution, version, import name) triples, in the order duplicates are resolved.
    check_versions: refuse installed versions other than the pinned ones.

  Returns:
    [{"id": "<package folder>/<path>", "text": str, "source_sha256": SHA-256 of the source file}],
    sorted by id.
  """
  packages = list(packages)
  for distribution, version, _ in packages:
    installed = importlib.metadata.version(distribution)
    if check_versions and installed != version:
      raise PackageVersionError(
          f"{distribution}=={installed} is installed; the docs corpus was extracted from "
          f"{distribution}=={version} (requirements.lock). Install the lock, or pass "
          "check_versions=False to extract a different corpus.")
  gc_was_enabled = gc.isenabled()
  gc.disable()  # ast trees hold no cycles; collecting them mid-parse triples the parse time
  try:
    documents = _extract(packages)
  finally:
    if gc_was_enabled:
      gc.enable()
  return sorted(documents, key=lambda d: d["id"])


def _extract(packages):
  seen: set[int] = set()
  documents = []
  for _, _, import_name in packages:
    for rel, path in source_files(import_name):
      with open(path, "rb") as f:
        data = f.read()
      kept = []
      source = data.decode("utf-8", errors="replace")
      for _, doc in sorted(docstrings(source) + comments(source)):
        for p in paragraphs(doc):
          if not is_prose(p):
            continue
          grams = _shingles(p)
          if len(grams & seen) >= DUPLICATE_FRACTION * len(grams):
            continue
          seen |= grams
          kept.append(p)
      text = "\n".join(kept)
      if len(text) >= MIN_DOCUMENT_CHARS:
        documents.append({"id": rel, "text": text,
                          "source_sha256": hashlib.sha256(data).hexdigest()})
  return documents
