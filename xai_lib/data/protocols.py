"""Protocol (trial list) readers for the anti-spoofing databases (docs/architecture.md, "Data").

Every reader returns a list of :class:`Utterance` (id, audio path, label, attack, speaker).
Supported formats (``format=`` of :func:`read_protocol`, or ``"auto"`` to detect from the
content):

``asvspoof2019``
    ASVspoof 2019 LA, 5 columns ``SPEAKER UTT - ATTACK KEY``:
    ``LA_0079 LA_T_1138215 - - bonafide`` / ``LA_0079 LA_T_1000137 - A04 spoof``.
``partialspoof``
    PartialSpoof, the same 5 columns (``LA_0079 CON_T_0000029 - CON spoof``); segment labels
    come separately (:func:`load_segment_labels`).
``3col``
    The original project's 3 columns ``FILE SUBSET KEY``: ``LA_T_1138215.flac train bonafide``.
``asvspoof2021``
    ASVspoof 2021 LA/DF eval: a trial list (one utterance id per line), labelled from a keys
    file ``trial_metadata.txt`` when one is found (lines such as
    ``LA_0009 LA_E_9332881 alaw ita_tx A07 spoof notrim eval``; the label is the first
    ``bonafide``/``spoof`` token, the attack the token before it). The keys file itself may
    also be given as the protocol.
``in_the_wild``
    In-the-Wild ``meta.csv`` with a header ``file,speaker,label`` or ``file,label`` and labels
    ``bona-fide``/``spoof``.

Labels: 1 = bona fide, 0 = spoof, ``None`` = unknown (an unlabelled trial list).

Audio paths are resolved once per protocol: the first candidate folder that holds the
listed files wins (checked on a sample of utterances). Candidates, in order: ``audio_dir``
when given (then only it; the config's ``data.<split>_audio_dir``); else for each base in
(``root``, the protocol's folder and its two parents): ``BASE/ASVspoof2019_LA_{subset}/flac``,
``BASE/ASVspoof2021_{LA,DF}_eval/flac``, ``BASE/{subset}/{flac,con_wav,wav}``, ``BASE/flac``,
``BASE/wav``, ``BASE``. Extensions tried: ``.flac``, ``.wav``, ``.ogg``. The subset
(train/dev/eval) comes from the 3-column file, the protocol's file name or the utterance id
(``LA_T_`` / ``_D_`` / ``_E_``).

Errors a user can cause raise :class:`ProtocolError` (file, line number and the line) or
:class:`MissingAudioError` (how many files are missing and the first paths).
"""
from __future__ import annotations

import csv
import io
import json
import logging
import pickle
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np

__all__ = [
    "Utterance",
    "ProtocolError",
    "MissingAudioError",
    "UnsafePickleError",
    "PROTOCOL_FORMATS",
    "AUDIO_EXTENSIONS",
    "read_protocol",
    "detect_format",
    "check_files_exist",
    "load_segment_labels",
    "spoof_frame_mask",
]

log = logging.getLogger(__name__)

PROTOCOL_FORMATS = ("asvspoof2019", "3col", "asvspoof2021", "in_the_wild", "partialspoof")
AUDIO_EXTENSIONS = (".flac", ".wav", ".ogg")
_KEY_LABELS = {"bonafide": 1, "bona-fide": 1, "spoof": 0}
_SUBSET_CODES = {"T": "train", "D": "dev", "E": "eval"}


@dataclass
class Utterance:
    """One trial of a protocol.

    Attributes:
        utt_id: the utterance id (file stem), e.g. ``LA_T_1138215``.
        path: the audio file.
        label: 1 = bona fide, 0 = spoof, ``None`` = unknown.
        attack: the attack/system id (``A01`` ...), ``"-"`` for bona fide or unknown.
        speaker: the speaker id when the protocol has one.
    """

    utt_id: str
    path: Path
    label: int | None
    attack: str = "-"
    speaker: str | None = None


class ProtocolError(ValueError):
    """A protocol or segment-label file is malformed (the message names the file and line)."""


class MissingAudioError(FileNotFoundError):
    """Audio files listed in a protocol do not exist (the message gives the count and paths)."""


