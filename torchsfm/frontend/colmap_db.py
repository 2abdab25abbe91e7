"""The front end's writes to a COLMAP database.db: cameras, rigs, frames, images, features.

One writer and explicit transactions: each unit of work (registering the new images with their
cameras, rigs and frames; the keypoints and descriptors of one image) is one SQLite transaction,
so a run that is killed or interrupted leaves all of a unit or none of it. The schema is created
by pycolmap, i.e. by the COLMAP version that reads the file later. Raw SQL (rather than
pycolmap.Database) is used for writing because COLMAP's DatabaseTransaction commits when an
exception unwinds it, while sqlite3 lets us roll back.
"""
from __future__ import annotations

import contextlib
import logging
import sqlite3
from pathlib import Path

import numpy as np

MAX_IMAGE_ID = 2147483647  # COLMAP's kMaxNumImages: pair_id = id1 * MAX_IMAGE_ID + id2 (id1 < id2)
SENSOR_CAMERA = 0  # SensorType.CAMERA
DESCRIPTOR_SIFT = 0  # FeatureExtractorType.SIFT


class DatabaseError(RuntimeError):
    """The database file is unusable (corrupt, or not a COLMAP database)."""


def pair_ids(id1: np.ndarray, id2: np.ndarray) -> np.ndarray:
    """COLMAP pair ids of image-id pairs, in either order."""
    a, b = np.minimum(id1, id2).astype(np.int64), np.maximum(id1, id2).astype(np.int64)
    return a * MAX_IMAGE_ID + b


