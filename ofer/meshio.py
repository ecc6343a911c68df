"""Mesh and landmark readers/writers used project-wide (OBJ, PLY, MeshLab `.pp`, NoW landmark files).

The readers are strict on purpose: NoW scores are compared against the official scorer at the 1e-4 mm
level, so a file that the official reader (psbody-mesh) would misread must not silently give another
number here. Every error is a `MeshIOError` whose message names the file and what was expected.

Decisions (ours, documented because psbody-mesh behaves differently):
* OBJ `v` lines must have exactly 3 coordinates. psbody-mesh appends *all* numbers of a `v` line to one
  flat array, so a coloured `v x y z r g b` file is silently scrambled there; we reject it with an error
  instead of producing a score the official scorer would not produce.
* OBJ faces: `a`, `a/b`, `a/b/c`, `a//c` tokens; only the position index is used, so vertices are never
  split by texture coordinates (trimesh may do that, which would change the vertex order). Negative
  (relative) indices follow the OBJ standard. Polygons are fan-triangulated (0,i,i+1) like psbody-mesh.
* PLY (ascii, binary little and big endian) is read by our own parser: vertex order is kept as stored,
  polygons are fan-triangulated.
* Scans may have no faces (`require_faces=False`): the NoW metric uses only scan vertices.
"""
from __future__ import annotations

import io
import os
import re
import secrets
from pathlib import Path

import numpy as np

__all__ = [
    "MeshIOError",
    "load_mesh",
    "save_mesh",
    "read_pp",
    "write_pp",
    "read_landmarks",
    "atomic_write",
    "MESH_SUFFIXES",
]

MESH_SUFFIXES = (".obj", ".ply")


class MeshIOError(ValueError):
    """A mesh or landmark file could not be read or written; the message names the file and the reason."""


# ----------------------------------------------------------------------------------------------------
# public API
# ----------------------------------------------------------------------------------------------------