class UnsafePickleError(ProtocolError):
    """A pickled segment-label file references something other than plain NumPy arrays."""


# ----------------------------------------------------------------------------- helpers


@dataclass
class _Entry:
    """A parsed protocol line before its audio path is resolved."""

    utt_id: str
    label: int | None
    attack: str
    speaker: str | None
    lineno: int
    file_name: str | None = None  # a file name given by the protocol (3col, In-the-Wild)
    subset: str | None = None


def _lines(path: Path) -> list[tuple[int, str]]:
    """Non-empty, non-comment lines with their 1-based line numbers."""
    try:
        text = path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as exc:
        raise ProtocolError(f"{path}: not a text protocol file ({exc})") from None
    out = []
    for n, line in enumerate(text.splitlines(), 1):
        s = line.strip()
        if s and not s.startswith("#"):
            out.append((n, s))
    return out


def _fail(path: Path, lineno: int, line: str, what: str) -> ProtocolError:
    return ProtocolError(f"{path}:{lineno}: {what}; the line is: {line!r}")


def _label(token: str, path: Path, lineno: int, line: str, valid: str = "'bonafide' or 'spoof'") -> int:
    try:
        return _KEY_LABELS[token.lower()]
    except KeyError:
        raise _fail(path, lineno, line, f"unknown label {token!r} (expected {valid})") from None


def _subset_of_utt(utt_id: str) -> str | None:
    m = re.match(r"^[A-Za-z]+_([TDE])_", utt_id)
    return _SUBSET_CODES[m.group(1)] if m else None


def _subset_of_file(path: Path) -> str | None:
    name = path.name.lower()
    for key, subset in (("train", "train"), (".trn", "train"), ("dev", "dev"), ("eval", "eval")):
        if key in name:
            return subset
    return None


def detect_format(protocol: str | Path) -> str:
    """Guess the protocol format from the first non-comment line of ``protocol``.

    Returns one of :data:`PROTOCOL_FORMATS`. Raises :class:`ProtocolError` when the
    file is empty or matches no known layout.
    """
    path = Path(protocol)
    lines = _lines(path)
    if not lines:
        raise ProtocolError(f"{path}: the protocol is empty (no utterance lines)")
    lineno, first = lines[0]
    if "," in first:
        header = _csv_header(first)
        if "file" in header and "label" in header:
            return "in_the_wild"
    tokens = first.split()
    if len(tokens) == 1:
        return "asvspoof2021"
    if len(tokens) == 3 and tokens[0].lower().endswith(AUDIO_EXTENSIONS):
        return "3col"
    if len(tokens) == 5 and tokens[4].lower() in _KEY_LABELS:
        return "partialspoof" if tokens[1].upper().startswith("CON_") else "asvspoof2019"
    if len(tokens) >= 6 and any(t.lower() in ("bonafide", "spoof") for t in tokens[2:]):
        return "asvspoof2021"
    raise ProtocolError(
        f"{path}:{lineno}: cannot tell the protocol format from this line: {first!r}. Expected one of: "
        "'SPEAKER UTT - ATTACK bonafide|spoof' (ASVspoof 2019 / PartialSpoof), 'FILE.flac SUBSET bonafide|spoof' "
        "(3col), one utterance id per line (ASVspoof 2021 trial list), a trial_metadata.txt line, or a CSV "
        "header 'file,speaker,label' (In-the-Wild). Name the format with data.format to get a precise error."
    )


# ----------------------------------------------------------------------------- parsers


def _parse_5col(path: Path) -> list[_Entry]:
    out = []
    for n, line in _lines(path):
        tok = line.split()
        if len(tok) != 5:
            raise _fail(path, n, line, f"expected 5 columns 'SPEAKER UTT - ATTACK KEY', found {len(tok)}")
        label = _label(tok[4], path, n, line)
        attack = "-" if label == 1 else tok[3]
        out.append(_Entry(tok[1], label, attack, tok[0], n, subset=_subset_of_utt(tok[1])))
    return out


def _parse_3col(path: Path) -> list[_Entry]:
    out = []
    for n, line in _lines(path):
        tok = line.split()
        if len(tok) != 3:
            raise _fail(path, n, line, f"expected 3 columns 'FILE SUBSET KEY', found {len(tok)}")
        label = _label(tok[2], path, n, line)
        file_name = tok[0]
        out.append(_Entry(Path(file_name).stem, label, "-", None, n, file_name=file_name, subset=tok[1].lower()))
    return out


