"""Ranked-list pictures: each query's top-K gallery images, one row per method (PIL, imported on first use).

One picture per query: every row is [method label | query thumbnail | the K nearest gallery
thumbnails, rank 1 first], with a green border for a true match (same pid) and a red one for a
false match; the query has a grey border. Gallery items with the query's pid
AND camera are skipped, as the evaluation protocol (nformer_reid.metrics.evaluate_rank) drops
them; equal distances rank by gallery index, as there. Under each thumbnail: its pid and
camera id (0-based, as the datasets store them); above the columns: the query index and the ranks.

How many pictures: by default DEFAULT_MAX_QUERIES queries spread evenly over the query list
(indices i * (Q - 1) // (n - 1)), so every part of a pid-sorted list (Market-1501's is) is shown
and the same queries are drawn on every run; max_queries=None draws all, query_indices picks them.

Files: <out_dir>/query<index>_pid<pid>_cam<camid>.<jpg|png> (index zero-padded to 5 digits),
each written atomically (nformer_reid.utils.io.atomic_write). JPEG is written with quality 90
and no chroma subsampling, so the border colours stay within a few levels of pure green / red.
"""
import functools
import logging
import os
from dataclasses import dataclass
from typing import Dict, List, Mapping, Optional, Sequence, Tuple

import numpy as np
import torch

from nformer_reid.utils.checks import as_int, as_tensor
from nformer_reid.utils.errors import ReIDInputError
from nformer_reid.utils.io import atomic_write, check_input_file
from nformer_reid.utils.logging import progress

logger = logging.getLogger(__name__)

DEFAULT_MAX_QUERIES = 100
THUMB_SIZE = (128, 64)  # (height, width) of every thumbnail, Market-1501's aspect ratio
IMAGE_FORMATS = {"jpg": "JPEG", "png": "PNG"}

MATCH_COLOR = (0, 255, 0)
NON_MATCH_COLOR = (255, 0, 0)
QUERY_COLOR = (128, 128, 128)
BACKGROUND = (255, 255, 255)
EMPTY_CELL = (225, 225, 225)  # a rank with no gallery item left to show
TEXT_COLOR = (0, 0, 0)
MAX_LABEL_WIDTH = 200  # px; longer method names are cut with "..."


@dataclass(frozen=True)
class RankedListLayout:
    """Pixel geometry of one ranked-list picture: `rows` methods x (1 query + `topk`) cells.

    A cell is a thumbnail framed by `border` pixels; columns are `gap` apart with `query_gap`
    after the query column; a caption band of `text_height` lies above the first row (query index,
    ranks) and under every row (pid, camera); the method labels take `label_width` on the left.
    """

    rows: int
    topk: int
    thumb_height: int = THUMB_SIZE[0]
    thumb_width: int = THUMB_SIZE[1]
    label_width: int = 0
    text_height: int = 12
    border: int = 4
    gap: int = 4
    query_gap: int = 16
    margin: int = 6

    @property
    def cell_width(self) -> int:
        return self.thumb_width + 2 * self.border

    @property
    def cell_height(self) -> int:
        return self.thumb_height + 2 * self.border

    @property
    def row_height(self) -> int:
        return self.cell_height + self.text_height

    @property
    def size(self) -> Tuple[int, int]:
        """(width, height) of the picture."""
        width = (2 * self.margin + self.label_width + self.cell_width + self.query_gap
                 + self.topk * self.cell_width + (self.topk - 1) * self.gap)
        height = 2 * self.margin + self.text_height + self.rows * self.row_height + (self.rows - 1) * self.gap
        return width, height

    def cell_box(self, row: int, col: int) -> Tuple[int, int, int, int]:
        """(left, top, right, bottom), right/bottom exclusive, of the framed cell at `row`
        (method) and `col` (0 = query, r = rank r)."""
        if not (0 <= row < self.rows and 0 <= col <= self.topk):
            raise IndexError(f"cell ({row}, {col}) outside {self.rows} rows x {self.topk + 1} columns")
        left = self.margin + self.label_width
        if col:
            left += self.cell_width + self.query_gap + (col - 1) * (self.cell_width + self.gap)
        top = self.margin + self.text_height + row * (self.row_height + self.gap)
        return left, top, left + self.cell_width, top + self.cell_height