def load_mesh(path: str | os.PathLike, *, require_faces: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """Read a triangle mesh from `.obj` or `.ply`.

    Args:
        path: file to read; the suffix (case-insensitive) selects the format.
        require_faces: if True (default) a mesh without faces is an error; scans read for the NoW crop
            may pass False (only their vertices are used).

    Returns:
        vertices: float64, shape (V, 3), finite, in file order.
        faces: int64, shape (F, 3), 0-based, every index in [0, V).

    Raises:
        MeshIOError: unknown suffix, missing/empty/binary-garbage file, malformed or truncated lines, non-finite
            coordinates, face indices out of range, no vertices, or no faces when `require_faces`.
    """
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix not in MESH_SUFFIXES:
        raise MeshIOError(f"{path}: unsupported mesh suffix {path.suffix!r}; expected one of {MESH_SUFFIXES}")
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise MeshIOError(f"{path}: cannot read mesh file ({exc})") from exc
    if len(data) == 0:
        raise MeshIOError(f"{path}: empty file; expected a {suffix[1:].upper()} mesh")
    if suffix == ".obj":
        vertices, faces = _parse_obj(data, path)
    else:
        vertices, faces = _parse_ply(data, path)
    _validate_mesh(vertices, faces, path, require_faces=require_faces)
    return vertices, faces


def save_mesh(
    path: str | os.PathLike,
    vertices: np.ndarray,
    faces: np.ndarray,
    *,
    scale: float = 1.0,
) -> Path:
    """Write a triangle mesh as `.obj` (text) or `.ply` (binary little endian, float64 vertices).

    The file is written to a temporary file in the same folder and renamed, so a reader never sees a
    half-written mesh. Coordinates are written with 17 significant digits (OBJ), so `load_mesh` returns the
    same float64 values.

    Args:
        path: destination; the suffix selects the format; parent folders are created.
        vertices: shape (V, 3), finite.
        faces: shape (F, 3), integer, 0-based, in [0, V).
        scale: multiply the vertices by this before writing (e.g. 1000.0 for metres -> millimetres).

    Returns:
        The path written.
    """
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix not in MESH_SUFFIXES:
        raise MeshIOError(f"{path}: unsupported mesh suffix {path.suffix!r}; expected one of {MESH_SUFFIXES}")
    v = np.asarray(vertices, dtype=np.float64) * float(scale)
    f = np.asarray(faces)
    if v.ndim != 2 or v.shape[1] != 3:
        raise MeshIOError(f"{path}: vertices must have shape (V, 3), got {v.shape}")
    if f.size == 0:
        f = f.reshape(0, 3)
    if f.ndim != 2 or f.shape[1] != 3 or not np.issubdtype(f.dtype, np.integer):
        raise MeshIOError(f"{path}: faces must be an integer array of shape (F, 3), got {f.dtype} {f.shape}")
    f = f.astype(np.int64)
    _validate_mesh(v, f, path, require_faces=False)

    if suffix == ".obj":
        parts = ["v %.17g %.17g %.17g\n" % tuple(row) for row in v.tolist()]
        parts += ["f %d %d %d\n" % tuple(row) for row in (f + 1).tolist()]
        payload = "".join(parts).encode("ascii")
    else:
        header = (
            "ply\nformat binary_little_endian 1.0\ncomment written by ofer.meshio\n"
            f"element vertex {len(v)}\nproperty double x\nproperty double y\nproperty double z\n"
            f"element face {len(f)}\nproperty list uchar int vertex_indices\nend_header\n"
        ).encode("ascii")
        face_rec = np.empty(len(f), dtype=np.dtype([("n", "u1"), ("i", "<i4", (3,))]))
        face_rec["n"] = 3
        face_rec["i"] = f
        payload = header + v.astype("<f8").tobytes() + face_rec.tobytes()
    _atomic_write(path, payload)
    return path


def read_pp(path: str | os.PathLike) -> np.ndarray:
    """Read the 7 NoW scan landmarks from a MeshLab PickedPoints `.pp` file, exactly as the official scorer.

    OFER: official `load_pp` of `now_evaluation/compute_error.py`: the lines with 0-based index 8..14 are the
    points; each line is split on single spaces and the tokens `x="..."`, `y="..."`, `z="..."` are read; the
    result is float32. (The official silently reuses the previous line's value when a key is missing; we
    raise instead.)

    Returns:
        float32, shape (7, 3).
    """
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8", errors="strict")
    except (OSError, UnicodeDecodeError) as exc:
        raise MeshIOError(f"{path}: cannot read PickedPoints file ({exc})") from exc
    lines = text.splitlines(keepends=True)
    if len(lines) < 15:
        raise MeshIOError(
            f"{path}: PickedPoints file has {len(lines)} lines; expected the 7 landmark points on lines 9..15 "
            "(0-based 8..14) as in the NoW scans_lmks_onlypp files"
        )
    out = np.zeros((7, 3), dtype=np.float32)
    for j in range(8, 15):
        values: dict[str, float] = {}
        for token in lines[j].split(" "):
            key, sep, rest = token.partition("=")
            if sep and key in ("x", "y", "z"):
                quoted = rest.split('"')
                if len(quoted) < 2:
                    raise MeshIOError(f"{path}: line {j + 1}: cannot parse {token.strip()!r}; expected {key}=\"<number>\"")
                try:
                    values[key] = float(quoted[1])
                except ValueError as exc:
                    raise MeshIOError(f"{path}: line {j + 1}: {key} value {quoted[1]!r} is not a number") from exc
        missing = [k for k in ("x", "y", "z") if k not in values]
        if missing:
            raise MeshIOError(
                f"{path}: line {j + 1} lacks {', '.join(missing)}; expected a <point x=\"..\" y=\"..\" z=\"..\"/> "
                "line (the NoW reader takes the 7 points from lines 9..15)"
            )
        out[j - 8] = np.array([values["x"], values["y"], values["z"]]).astype(np.float32)
    if not np.all(np.isfinite(out)):
        raise MeshIOError(f"{path}: landmarks contain NaN or infinite values")
    return out


def write_pp(path: str | os.PathLike, points: np.ndarray) -> Path:
    """Write 7 landmarks as a MeshLab PickedPoints file whose points sit on 0-based lines 8..14.

    The layout (DOCTYPE, root, DocumentData block, then one `<point .../>` per line) is that of the NoW
    `scans_lmks_onlypp` files, so `read_pp` and the official reader both take the points back. Values are
    written with 9 significant digits, enough to round-trip float32 exactly.
    """
    path = Path(path)
    p = np.asarray(points, dtype=np.float64)
    if p.shape != (7, 3) or not np.all(np.isfinite(p)):
        raise MeshIOError(f"{path}: expected 7 finite landmarks of shape (7, 3), got shape {p.shape}")
    names = ["re_outer", "re_inner", "le_inner", "le_outer", "nose_bottom", "mouth_right", "mouth_left"]
    lines = [
        "<!DOCTYPE PickedPoints>\n",
        "<PickedPoints>\n",
        " <DocumentData>\n",
        '  <DateTime time="00:00:00" date="2000-01-01"/>\n',
        '  <User name="ofer"/>\n',
        '  <DataFileName name="scan.obj"/>\n',
        '  <templateName name=""/>\n',
        " </DocumentData>\n",
    ]
    for name, (x, y, z) in zip(names, p.tolist()):
        lines.append(f' <point x="{x:.9g}" y="{y:.9g}" z="{z:.9g}" active="1" name="{name}"/>\n')
    lines.append("</PickedPoints>\n")
    _atomic_write(path, "".join(lines).encode("ascii"))
    return path


def read_landmarks(path: str | os.PathLike) -> np.ndarray:
    """Read 7 predicted landmarks from `.npy` ((7, 3) or (1, 7, 3)) or `.txt` (one point per line).

    OFER: official `compute_error.py`: an `.npy` whose first dimension is 1 is squeezed; `.txt` is read as
    float32. The `.npy` dtype is kept as stored (float32 or float64) because the official Procrustes runs in
    the landmarks' dtype; integer arrays become float64.

    Returns:
        shape (7, 3), float32 (txt) or the stored float dtype (npy).
    """
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix == ".npy":
        try:
            arr = np.load(path, allow_pickle=False)
        except (OSError, ValueError, EOFError) as exc:
            raise MeshIOError(f"{path}: cannot read landmarks .npy ({exc}); expected a plain (7, 3) array") from exc
        if arr.ndim == 3 and arr.shape[0] == 1:
            arr = arr[0]
        if not (np.issubdtype(arr.dtype, np.floating) or np.issubdtype(arr.dtype, np.integer)):
            raise MeshIOError(f"{path}: landmarks dtype {arr.dtype} is not numeric")
        if not np.issubdtype(arr.dtype, np.floating):
            arr = arr.astype(np.float64)
    elif suffix == ".txt":
        try:
            text = path.read_text(encoding="utf-8", errors="strict")
        except (OSError, UnicodeDecodeError) as exc:
            raise MeshIOError(f"{path}: cannot read landmarks .txt ({exc})") from exc
        # Ours: any whitespace separates and blank lines are skipped (the official splits on single spaces
        # and would crash on these files; valid files read identically).
        rows = [line.split() for line in text.splitlines() if line.strip()]
        if len({len(r) for r in rows}) > 1:
            raise MeshIOError(f"{path}: rows have different numbers of values; expected 7 rows of 3 numbers")
        try:
            arr = np.array(rows, dtype=np.float32)
        except ValueError as exc:
            raise MeshIOError(f"{path}: non-numeric landmark value ({exc}); expected 7 rows of 3 numbers") from exc
    else:
        raise MeshIOError(f"{path}: unsupported landmark suffix {path.suffix!r}; expected .npy or .txt")
    if arr.shape != (7, 3):
        raise MeshIOError(f"{path}: landmarks have shape {arr.shape}; expected (7, 3) (or (1, 7, 3) in .npy)")
    if not np.all(np.isfinite(arr)):
        raise MeshIOError(f"{path}: landmarks contain NaN or infinite values")
    return arr


# ----------------------------------------------------------------------------------------------------
# OBJ
# ----------------------------------------------------------------------------------------------------


def _decode_text(data: bytes, path: Path, what: str) -> str:
    if b"\x00" in data:
        raise MeshIOError(f"{path}: contains NUL bytes; expected a text {what} file")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        # Comments and names may be latin-1; numbers are ASCII either way.
        return data.decode("latin-1")


def _parse_obj(data: bytes, path: Path) -> tuple[np.ndarray, np.ndarray]:
    text = _decode_text(data, path, "OBJ")
    lines = text.splitlines()
    if any(line[:1] in (" ", "\t") for line in lines):
        lines = [line.lstrip() for line in lines]
    # A bare "v"/"f" (a line cut short) is kept so that it is reported rather than skipped.
    v_idx = [i for i, line in enumerate(lines) if line.startswith(("v ", "v\t")) or line == "v"]
    f_idx = [i for i, line in enumerate(lines) if line.startswith(("f ", "f\t")) or line == "f"]
    vertices = _obj_vertices(lines, v_idx, path)
    faces = _obj_faces(lines, f_idx, v_idx, path)
    return vertices, faces


def _obj_vertices(lines: list[str], v_idx: list[int], path: Path) -> np.ndarray:
    if not v_idx:
        return np.zeros((0, 3), dtype=np.float64)
    try:
        # loadtxt raises when the number of values changes between lines.
        arr = np.loadtxt(io.StringIO("\n".join([lines[i][2:] for i in v_idx])), dtype=np.float64, ndmin=2)
        if arr.shape == (len(v_idx), 3):
            return arr
    except ValueError:
        pass  # locate the bad line below
    for i in v_idx:
        t = lines[i].split("#", 1)[0].split()
        if len(t) != 4:
            hint = " (vertex colours are not supported: the official psbody reader misreads them)" if len(t) == 7 else ""
            raise MeshIOError(f"{path}: line {i + 1}: 'v' line has {len(t) - 1} values; expected exactly 3 coordinates{hint}")
        try:
            [float(x) for x in t[1:]]
        except ValueError:
            raise MeshIOError(f"{path}: line {i + 1}: cannot parse vertex {' '.join(t[1:])!r}; expected 3 numbers") from None
    raise MeshIOError(f"{path}: cannot parse the 'v' lines")  # pragma: no cover - every case is caught above


_FACE_TOKEN = re.compile(r"^-?\d+(/-?\d*(/-?\d*)?)?$")


def _obj_faces(lines: list[str], f_idx: list[int], v_idx: list[int], path: Path) -> np.ndarray:
    if not f_idx:
        return np.zeros((0, 3), dtype=np.int64)
    body = "\n".join([lines[i][2:] for i in f_idx])
    if "-" not in body:
        # Fast path: every face has the same number of corners and no relative indices.
        if "/" in body:
            body = re.sub(r"/\S*", "", body)
        try:
            idx = np.loadtxt(io.StringIO(body), dtype=np.int64, ndmin=2)
        except ValueError:
            idx = None
        if idx is not None and idx.shape[0] == len(f_idx) and idx.shape[1] >= 3:
            if (idx <= 0).any():
                row = int(np.flatnonzero((idx <= 0).any(axis=1))[0])
                raise MeshIOError(f"{path}: line {f_idx[row] + 1}: face index 0; OBJ indices start at 1 (or are negative)")
            idx = idx - 1
            k = idx.shape[1]
            # Fan triangulation (0, i, i+1), triangles of one polygon kept together, as psbody-mesh.
            tris = np.stack([np.stack([idx[:, 0], idx[:, i], idx[:, i + 1]], axis=1) for i in range(1, k - 1)], axis=1)
            return tris.reshape(-1, 3)
    # General path: polygons, relative indices, and error reporting.
    v_sorted = np.asarray(v_idx, dtype=np.int64)
    tris: list[list[int]] = []
    for i in f_idx:
        nv = int(np.searchsorted(v_sorted, i))  # vertices defined before this line
        idx_row: list[int] = []
        for tok in lines[i].split("#", 1)[0].split()[1:]:
            if not _FACE_TOKEN.match(tok):
                raise MeshIOError(f"{path}: line {i + 1}: bad face token {tok!r}; expected v, v/vt, v/vt/vn or v//vn")
            k = int(tok.partition("/")[0])
            if k == 0:
                raise MeshIOError(f"{path}: line {i + 1}: face index 0; OBJ indices start at 1 (or are negative)")
            # OBJ: negative indices count back from the last vertex defined so far.
            idx_row.append(k - 1 if k > 0 else nv + k)
        if len(idx_row) < 3:
            raise MeshIOError(f"{path}: line {i + 1}: face has {len(idx_row)} vertices; expected at least 3")
        for j in range(1, len(idx_row) - 1):  # fan triangulation, as psbody-mesh
            tris.append([idx_row[0], idx_row[j], idx_row[j + 1]])
    return np.asarray(tris, dtype=np.int64).reshape(-1, 3)


# ----------------------------------------------------------------------------------------------------
# PLY
# ----------------------------------------------------------------------------------------------------

_PLY_TYPES = {
    "char": "i1", "int8": "i1", "uchar": "u1", "uint8": "u1",
    "short": "i2", "int16": "i2", "ushort": "u2", "uint16": "u2",
    "int": "i4", "int32": "i4", "uint": "u4", "uint32": "u4",
    "float": "f4", "float32": "f4", "double": "f8", "float64": "f8",
}


class _PlyProperty:
    def __init__(self, name: str, dtype: str, count_dtype: str | None = None) -> None:
        self.name = name
        self.dtype = dtype
        self.count_dtype = count_dtype  # not None for list properties

    @property
    def is_list(self) -> bool:
        return self.count_dtype is not None


def _parse_ply(data: bytes, path: Path) -> tuple[np.ndarray, np.ndarray]:
    end = data.find(b"end_header")
    if not data.startswith(b"ply") or end < 0:
        raise MeshIOError(f"{path}: not a PLY file (expected 'ply' magic and an 'end_header' line)")
    nl = data.find(b"\n", end)
    if nl < 0:
        raise MeshIOError(f"{path}: truncated PLY header (no newline after end_header)")
    try:
        header = data[:end].decode("ascii")
    except UnicodeDecodeError as exc:
        raise MeshIOError(f"{path}: PLY header is not ASCII") from exc
    body = data[nl + 1:]

    fmt = None
    elements: list[tuple[str, int, list[_PlyProperty]]] = []
    for line in header.splitlines()[1:]:
        tok = line.split()
        if not tok or tok[0] in ("comment", "obj_info"):
            continue
        if tok[0] == "format":
            if len(tok) < 2 or tok[1] not in ("ascii", "binary_little_endian", "binary_big_endian"):
                raise MeshIOError(f"{path}: unsupported PLY format line {line!r}")
            fmt = tok[1]
        elif tok[0] == "element":
            if len(tok) != 3 or not tok[2].isdigit():
                raise MeshIOError(f"{path}: bad PLY element line {line!r}")
            elements.append((tok[1], int(tok[2]), []))
        elif tok[0] == "property":
            if not elements:
                raise MeshIOError(f"{path}: PLY property before any element: {line!r}")
            if len(tok) == 5 and tok[1] == "list":
                if tok[2] not in _PLY_TYPES or tok[3] not in _PLY_TYPES:
                    raise MeshIOError(f"{path}: unknown PLY list types in {line!r}")
                elements[-1][2].append(_PlyProperty(tok[4], _PLY_TYPES[tok[3]], _PLY_TYPES[tok[2]]))
            elif len(tok) == 3 and tok[1] in _PLY_TYPES:
                elements[-1][2].append(_PlyProperty(tok[2], _PLY_TYPES[tok[1]]))
            else:
                raise MeshIOError(f"{path}: bad PLY property line {line!r}")
        else:
            raise MeshIOError(f"{path}: unknown PLY header line {line!r}")
    if fmt is None:
        raise MeshIOError(f"{path}: PLY header has no format line")

    if fmt == "ascii":
        values = _decode_text(body, path, "PLY").split()
        reader = _AsciiPlyReader(values, path)
    else:
        reader = _BinaryPlyReader(body, "<" if fmt == "binary_little_endian" else ">", path)

    vertices = None
    faces = np.zeros((0, 3), dtype=np.int64)
    for name, count, props in elements:
        table = reader.read_element(name, count, props)
        if name == "vertex":
            cols = {p.name: i for i, p in enumerate(props)}
            if not all(k in cols for k in ("x", "y", "z")):
                raise MeshIOError(f"{path}: PLY vertex element lacks x, y or z properties")
            vertices = np.stack([np.asarray(table[cols[k]], dtype=np.float64) for k in ("x", "y", "z")], axis=1)
        elif name == "face":
            lists = [i for i, p in enumerate(props) if p.is_list and p.name in ("vertex_indices", "vertex_index")]
            if not lists:
                raise MeshIOError(f"{path}: PLY face element lacks a vertex_indices list property")
            faces = _fan_triangulate(table[lists[0]], path)
    reader.finish()
    if vertices is None:
        raise MeshIOError(f"{path}: PLY file has no vertex element")
    return vertices, faces


def _fan_triangulate(polys: list[np.ndarray] | np.ndarray, path: Path) -> np.ndarray:
    if isinstance(polys, np.ndarray):  # fixed-size rows (fast path)
        if polys.shape[1] < 3:
            raise MeshIOError(f"{path}: PLY faces have {polys.shape[1]} vertices; expected at least 3")
        k = polys.shape[1]
        tris = [np.stack([polys[:, 0], polys[:, i], polys[:, i + 1]], axis=1) for i in range(1, k - 1)]
        # Keep polygon order: all triangles of polygon 0 first (like OBJ fan triangulation).
        return np.stack(tris, axis=1).reshape(-1, 3).astype(np.int64)
    out: list[list[int]] = []
    for poly in polys:
        if len(poly) < 3:
            raise MeshIOError(f"{path}: PLY face has {len(poly)} vertices; expected at least 3")
        p = [int(x) for x in poly]
        out.extend([p[0], p[i], p[i + 1]] for i in range(1, len(p) - 1))
    return np.asarray(out, dtype=np.int64).reshape(-1, 3)


class _AsciiPlyReader:
    def __init__(self, values: list[str], path: Path) -> None:
        self.values = values
        self.pos = 0
        self.path = path

    def _take(self, n: int, what: str) -> list[str]:
        if self.pos + n > len(self.values):
            raise MeshIOError(f"{self.path}: truncated ASCII PLY body while reading {what}")
        out = self.values[self.pos:self.pos + n]
        self.pos += n
        return out

    def read_element(self, name: str, count: int, props: list[_PlyProperty]) -> list:
        try:
            if not any(p.is_list for p in props):
                flat = np.array(self._take(count * len(props), f"element {name}"), dtype=np.float64)
                table = flat.reshape(count, len(props))
                return [table[:, i] for i in range(len(props))]
            cols: list[list] = [[] for _ in props]
            for _ in range(count):
                for i, p in enumerate(props):
                    if p.is_list:
                        n = int(self._take(1, f"element {name}")[0])
                        cols[i].append(np.array(self._take(n, f"element {name}"), dtype=np.float64).astype(np.int64))
                    else:
                        cols[i].append(float(self._take(1, f"element {name}")[0]))
            return [c if p.is_list else np.asarray(c) for c, p in zip(cols, props)]
        except ValueError as exc:
            raise MeshIOError(f"{self.path}: non-numeric value in ASCII PLY element {name} ({exc})") from exc

    def finish(self) -> None:
        pass


class _BinaryPlyReader:
    def __init__(self, body: bytes, endian: str, path: Path) -> None:
        self.body = body
        self.endian = endian
        self.pos = 0
        self.path = path

    def _dt(self, code: str) -> np.dtype:
        return np.dtype(self.endian + code)

    def read_element(self, name: str, count: int, props: list[_PlyProperty]) -> list:
        lists = [p for p in props if p.is_list]
        if not lists:
            dt = np.dtype([(f"p{i}", self._dt(p.dtype)) for i, p in enumerate(props)])
            rec = self._frombuffer(dt, count, name)
            return [rec[f"p{i}"] for i in range(len(props))]
        if len(props) == 1:
            # Fast path: one list property whose rows all have the same length (triangle meshes).
            p = props[0]
            cdt, idt = self._dt(p.count_dtype), self._dt(p.dtype)
            if count == 0:
                return [np.zeros((0, 3), dtype=np.int64)]
            if self.pos + cdt.itemsize > len(self.body):
                raise MeshIOError(f"{self.path}: truncated binary PLY body in element {name}")
            n0 = int(np.frombuffer(self.body, cdt, 1, self.pos)[0])
            dt = np.dtype([("n", cdt), ("i", idt, (n0,))])
            if self.pos + dt.itemsize * count <= len(self.body):
                rec = np.frombuffer(self.body, dt, count, self.pos)
                if np.all(rec["n"] == n0):
                    self.pos += dt.itemsize * count
                    return [rec["i"].astype(np.int64)]
        # General path: walk row by row.
        cols: list[list] = [[] for _ in props]
        for _ in range(count):
            for i, p in enumerate(props):
                if p.is_list:
                    n = int(self._frombuffer(self._dt(p.count_dtype), 1, name)[0])
                    cols[i].append(self._frombuffer(self._dt(p.dtype), n, name).astype(np.int64))
                else:
                    cols[i].append(self._frombuffer(self._dt(p.dtype), 1, name)[0])
        return [c if p.is_list else np.asarray(c) for c, p in zip(cols, props)]

    def _frombuffer(self, dt: np.dtype, count: int, name: str) -> np.ndarray:
        nbytes = dt.itemsize * count
        if self.pos + nbytes > len(self.body):
            raise MeshIOError(
                f"{self.path}: truncated binary PLY body in element {name} "
                f"(needs {nbytes} bytes at offset {self.pos}, file body has {len(self.body)})"
            )
        out = np.frombuffer(self.body, dt, count, self.pos)
        self.pos += nbytes
        return out

    def finish(self) -> None:
        pass


# ----------------------------------------------------------------------------------------------------
# shared helpers
# ----------------------------------------------------------------------------------------------------


def _validate_mesh(vertices: np.ndarray, faces: np.ndarray, path: Path, *, require_faces: bool) -> None:
    if vertices.shape[0] == 0:
        raise MeshIOError(f"{path}: mesh has no vertices")
    finite = np.isfinite(vertices).all(axis=1)
    if not finite.all():
        first = int(np.flatnonzero(~finite)[0])
        raise MeshIOError(
            f"{path}: {int((~finite).sum())} vertices have NaN/infinite coordinates (first: vertex {first})"
        )
    if require_faces and faces.shape[0] == 0:
        raise MeshIOError(f"{path}: mesh has no faces; expected a triangle mesh")
    if faces.size:
        lo, hi = int(faces.min()), int(faces.max())
        if lo < 0 or hi >= vertices.shape[0]:
            raise MeshIOError(
                f"{path}: face indices out of range [{lo}, {hi}] for {vertices.shape[0]} vertices "
                "(expected 0-based indices in [0, V))"
            )


def atomic_write(path: str | os.PathLike, payload: bytes) -> Path:
    """Write bytes to `path` through a temporary file in the same folder and a rename (readers never see a
    partial file); parent folders are created."""
    path = Path(path)
    _atomic_write(path, payload)
    return path


def _atomic_write(path: Path, payload: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    # A unique name opened with "x" rather than mkstemp: the file gets the umask's permissions, not 0600.
    tmp = path.parent / f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp"
    try:
        with open(tmp, "xb") as fh:
            fh.write(payload)
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