def _parse_2021_keys(path: Path) -> list[_Entry]:
    """A ``trial_metadata.txt``: speaker, utt, ..., [attack] bonafide|spoof, ..."""
    out = []
    for n, line in _lines(path):
        tok = line.split()
        k = next((i for i in range(2, len(tok)) if tok[i].lower() in ("bonafide", "spoof")), None)
        if len(tok) < 3 or k is None:
            raise _fail(path, n, line, "expected 'SPEAKER UTT ... bonafide|spoof ...' (ASVspoof 2021 keys)")
        label = _KEY_LABELS[tok[k].lower()]
        attack = tok[k - 1] if (label == 0 and k >= 3 and tok[k - 1] != "-") else "-"
        out.append(_Entry(tok[1], label, attack, tok[0], n, subset="eval"))
    return out


def _find_keys(path: Path, root: Path | None, keys: str | Path | None) -> Path | None:
    if keys is not None:
        kp = Path(keys)
        if not kp.is_file():
            raise ProtocolError(f"keys file not found: {kp} (pass the ASVspoof 2021 trial_metadata.txt)")
        return kp
    bases = [path.parent] + ([root] if root is not None else [])
    candidates = []
    for base in bases:
        candidates.append(base / "trial_metadata.txt")
        for track in ("LA", "DF"):
            candidates.append(base / "keys" / track / "CM" / "trial_metadata.txt")
    for cand in candidates:
        if cand.is_file() and cand.resolve() != path.resolve():
            return cand
    return None


def _parse_2021(path: Path, root: Path | None, keys: str | Path | None) -> list[_Entry]:
    lines = _lines(path)
    if lines and len(lines[0][1].split()) > 1:  # the protocol is the keys file itself
        return _parse_2021_keys(path)
    out = []
    for n, line in lines:
        tok = line.split()
        if len(tok) != 1:
            raise _fail(path, n, line, f"expected one utterance id per line (ASVspoof 2021 trial list), found {len(tok)} columns")
        out.append(_Entry(Path(tok[0]).stem, None, "-", None, n, subset="eval"))
    key_path = _find_keys(path, root, keys)
    if key_path is None:
        log.info("%s: no trial_metadata.txt keys found; utterances are unlabelled", path)
        return out
    by_id = {e.utt_id: e for e in _parse_2021_keys(key_path)}
    missing = 0
    for e in out:
        k = by_id.get(e.utt_id)
        if k is None:
            missing += 1
            continue
        e.label, e.attack, e.speaker = k.label, k.attack, k.speaker
    if missing:
        log.warning("%s: %d of %d trials have no entry in %s and stay unlabelled", path, missing, len(out), key_path)
    return out


def _parse_in_the_wild(path: Path) -> list[_Entry]:
    lines = _lines(path)
    header_no, header_line = lines[0]
    header = _csv_header(header_line)
    if "file" not in header or "label" not in header:
        raise _fail(path, header_no, header_line, "expected a CSV header with columns 'file' and 'label' (In-the-Wild meta.csv)")
    i_file, i_label = header.index("file"), header.index("label")
    i_spk = header.index("speaker") if "speaker" in header else None
    out = []
    for n, line in lines[1:]:
        row = next(csv.reader(io.StringIO(line)))
        if len(row) != len(header):
            raise _fail(path, n, line, f"expected {len(header)} comma-separated fields ({','.join(header)}), found {len(row)}")
        label = _label(row[i_label].strip(), path, n, line, "'bona-fide' or 'spoof'")
        file_name = row[i_file].strip()
        speaker = row[i_spk].strip() if i_spk is not None else None
        out.append(_Entry(Path(file_name).stem, label, "-", speaker, n, file_name=file_name))
    return out


def _csv_header(line: str) -> list[str]:
    return [h.strip().lower() for h in next(csv.reader(io.StringIO(line)))]