def select_queries(num_query: int, max_queries: Optional[int] = DEFAULT_MAX_QUERIES) -> List[int]:
    """The query indices drawn by default: all of them if max_queries is None or >= num_query,
    else max_queries indices spread evenly from the first query to the last."""
    num_query = as_int(num_query, "num_query", minimum=0)
    if max_queries is None or num_query == 0:
        return list(range(num_query))
    n = min(as_int(max_queries, "max_queries", minimum=1), num_query)
    if n == 1:
        return [0]
    return [i * (num_query - 1) // (n - 1) for i in range(n)]  # distinct: the step is >= 1


def ranked_file_name(index: int, pid: int, camid: int, image_format: str = "jpg") -> str:
    """The picture's file name for query `index` (pid, camid): query00012_pid17_cam2.jpg."""
    return f"query{index:05d}_pid{pid}_cam{camid}.{image_format}"


def ranked_file_names(query: Sequence[Tuple[str, int, int]], max_queries: Optional[int] = DEFAULT_MAX_QUERIES,
                      query_indices: Optional[Sequence[int]] = None, image_format: str = "jpg") -> List[str]:
    """The file names visualize_ranked_results writes for these arguments, in its order (for a
    command's output check before it runs)."""
    query = _check_items(query, "query")
    selected = (_check_indices(query_indices, len(query)) if query_indices is not None
                else select_queries(len(query), max_queries))
    image_format = _check_format(image_format)
    return [ranked_file_name(i, query[i][1], query[i][2], image_format) for i in selected]


def _check_items(items, name: str) -> List[Tuple[str, int, int]]:
    """items as a list of (path str, pid int, camid int)."""
    if isinstance(items, (str, bytes)) or not isinstance(items, Sequence):
        raise TypeError(f"{name} must be a sequence of (image path, pid, camid), got {type(items).__name__}")
    out = []
    for i, item in enumerate(items):
        if not isinstance(item, (tuple, list)) or len(item) != 3:
            raise TypeError(f"{name}[{i}] must be an (image path, pid, camid) tuple, got {item!r}")
        path, pid, cam = item
        if not isinstance(path, (str, os.PathLike)) or not os.fspath(path):
            raise TypeError(f"{name}[{i}] image path must be a non-empty path, got {path!r}")
        out.append((os.fspath(path), as_int(pid, f"{name}[{i}] pid"), as_int(cam, f"{name}[{i}] camid")))
    if not out:
        raise ValueError(f"{name} is empty: nothing to draw")
    return out


def _check_indices(query_indices, num_query: int) -> List[int]:
    if isinstance(query_indices, (str, bytes)) or not isinstance(query_indices, (Sequence, np.ndarray, torch.Tensor)):
        raise TypeError(f"query_indices must be a sequence of ints, got {type(query_indices).__name__}")
    indices = [as_int(v, f"query_indices[{k}]", minimum=0, maximum=num_query - 1)
               for k, v in enumerate(list(query_indices))]
    if not indices:
        raise ValueError("query_indices is empty: nothing to draw")
    if len(set(indices)) != len(indices):
        raise ValueError("query_indices must not repeat a query (each has one picture)")
    return indices


def _check_format(image_format) -> str:
    if image_format not in IMAGE_FORMATS:
        raise ValueError(f"image_format must be one of {sorted(IMAGE_FORMATS)}, got {image_format!r}")
    return image_format


def _check_size(size) -> Tuple[int, int]:
    if not isinstance(size, (tuple, list)) or len(size) != 2:
        raise TypeError(f"size must be (height, width) of a thumbnail, got {size!r}")
    return as_int(size[0], "size[0]", minimum=8), as_int(size[1], "size[1]", minimum=8)


def _check_methods(mapping, name: str) -> Dict[str, object]:
    if not isinstance(mapping, Mapping):
        raise TypeError(f"{name} must be a {{method name: ...}} mapping, got {type(mapping).__name__}")
    if not mapping:
        raise ValueError(f"{name} is empty: give at least one method")
    for key in mapping:
        if not isinstance(key, str) or not key.strip():
            raise TypeError(f"{name} keys must be non-empty method names (str), got {key!r}")
    return dict(mapping)


def _distance_rows(dist, name: str, shape: Tuple[int, int], rows: Sequence[int]) -> np.ndarray:
    """The `rows` of a (Q, G) distance matrix as a numpy array, in a dtype holding every value exactly."""
    t = as_tensor(dist, name)
    if t.dtype == torch.bool or t.is_complex():
        raise TypeError(f"{name} must hold real distances, got {t.dtype}")
    if tuple(t.shape) != shape:
        raise ValueError(f"{name} must be (len(query), len(gallery)) = {shape}, got shape {tuple(t.shape)}")
    picked = t[torch.as_tensor(rows, dtype=torch.long, device=t.device)].cpu()
    if picked.is_floating_point() and not bool(torch.isfinite(picked).all()):  # the rows drawn: all that is read
        bad = int((~torch.isfinite(picked).all(1)).nonzero()[0, 0])
        raise ValueError(f"{name} contains NaN or Inf (row {rows[bad]})")
    if picked.dtype in (torch.float16, torch.bfloat16):
        picked = picked.float()  # numpy has no bfloat16; float32 holds both exactly
    return picked.numpy()


def rank_gallery(distances: np.ndarray, q_pid: int, q_camid: int, g_pids: np.ndarray, g_camids: np.ndarray,
                 topk: int) -> Tuple[np.ndarray, np.ndarray]:
    """(gallery indices, is_match) of the `topk` nearest gallery items of one query, nearest first
    (ties by gallery index), without the items of the query's pid and camera; fewer if the
    gallery runs out. is_match: same pid (as torchreid's protocol, no pid is special)."""
    order = np.argsort(distances, kind="stable")
    keep = ~((g_pids[order] == q_pid) & (g_camids[order] == q_camid))
    top = order[keep][:topk]
    is_match = g_pids[top] == q_pid
    return top, is_match


def _font():
    from PIL import ImageFont

    return ImageFont.load_default()


def _fit(font, texts: Sequence[str], width: int) -> str:
    """The first of `texts` no wider than `width` pixels, else the last one cut to fit with "..."."""
    for text in texts:
        if font.getlength(text) <= width:
            return text
    text = texts[-1]
    while text and font.getlength(text + "...") > width:
        text = text[:-1]
    return text + "..." if text else ""


def _id_caption(font, pid: int, camid: int, width: int) -> str:
    return _fit(font, (f"pid {pid} cam {camid}", f"{pid} c{camid}", f"{pid}"), width)


def _import_pil():
    try:
        from PIL import Image, ImageDraw
    except ImportError as exc:
        from nformer_reid.utils.deps import INSTALL_HINT, MissingDependency

        raise MissingDependency(f"Pillow is not installed; the ranked-list pictures need it: {INSTALL_HINT} "
                                "(or: pip install pillow)") from exc
    return Image, ImageDraw


def ranked_list_layout(names: Sequence[str], topk: int, size: Tuple[int, int] = THUMB_SIZE) -> RankedListLayout:
    """The layout visualize_ranked_results uses for methods `names` (one row each) and `topk`
    ranks: the label column is as wide as the longest name (at most MAX_LABEL_WIDTH)."""
    topk = as_int(topk, "topk", minimum=1)
    height, width = _check_size(size)
    if not names:
        raise ValueError("names is empty: give at least one method")
    font = _font()
    bottom = font.getbbox("Ag")[3]  # the tallest line of the captions
    label = min(MAX_LABEL_WIDTH, max(int(np.ceil(font.getlength(str(n)))) for n in names)) + 8
    return RankedListLayout(rows=len(names), topk=topk, thumb_height=height, thumb_width=width,
                            label_width=label, text_height=bottom + 3)


def _render(rows_by_method: Dict[str, np.ndarray], selected: List[int], query, gallery, out_dir: str, topk: int,
            size: Tuple[int, int], image_format: str) -> List[str]:
    """Draw and write the pictures of `selected` queries; rows_by_method[name][k] holds the
    distances of query selected[k] to the gallery."""
    Image, ImageDraw = _import_pil()
    g_pids = np.array([p for _, p, _ in gallery], dtype=np.int64)
    g_camids = np.array([c for _, _, c in gallery], dtype=np.int64)
    topk = min(topk, len(gallery))
    plans = []
    needed = {}  # path -> what to name if it is missing
    for k, q_idx in enumerate(selected):
        q_path, q_pid, q_cam = query[q_idx]
        needed.setdefault(q_path, f"query[{q_idx}] image")
        ranked = {name: rank_gallery(dists[k], q_pid, q_cam, g_pids, g_camids, topk)
                  for name, dists in rows_by_method.items()}
        for top, _ in ranked.values():
            for g_idx in top.tolist():
                needed.setdefault(gallery[g_idx][0], f"gallery[{g_idx}] image")
        plans.append((q_idx, ranked))
    for path, what in needed.items():  # every missing image is reported before any picture is written
        check_input_file(path, what)

    @functools.lru_cache(maxsize=1024)
    def thumbnail(path: str):
        try:
            with Image.open(path) as img:
                return img.convert("RGB").resize((size[1], size[0]), Image.BILINEAR)
        except (OSError, ValueError, Image.DecompressionBombError) as exc:
            raise ReIDInputError(f"{needed.get(path, 'image')} {path}: not a readable image "
                                 f"({type(exc).__name__}: {exc})") from exc

    names = list(rows_by_method)
    layout = ranked_list_layout(names, topk, size)
    font = _font()
    pad = layout.border
    written = []
    for q_idx, ranked in progress(plans, "ranked lists"):
        q_path, q_pid, q_cam = query[q_idx]
        canvas = Image.new("RGB", layout.size, BACKGROUND)
        draw = ImageDraw.Draw(canvas)

        def frame(row, col, path, color, caption):
            left, top, right, bottom = layout.cell_box(row, col)
            draw.rectangle((left, top, right - 1, bottom - 1), fill=color)
            canvas.paste(thumbnail(path), (left + pad, top + pad))
            draw.text((left, bottom + 1), _id_caption(font, *caption, layout.cell_width), fill=TEXT_COLOR, font=font)

        head_top = layout.margin
        q_left = layout.cell_box(0, 0)[0]
        draw.text((q_left, head_top), _fit(font, (f"query {q_idx}", f"q{q_idx}"), layout.cell_width),
                  fill=TEXT_COLOR, font=font)
        for rank in range(1, topk + 1):
            draw.text((layout.cell_box(0, rank)[0], head_top), str(rank), fill=TEXT_COLOR, font=font)
        for row, name in enumerate(names):
            top_cell = layout.cell_box(row, 0)[1]
            label = _fit(font, (name,), layout.label_width - 8)
            draw.text((layout.margin, top_cell + layout.cell_height // 2 - layout.text_height // 2), label,
                      fill=TEXT_COLOR, font=font)
            frame(row, 0, q_path, QUERY_COLOR, (q_pid, q_cam))
            top, is_match = ranked[name]
            for rank in range(1, topk + 1):
                if rank > len(top):
                    left, top_px, right, bottom = layout.cell_box(row, rank)
                    draw.rectangle((left, top_px, right - 1, bottom - 1), fill=EMPTY_CELL)
                    continue
                g_path, g_pid, g_cam = gallery[int(top[rank - 1])]
                frame(row, rank, g_path, MATCH_COLOR if is_match[rank - 1] else NON_MATCH_COLOR, (g_pid, g_cam))
        path = os.path.join(out_dir, ranked_file_name(q_idx, q_pid, q_cam, image_format))
        with atomic_write(path) as fh:
            if image_format == "jpg":
                canvas.save(fh, format="JPEG", quality=90, subsampling=0)
            else:
                canvas.save(fh, format="PNG")
        written.append(path)
    logger.info("wrote %d ranked-list pictures (top %d, %s) to %s", len(written), topk, ", ".join(names), out_dir)
    return written


def _prepare(query, gallery, out_dir, topk, max_queries, query_indices, size, image_format):
    query, gallery = _check_items(query, "query"), _check_items(gallery, "gallery")
    if not isinstance(out_dir, (str, os.PathLike)) or not os.fspath(out_dir):
        raise TypeError(f"out_dir must be a folder path, got {out_dir!r}")
    out_dir = os.path.expanduser(os.fspath(out_dir))
    if os.path.exists(out_dir) and not os.path.isdir(out_dir):
        raise ReIDInputError(f"out_dir {out_dir}: exists and is not a folder")
    topk = as_int(topk, "topk", minimum=1)
    selected = (_check_indices(query_indices, len(query)) if query_indices is not None
                else select_queries(len(query), max_queries))
    return query, gallery, out_dir, topk, selected, _check_size(size), _check_format(image_format)


def visualize_ranked_results(distmats: Mapping[str, object], query: Sequence[Tuple[str, int, int]],
                             gallery: Sequence[Tuple[str, int, int]], out_dir: str, topk: int = 10,
                             max_queries: Optional[int] = DEFAULT_MAX_QUERIES,
                             query_indices: Optional[Sequence[int]] = None, size: Tuple[int, int] = THUMB_SIZE,
                             image_format: str = "jpg") -> List[str]:
    """Write one ranked-list picture per query and return their paths (in query order).

    distmats: {method name: (len(query), len(gallery)) distances, smaller = nearer} (numpy arrays
    or torch tensors on any device, finite real numbers), one row of the picture each, in the
    mapping's order (e.g. {"backbone": d0, "NFormer (official)": d1}: before and after NFormer);
    only the rows of the drawn queries are read (and checked).
    query / gallery: sequences of (image path, pid, camid), as a dataset's .query / .gallery.
    topk >= 1 ranks per row (at most len(gallery)). Which queries: query_indices if given (max_queries
    is then not used), else select_queries(len(query), max_queries): DEFAULT_MAX_QUERIES evenly
    spread by default, None = all. size: (height, width) of each thumbnail. image_format "jpg" or "png".

    Errors: TypeError / ValueError naming the argument (a distance matrix whose shape is not
    (len(query), len(gallery)), NaN/Inf, topk < 1, ...); ReIDInputError naming the file for a query
    or gallery image that is missing (checked for every picture before any is written) or
    unreadable, and for an out_dir that is a file. Existing pictures of the same names are
    replaced, atomically; the command that calls this decides whether that is allowed.
    """
    methods = _check_methods(distmats, "distmats")
    query, gallery, out_dir, topk, selected, size, image_format = _prepare(
        query, gallery, out_dir, topk, max_queries, query_indices, size, image_format)
    shape = (len(query), len(gallery))
    rows = {name: _distance_rows(d, f"distmats[{name!r}]", shape, selected) for name, d in methods.items()}
    return _render(rows, selected, query, gallery, out_dir, topk, size, image_format)


def visualize_ranked_features(features: Mapping[str, Tuple[object, object]], query, gallery, out_dir: str,
                              topk: int = 10, max_queries: Optional[int] = DEFAULT_MAX_QUERIES,
                              query_indices: Optional[Sequence[int]] = None, size: Tuple[int, int] = THUMB_SIZE,
                              image_format: str = "jpg") -> List[str]:
    """visualize_ranked_results from features: {method name: (query features (Q, d), gallery
    features (G, d))}, ranked by the evaluation's distance (squared Euclidean of L2-normalised
    features, nformer_reid.metrics.compute_distance_matrix). Only the drawn queries' distance rows
    are computed, so Market-1501's full 3,368 x 19,732 matrices are never built (a row computed
    alone can differ from the full matrix's in the last float32 bit, which reorders only gallery
    items at practically equal distances). Arguments and errors as visualize_ranked_results."""
    from nformer_reid.metrics import compute_distance_matrix

    methods = _check_methods(features, "features")
    query, gallery, out_dir, topk, selected, size, image_format = _prepare(
        query, gallery, out_dir, topk, max_queries, query_indices, size, image_format)
    rows = {}
    for name, pair in methods.items():
        if not isinstance(pair, (tuple, list)) or len(pair) != 2:
            raise TypeError(f"features[{name!r}] must be a (query features, gallery features) pair")
        qf, gf = (as_tensor(f, f"features[{name!r}][{k}]") for k, f in enumerate(pair))
        if qf.dim() != 2 or gf.dim() != 2 or qf.shape[0] != len(query) or gf.shape[0] != len(gallery):
            raise ValueError(f"features[{name!r}] must be (len(query), d) = ({len(query)}, d) and (len(gallery), d) "
                             f"= ({len(gallery)}, d), got {tuple(qf.shape)} and {tuple(gf.shape)}")
        picked = qf[torch.as_tensor(selected, dtype=torch.long, device=qf.device)]
        rows[name] = compute_distance_matrix(picked, gf, "euclidean", normalize=True).cpu().numpy()
    return _render(rows, selected, query, gallery, out_dir, topk, size, image_format)