def pair_ids_to_images(pair_id: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    pair_id = np.asarray(pair_id, dtype=np.int64)
    return pair_id // MAX_IMAGE_ID, pair_id % MAX_IMAGE_ID


def check_database(path: Path, required: frozenset[str] = frozenset({"cameras", "images", "keypoints", "descriptors"}),
                   allow_empty_schema: bool = True, integrity: bool = True) -> None:
    """Fail early and clearly on a corrupt file or on a SQLite file that is not COLMAP's (instead of
    pycolmap's "No registered database factory succeeded", or pycolmap silently adding an empty
    schema to it). `required`: tables it must have; a schema-less file passes when
    `allow_empty_schema` (the front end then creates the schema). `integrity`: SQLite's quick_check
    of every page, for a database about to be written to; it reads the whole file (7 s for
    corridor3000's 300 MB), so a reader that only reads leaves it off and reports damage where
    SQLite finds it (`corrupt_database_error`)."""
    try:
        with contextlib.closing(sqlite3.connect(f"file:{path}?mode=ro", uri=True)) as c:
            ok = c.execute("PRAGMA quick_check").fetchone()[0] if integrity else "ok"
            tables = {r[0] for r in c.execute("SELECT name FROM sqlite_master WHERE type='table'")}
    except sqlite3.DatabaseError as e:
        raise DatabaseError(f"{path} is not a readable SQLite database ({e}); move it away or pick another --database") from e
    if ok != "ok":
        raise DatabaseError(f"{path} is corrupt (SQLite quick_check: {ok}); move it away and rerun to rebuild it")
    missing = set(required) - tables
    if missing and (tables or not allow_empty_schema):
        raise DatabaseError(f"{path} is not a COLMAP database (no tables {', '.join(sorted(missing))})")


def corrupt_database_error(path: Path, error: sqlite3.DatabaseError) -> DatabaseError:
    """The clear error for damage SQLite finds while a table is read."""
    return DatabaseError(f"{path} is corrupt (SQLite: {error}); move it away and rerun the front end to rebuild it")


def create_schema(path: Path) -> None:
    import pycolmap

    path.parent.mkdir(parents=True, exist_ok=True)
    db = pycolmap.Database.open(str(path))
    db.close()


class FrontendDatabase:
    """A sqlite3 connection in autocommit mode; `transaction()` groups writes."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        if self.path.exists():
            check_database(self.path)
        create_schema(self.path)  # no-op on a complete COLMAP database, adds missing tables otherwise
        self.conn = sqlite3.connect(str(self.path), isolation_level=None, timeout=60.0)

    def close(self) -> None:
        self.conn.close()

    def __enter__(self) -> "FrontendDatabase":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    @contextlib.contextmanager
    def transaction(self):
        self.conn.execute("BEGIN IMMEDIATE")
        try:
            yield self.conn
        except BaseException:
            self.conn.execute("ROLLBACK")
            raise
        self.conn.execute("COMMIT")

    # ---- reading ----
    def images(self) -> dict[str, tuple[int, int]]:
        """name -> (image_id, camera_id)."""
        return {n: (i, c) for i, n, c in self.conn.execute("SELECT image_id, name, camera_id FROM images")}

    def camera_sizes(self) -> dict[int, tuple[int, int]]:
        return {c: (w, h) for c, w, h in self.conn.execute("SELECT camera_id, width, height FROM cameras")}

    def feature_state(self) -> tuple[set[int], set[int]]:
        """(image ids with keypoints and descriptors, image ids with only one of them)."""
        kp = {r[0] for r in self.conn.execute("SELECT image_id FROM keypoints")}
        de = {r[0] for r in self.conn.execute("SELECT image_id FROM descriptors")}
        return kp & de, kp ^ de

    def num_keypoints(self) -> int:
        return int(self.conn.execute("SELECT COALESCE(SUM(rows), 0) FROM keypoints").fetchone()[0])

    # ---- writing (call inside transaction()) ----
    def add_camera(self, model_id: int, width: int, height: int, params: np.ndarray, prior_focal: bool) -> int:
        blob = np.ascontiguousarray(params, dtype=np.float64).tobytes()
        cur = self.conn.execute(
            "INSERT INTO cameras(model, width, height, params, prior_focal_length) VALUES (?, ?, ?, ?, ?)",
            (int(model_id), int(width), int(height), blob, int(bool(prior_focal))),
        )
        return int(cur.lastrowid)

    def rig_of_camera(self, camera_id: int) -> int:
        """COLMAP 4 gives every camera a trivial rig (the camera as reference sensor)."""
        row = self.conn.execute(
            "SELECT rig_id FROM rigs WHERE ref_sensor_id = ? AND ref_sensor_type = ?", (camera_id, SENSOR_CAMERA)
        ).fetchone()
        if row:
            return int(row[0])
        cur = self.conn.execute("INSERT INTO rigs(ref_sensor_id, ref_sensor_type) VALUES (?, ?)", (camera_id, SENSOR_CAMERA))
        return int(cur.lastrowid)

    def add_image(self, name: str, camera_id: int) -> int:
        """The image row plus its one-image frame, as COLMAP's importer writes them."""
        image_id = int(self.conn.execute("INSERT INTO images(name, camera_id) VALUES (?, ?)", (name, camera_id)).lastrowid)
        rig_id = self.rig_of_camera(camera_id)
        frame_id = int(self.conn.execute("INSERT INTO frames(rig_id) VALUES (?)", (rig_id,)).lastrowid)
        self.conn.execute(
            "INSERT INTO frame_data(frame_id, data_id, sensor_id, sensor_type) VALUES (?, ?, ?, ?)",
            (frame_id, image_id, camera_id, SENSOR_CAMERA),
        )
        return image_id

    def remove_image(self, image_id: int) -> None:
        rows = self.conn.execute(
            "SELECT frame_id FROM frame_data WHERE data_id = ? AND sensor_type = ?", (image_id, SENSOR_CAMERA)
        ).fetchall()
        for (fid,) in rows:
            self.conn.execute("DELETE FROM frame_data WHERE frame_id = ?", (fid,))
            self.conn.execute("DELETE FROM frames WHERE frame_id = ?", (fid,))
        self.delete_features(image_id)
        self.conn.execute("DELETE FROM images WHERE image_id = ?", (image_id,))

    def delete_features(self, image_id: int) -> None:
        self.conn.execute("DELETE FROM keypoints WHERE image_id = ?", (image_id,))
        self.conn.execute("DELETE FROM descriptors WHERE image_id = ?", (image_id,))
        if _has_table(self.conn, TURNED_TABLE):
            self.conn.execute(f"DELETE FROM {TURNED_TABLE} WHERE image_id = ?", (image_id,))

    def turned_state(self) -> dict[int, int]:
        """image id -> the turns (`learned_rotations`) its features were described with (1: none)."""
        if not _has_table(self.conn, TURNED_TABLE):
            return {}
        return dict(self.conn.execute(f"SELECT image_id, rotations FROM {TURNED_TABLE}"))

    def write_keypoints(self, image_id: int, keypoints: np.ndarray) -> None:
        kp = np.ascontiguousarray(keypoints, dtype=np.float32)
        self.conn.execute(
            "INSERT INTO keypoints(image_id, rows, cols, data) VALUES (?, ?, ?, ?)",
            (image_id, kp.shape[0], kp.shape[1], kp.tobytes()),
        )

    def write_descriptors(self, image_id: int, descriptors: np.ndarray, descriptor_type: int = DESCRIPTOR_SIFT) -> None:
        """uint8 (SIFT) or float32 descriptors, stored as COLMAP 4 stores them (type =
        FeatureExtractorType): float32 rows as their bytes, so cols = 4 x dimension, exactly what
        pycolmap's `FeatureDescriptors.from_float` writes."""
        de = np.ascontiguousarray(descriptors, dtype=np.uint8 if descriptors.dtype == np.uint8 else np.float32)
        raw = de.view(np.uint8).reshape(de.shape[0], de.shape[1] * de.itemsize)
        self.conn.execute(
            "INSERT INTO descriptors(image_id, type, rows, cols, data) VALUES (?, ?, ?, ?, ?)",
            (image_id, int(descriptor_type), raw.shape[0], raw.shape[1], raw.tobytes()),
        )

    def write_features(self, image_id: int, keypoints: np.ndarray, descriptors: np.ndarray,
                       descriptor_type: int = DESCRIPTOR_SIFT) -> None:
        """Keypoints and descriptors of one image, atomically. Descriptors (N, R, D) of R > 1
        turns (`learned.rotations`) go to COLMAP's table upright, the other turns to ours."""
        with self.transaction():
            self.delete_features(image_id)
            self.write_keypoints(image_id, keypoints)
            upright = descriptors[:, 0] if descriptors.ndim == 3 else descriptors
            self.write_descriptors(image_id, upright, descriptor_type)
            if descriptors.ndim == 3 and descriptors.shape[1] > 1:
                self.write_turned(image_id, descriptors[:, 1:])

    def write_turned(self, image_id: int, turned: np.ndarray) -> None:
        """float32 descriptors (N, R - 1, D) of the turned copies, in our own table."""
        self.conn.execute(f"CREATE TABLE IF NOT EXISTS {TURNED_TABLE} (image_id INTEGER PRIMARY KEY NOT NULL, "
                          "rotations INTEGER NOT NULL, rows INTEGER NOT NULL, cols INTEGER NOT NULL, data BLOB)")
        t = np.ascontiguousarray(turned, dtype=np.float32)
        self.conn.execute(f"INSERT OR REPLACE INTO {TURNED_TABLE}(image_id, rotations, rows, cols, data) "
                          "VALUES (?, ?, ?, ?, ?)", (image_id, t.shape[1] + 1, t.shape[0], t.shape[2], t.tobytes()))


# our table of the descriptors of learned features on turned images (learned.rotations)
TURNED_TABLE = "torchsfm_turned_descriptors"

# COLMAP 4.2 descriptor types whose rows are float32 (ALIKED_N16ROT, ALIKED_N32, LOMA_B, LOMA_B128)
_COLMAP_FLOAT_TYPES = frozenset({1, 2, 3, 4})


def has_learned_descriptors(path: str | Path) -> bool:
    """Whether the database holds descriptors other than SIFT's (learned features); False for a
    database without a descriptors table (one written by other tools)."""
    with contextlib.closing(sqlite3.connect(f"file:{Path(path)}?mode=ro", uri=True)) as conn:
        if not _has_table(conn, "descriptors"):
            return False
        return conn.execute("SELECT 1 FROM descriptors WHERE rows > 0 AND type != ? LIMIT 1",
                            (DESCRIPTOR_SIFT,)).fetchone() is not None


def decode_descriptors(rows: int, cols: int, data: bytes, descriptor_type: int) -> np.ndarray:
    """A descriptors row as an (n, D) array: uint8 for SIFT; float32 for float types, which COLMAP
    stores as their bytes (cols = 4 D); a blob of rows x cols float32 values (written so by an
    earlier version of this code) is read as float32 too."""
    if len(data) == rows * cols * 4 and rows * cols:
        return np.frombuffer(data, dtype=np.float32).reshape(rows, cols)
    raw = np.frombuffer(data, dtype=np.uint8).reshape(rows, cols)
    from .extractors import feature_type_of_colmap_type

    ft = feature_type_of_colmap_type(int(descriptor_type))
    is_float = ft.descriptor_dtype == "float32" if ft is not None else int(descriptor_type) in _COLMAP_FLOAT_TYPES
    if is_float:
        if cols % 4:
            raise DatabaseError(f"float descriptors (type {descriptor_type}) of {cols} bytes per row: not float32 rows")
        return raw.view(np.float32).reshape(rows, cols // 4)
    return raw


def read_descriptors(conn: sqlite3.Connection, image_ids: list[int]) -> list[np.ndarray]:
    """(n, D) descriptors of the given images, uint8 (SIFT) or float32 (empty arrays where absent)."""
    out = []
    for iid in image_ids:
        row = conn.execute("SELECT rows, cols, data, type FROM descriptors WHERE image_id = ?", (int(iid),)).fetchone()
        if row is None or not row[0]:
            out.append(np.zeros((0, 128), np.uint8))
        else:
            out.append(decode_descriptors(*row))
    return out


def _has_table(conn: sqlite3.Connection, name: str) -> bool:
    return conn.execute("SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = ?", (name,)).fetchone() is not None


def read_turned(conn: sqlite3.Connection, image_ids: list[int], counts: np.ndarray, dim: int) -> np.ndarray | None:
    """The turned descriptors (K, R - 1, D) of the given images, in read_features' order (image i
    has counts[i] keypoints), or None unless every image with keypoints has them for one R."""
    if not _has_table(conn, TURNED_TABLE):
        return None
    parts, turns = [], set()
    for iid, n in zip(image_ids, counts):
        if not n:
            continue
        row = conn.execute(f"SELECT rotations, rows, cols, data FROM {TURNED_TABLE} WHERE image_id = ?",
                           (int(iid),)).fetchone()
        if row is None or row[1] != n or row[2] != dim:
            turns.add(None)
            break
        turns.add(row[0])
        parts.append(np.frombuffer(row[3], dtype=np.float32).reshape(row[1], row[0] - 1, row[2]))
    if len(turns) != 1 or None in turns:
        if turns:
            logging.getLogger(__name__).warning(
                "some images have no or other turned descriptors (--learned-rotations): every pair is matched "
                "upright; extract again with one --learned-rotations to match turned images")
        return None
    return np.concatenate(parts)


def _blob(a) -> bytes | None:
    return None if a is None else np.ascontiguousarray(a, dtype=np.float64).tobytes()


def write_pair_results(conn: sqlite3.Connection, image_id1: np.ndarray, image_id2: np.ndarray,
                       matches: list[np.ndarray], inliers: list[np.ndarray], config: np.ndarray,
                       F: np.ndarray | None, E: np.ndarray | None, H: np.ndarray | None,
                       qvec: np.ndarray | None, tvec: np.ndarray | None,
                       has_F: np.ndarray, has_E: np.ndarray, has_H: np.ndarray, has_pose: np.ndarray) -> None:
    """Raw matches and two-view geometries of many pairs, as COLMAP writes them: pairs oriented
    image_id1 < image_id2 (the caller orients them), (n, 2) uint32 point2D index blobs, F/E/H as
    row-major float64 3x3 blobs (NULL where not estimated), qvec (w, x, y, z) and tvec of
    cam2_from_cam1 (NULL without a pose). Call inside a transaction; existing rows are replaced."""
    assert np.all(image_id1 < image_id2), "pairs must be oriented image_id1 < image_id2"
    pid = pair_ids(image_id1, image_id2)
    mrows, grows = [], []
    for k in range(len(pid)):
        m = np.ascontiguousarray(matches[k], dtype=np.uint32).reshape(-1, 2)
        g = np.ascontiguousarray(inliers[k], dtype=np.uint32).reshape(-1, 2)
        mrows.append((int(pid[k]), len(m), 2, m.tobytes()))
        grows.append((
            int(pid[k]), len(g), 2, g.tobytes(), int(config[k]),
            _blob(F[k]) if has_F[k] else None, _blob(E[k]) if has_E[k] else None, _blob(H[k]) if has_H[k] else None,
            _blob(qvec[k]) if has_pose[k] else None, _blob(tvec[k]) if has_pose[k] else None,
        ))
    conn.executemany("INSERT OR REPLACE INTO matches(pair_id, rows, cols, data) VALUES (?, ?, ?, ?)", mrows)
    conn.executemany(
        "INSERT OR REPLACE INTO two_view_geometries(pair_id, rows, cols, data, config, F, E, H, qvec, tvec) "
        "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)", grows)


def read_features(conn: sqlite3.Connection, image_ids: list[int]) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Flat keypoint xy (K, 2) float64, descriptors (K, D) and per-image offsets (I+1,) of the
    given images, plus the descriptor type per image. An image whose keypoint and descriptor
    counts differ contributes no features (the caller reports it)."""
    xy, de, counts, types = [], [], [], []
    dim = None
    for iid in image_ids:
        k = conn.execute("SELECT rows, cols, data FROM keypoints WHERE image_id = ?", (int(iid),)).fetchone()
        d = conn.execute("SELECT rows, cols, data, type FROM descriptors WHERE image_id = ?", (int(iid),)).fetchone()
        if k is None or d is None or not k[0] or k[0] != d[0]:
            counts.append(0)
            types.append(-1)
            continue
        xy.append(np.frombuffer(k[2], dtype=np.float32).reshape(k[0], k[1])[:, :2].astype(np.float64))
        desc = decode_descriptors(*d)
        dim = desc.shape[1] if dim is None else dim
        if desc.shape[1] != dim or (de and desc.dtype != de[0].dtype):
            raise DatabaseError(f"descriptors of image {iid} are {desc.shape[1]} x {desc.dtype}, others {dim} x "
                                f"{de[0].dtype}: one feature type per database")
        de.append(desc)
        counts.append(k[0])
        types.append(d[3])
    offsets = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
    xy_all = np.concatenate(xy) if xy else np.zeros((0, 2))
    de_all = np.concatenate(de) if de else np.zeros((0, dim or 128), np.uint8)
    return xy_all, de_all, offsets, np.asarray(types)