def _check_duplicates(path: Path, entries: Sequence[_Entry]) -> None:
    seen: dict[str, int] = {}
    for e in entries:
        if e.utt_id in seen:
            raise ProtocolError(
                f"{path}: utterance id {e.utt_id!r} appears twice, on lines {seen[e.utt_id]} and {e.lineno}; "
                "remove the duplicate line"
            )
        seen[e.utt_id] = e.lineno


# ----------------------------------------------------------------------------- audio paths


def _candidate_dirs(protocol: Path, root: Path | None, subset: str | None) -> list[Path]:
    bases: list[Path] = []
    for b in (root, protocol.parent, protocol.parent.parent, protocol.parent.parent.parent):
        if b is not None and b not in bases:
            bases.append(b)
    subsets = [subset] if subset else ["train", "dev", "eval"]
    dirs: list[Path] = []
    for base in bases:
        for s in subsets:
            dirs.append(base / f"ASVspoof2019_LA_{s}" / "flac")
        for track in ("LA", "DF"):
            dirs.append(base / f"ASVspoof2021_{track}_eval" / "flac")
        for s in subsets:
            for sub in ("flac", "con_wav", "wav"):
                dirs.append(base / s / sub)
            dirs.append(base / s)
        dirs += [base / "flac", base / "wav", base]
    unique: list[Path] = []
    for d in dirs:
        if d not in unique:
            unique.append(d)
    return unique


def _resolve_paths(
    protocol: Path, entries: Sequence[_Entry], root: Path | None, audio_dir: Path | None
) -> list[Path]:
    """Pick, per subset, the candidate folder (and extension) that holds the sample files."""
    out: list[Path | None] = [None] * len(entries)
    groups: dict[str | None, list[int]] = {}
    for i, e in enumerate(entries):
        subset = e.subset or _subset_of_utt(e.utt_id) or _subset_of_file(protocol)
        groups.setdefault(subset, []).append(i)
    for subset, idx in groups.items():
        dirs = [audio_dir] if audio_dir is not None else _candidate_dirs(protocol, root, subset)
        sample = [entries[i] for i in idx[:: max(1, len(idx) // 16)][:16]]

        def names(e: _Entry) -> list[str]:
            return [e.file_name] if e.file_name else [e.utt_id + ext for ext in AUDIO_EXTENSIONS]

        best, best_hits = None, 0
        for d in dirs:
            hits = sum(any((d / nm).is_file() for nm in names(e)) for e in sample)
            if hits > best_hits:
                best, best_hits = d, hits
            if hits == len(sample):
                break
        if best is None:  # nothing found: point at the first candidate so the error lists it
            best = dirs[0]
        exts = [ext for ext in AUDIO_EXTENSIONS if any((best / (e.utt_id + ext)).is_file() for e in sample)]
        for i in idx:
            e = entries[i]
            if e.file_name:
                out[i] = best / e.file_name
                continue
            chosen = best / (e.utt_id + (exts[0] if exts else ".flac"))
            if len(exts) > 1 and not chosen.is_file():
                chosen = next((best / (e.utt_id + x) for x in exts if (best / (e.utt_id + x)).is_file()), chosen)
            out[i] = chosen
    return [p for p in out if p is not None]


# ----------------------------------------------------------------------------- public API


def read_protocol(
    protocol: str | Path,
    root: str | Path | None = None,
    format: str = "auto",
    audio_dir: str | Path | None = None,
    keys: str | Path | None = None,
) -> list[Utterance]:
    """Read a protocol into utterances with resolved audio paths.

    Args:
        protocol: the protocol / trial list / ``meta.csv`` file.
        root: the database root (searched for audio folders; see the module docstring).
        format: ``"auto"`` or one of :data:`PROTOCOL_FORMATS`.
        audio_dir: the folder holding the audio; when given, only it is searched.
        keys: ASVspoof 2021 only: the ``trial_metadata.txt`` that labels a trial list
            (default: searched next to the protocol and under ``root/keys/{LA,DF}/CM``).

    Returns:
        The utterances in protocol order. Files are not checked here; call
        :func:`check_files_exist` before training.

    Raises:
        ProtocolError: missing/empty file, malformed line, unknown label, duplicate id.
    """
    path = Path(protocol)
    if not path.is_file():
        raise ProtocolError(f"protocol file not found: {path} (check data.root and the *_protocol paths)")
    fmt = detect_format(path) if format == "auto" else format
    if fmt in ("asvspoof2019", "partialspoof"):
        entries = _parse_5col(path)
    elif fmt == "3col":
        entries = _parse_3col(path)
    elif fmt == "asvspoof2021":
        entries = _parse_2021(path, Path(root) if root is not None else None, keys)
    elif fmt == "in_the_wild":
        entries = _parse_in_the_wild(path)
    else:
        raise ProtocolError(f"unknown protocol format {format!r}; use 'auto' or one of {PROTOCOL_FORMATS}")
    if not entries:
        raise ProtocolError(f"{path}: the protocol lists no utterances")
    _check_duplicates(path, entries)
    paths = _resolve_paths(
        path, entries, Path(root) if root is not None else None, Path(audio_dir) if audio_dir is not None else None
    )
    utts = [Utterance(e.utt_id, p, e.label, e.attack, e.speaker) for e, p in zip(entries, paths)]
    log.info("%s: %d utterances (%s format)", path, len(utts), fmt)
    return utts


def check_files_exist(utts: Iterable[Utterance], protocol_name: str | Path = "protocol") -> None:
    """Raise :class:`MissingAudioError` when any utterance's audio file is missing.

    The message gives the number of missing files, the first five paths and what to check.
    """
    utts = list(utts)
    missing = [u.path for u in utts if not Path(u.path).is_file()]
    if missing:
        first = "\n  ".join(str(p) for p in missing[:5])
        raise MissingAudioError(
            f"{len(missing)} of {len(utts)} audio files listed in {protocol_name} do not exist; first ones:\n  {first}\n"
            "Check data.root (the database root) and that the audio folders are unpacked there "
            "(e.g. ROOT/ASVspoof2019_LA_train/flac/), or name the split's audio folder "
            "(data.train_audio_dir, data.partial_eval_audio_dir, ...; read_protocol's audio_dir)."
        )


# ----------------------------------------------------------------------------- segment labels


def _numpy_globals() -> dict[tuple[str, str], Any]:
    try:
        from numpy._core import multiarray as ma  # NumPy >= 2
    except ImportError:  # pragma: no cover - NumPy 1.x
        from numpy.core import multiarray as ma  # type: ignore[no-redef]
    allowed: dict[tuple[str, str], Any] = {}
    for mod in ("numpy.core.multiarray", "numpy._core.multiarray"):
        allowed[(mod, "_reconstruct")] = ma._reconstruct
        allowed[(mod, "scalar")] = ma.scalar
    allowed[("numpy", "ndarray")] = np.ndarray
    allowed[("numpy", "dtype")] = np.dtype
    # Python-2-era pickles (protocol 2) store bytes through codecs.encode(str, 'latin1').
    import codecs

    allowed[("_codecs", "encode")] = codecs.encode
    return allowed


class _NumpyOnlyUnpickler(pickle.Unpickler):
    """Unpickles dicts/lists/strings and NumPy arrays, nothing else (no code execution)."""

    def __init__(self, file: Any, source: Path) -> None:
        super().__init__(file, encoding="latin1")
        self._allowed = _numpy_globals()
        self._source = source

    def find_class(self, module: str, name: str) -> Any:
        obj = self._allowed.get((module, name))
        if obj is None:
            raise UnsafePickleError(
                f"{self._source}: refusing to unpickle {module}.{name}: a segment-label file may only hold "
                "a dict of NumPy string arrays. The file is corrupt or was crafted to run code; "
                "regenerate it or convert it to JSON {utt: [0/1, ...]}."
            )
        return obj


def _seglab_values(values: Any, source: Path, utt: str) -> np.ndarray:
    arr = np.asarray(values)
    if arr.ndim != 1 or arr.size == 0:
        raise ProtocolError(f"{source}: segment labels of {utt!r} must be a non-empty 1-D array, got shape {arr.shape}")
    text = arr.astype(str)
    bad = ~np.isin(text, ("0", "1"))
    if bad.any():
        raise ProtocolError(f"{source}: segment labels of {utt!r} must be '0'/'1', found {text[bad][0]!r}")
    return (text == "1").astype(np.int8)


def load_segment_labels(path: str | Path) -> dict[str, np.ndarray]:
    """Read PartialSpoof segment labels without executing pickled code.

    Accepts the PartialSpoof ``*_seglab_<res>.npy`` (``np.save`` of a dict utt → array of
    ``'0'``/``'1'`` strings, loaded with a restricted unpickler that only admits NumPy
    array reconstruction), a raw pickle of the same dict, or ``.json`` ``{utt: [0/1, ...]}``.

    Returns:
        utt → int8 array (one value per segment), in the PartialSpoof convention
        **1 = bona fide, 0 = spoof**.

    Raises:
        ProtocolError: missing/malformed file; UnsafePickleError: a pickle referencing
        anything but NumPy arrays (nothing from it is executed).
    """
    path = Path(path)
    if not path.is_file():
        raise ProtocolError(f"segment-label file not found: {path} (check data.partial_*_segment_labels)")
    if path.suffix.lower() == ".json":
        try:
            data = json.loads(path.read_text())
        except json.JSONDecodeError as exc:
            raise ProtocolError(f"{path}: not valid JSON ({exc})") from None
    else:
        with path.open("rb") as fh:
            magic = fh.read(6)
            fh.seek(0)
            if magic == b"\x93NUMPY":
                version = np.lib.format.read_magic(fh)
                if version == (1, 0):
                    shape, _, dtype = np.lib.format.read_array_header_1_0(fh)
                else:
                    shape, _, dtype = np.lib.format.read_array_header_2_0(fh)
                if dtype != np.dtype(object) or shape != ():
                    raise ProtocolError(
                        f"{path}: expected an np.save'd dict (0-d object array), got a {dtype} array of shape {shape}"
                    )
            try:
                data = _NumpyOnlyUnpickler(fh, path).load()
            except UnsafePickleError:
                raise
            except Exception as exc:  # truncated/corrupt pickle
                raise ProtocolError(f"{path}: cannot read segment labels ({type(exc).__name__}: {exc})") from None
        if isinstance(data, np.ndarray) and data.dtype == object and data.shape == ():
            data = data.item()
    if not isinstance(data, dict):
        raise ProtocolError(f"{path}: expected a dict utterance -> segment labels, got {type(data).__name__}")
    return {str(k): _seglab_values(v, path, str(k)) for k, v in data.items()}


def spoof_frame_mask(
    seglab: np.ndarray, n_frames: int, resolution_s: float = 0.02, frame_hop_s: float = 0.02
) -> np.ndarray:
    """Per-frame spoof mask from segment labels.

    A frame ``[i * frame_hop_s, (i + 1) * frame_hop_s)`` is spoof when it overlaps any spoof
    segment ``[k * resolution_s, (k + 1) * resolution_s)``; frames past the labelled length take
    the last segment's value (truncate/pad with the last value).

    Args:
        seglab: (S,) segment labels, PartialSpoof convention (``'0'``/0 = spoof, ``'1'``/1 = bona fide).
        n_frames: number of frames wanted.
        resolution_s: segment length of ``seglab`` in seconds (PartialSpoof: 0.01 .. 0.64).
        frame_hop_s: frame hop in seconds (20 ms for the SSL front end).

    Returns:
        (n_frames,) bool, True = spoof.
    """
    arr = np.asarray(seglab)
    if arr.ndim != 1 or arr.size == 0:
        raise ValueError(f"seglab must be a non-empty 1-D array, got shape {arr.shape}")
    if arr.dtype.kind in "USO":
        spoof = arr.astype(str) == "0"
    else:
        spoof = arr.astype(np.int64) == 0
    if n_frames <= 0:
        return np.zeros(0, dtype=bool)
    eps = 1e-6
    i = np.arange(n_frames)
    first = np.floor(i * frame_hop_s / resolution_s + eps).astype(np.int64)
    last = np.ceil((i + 1) * frame_hop_s / resolution_s - eps).astype(np.int64) - 1
    last = np.maximum(last, first)
    n = spoof.size
    first_c, last_c = np.minimum(first, n - 1), np.minimum(last, n - 1)
    csum = np.concatenate([[0], np.cumsum(spoof)])
    return (csum[last_c + 1] - csum[first_c]) > 0
