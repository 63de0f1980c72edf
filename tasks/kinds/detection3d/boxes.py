"""3D box geometry, vectorised in torch (CPU or CUDA, float64 advised): boxes are (..., 7) rows
(x, y, z of the centre, dx, dy, dz, heading about z), as OpenPCDet writes them.

    bev_iou(a, b)          (Ka, Kb) rotated IoU of the boxes' footprints (bird's-eye view)
    iou_3d(a, b)           (Ka, Kb) 3D IoU: footprint intersection × height overlap
    nms_bev(boxes, scores, thresh)   greedy rotated NMS, kept indices by descending score
    points_in_boxes(points, boxes)   (K, N) point inside box, faces included

The footprint intersection clips one rotated rectangle by the four edges of the other
(Sutherland–Hodgman) for all pairs at once: polygons are fixed arrays of 8 vertices with a count (a
convex quadrilateral clipped by four half-planes never has more), kept in order by a stable sort of
the valid vertices after each edge; the area is the shoelace formula.
"""
from __future__ import annotations

import numpy as np
import torch

__all__ = ["bev_corners", "bev_iou", "bev_intersection", "iou_3d", "nms_bev", "points_in_boxes"]

_MAX_VERTS = 8


def _as_tensor(x) -> torch.Tensor:
    return torch.as_tensor(x) if not isinstance(x, torch.Tensor) else x


def bev_corners(boxes: torch.Tensor) -> torch.Tensor:
    """(..., 4, 2) footprint corners, counter-clockwise."""
    boxes = _as_tensor(boxes)
    half = boxes[..., 3:5] / 2                                            # (..., 2)
    signs = boxes.new_tensor([[1, 1], [-1, 1], [-1, -1], [1, -1]])        # counter-clockwise
    local = signs * half[..., None, :]                                    # (..., 4, 2)
    cos, sin = torch.cos(boxes[..., 6])[..., None], torch.sin(boxes[..., 6])[..., None]
    x = local[..., 0] * cos - local[..., 1] * sin
    y = local[..., 0] * sin + local[..., 1] * cos
    return torch.stack([x, y], -1) + boxes[..., None, 0:2]


def _clip(poly: torch.Tensor, count: torch.Tensor, a: torch.Tensor, b: torch.Tensor):
    """Sutherland–Hodgman step: keeps the part of each polygon (P, V, 2) with `count` (P,) vertices on the
    left of the directed edge a → b (P, 2), boundary included."""
    p, v = poly.shape[:2]
    idx = torch.arange(v, device=poly.device)
    valid = idx[None] < count[:, None]                                    # (P, V)
    nxt_idx = torch.where(idx[None] + 1 < count[:, None], idx[None] + 1, torch.zeros_like(idx[None]))
    nxt = torch.gather(poly, 1, nxt_idx[..., None].expand(p, v, 2))
    edge = (b - a)[:, None]                                               # (P, 1, 2)

    def side(q):  # cross(edge, q - a): >= 0 on the left
        d = q - a[:, None]
        return edge[..., 0] * d[..., 1] - edge[..., 1] * d[..., 0]

    s_cur, s_nxt = side(poly), side(nxt)
    in_cur, in_nxt = s_cur >= 0, s_nxt >= 0
    t = (s_cur / torch.where(s_cur == s_nxt, torch.ones_like(s_cur), s_cur - s_nxt))[..., None]
    cross_pt = poly + t * (nxt - poly)
    # per input edge cur → nxt, up to two outputs: [crossing point, next vertex]
    emit_cross = valid & (in_cur != in_nxt)
    emit_next = valid & in_nxt
    out = torch.stack([cross_pt, nxt], 2).reshape(p, 2 * v, 2)
    keep = torch.stack([emit_cross, emit_next], 2).reshape(p, 2 * v)
    order = torch.sort((~keep).to(torch.int8), dim=1, stable=True).indices[:, :v]   # valid first, in order
    new_count = keep.sum(1).clamp_max(v)
    return torch.gather(out, 1, order[..., None].expand(p, v, 2)), new_count


def _polygon_area(poly: torch.Tensor, count: torch.Tensor) -> torch.Tensor:
    p, v = poly.shape[:2]
    idx = torch.arange(v, device=poly.device)
    valid = idx[None] < count[:, None]
    nxt_idx = torch.where(idx[None] + 1 < count[:, None], idx[None] + 1, torch.zeros_like(idx[None]))
    nxt = torch.gather(poly, 1, nxt_idx[..., None].expand(p, v, 2))
    cross = poly[..., 0] * nxt[..., 1] - poly[..., 1] * nxt[..., 0]
    return (torch.where(valid, cross, torch.zeros_like(cross)).sum(1) / 2).abs()


def bev_intersection(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """(P,) footprint intersection areas of aligned pairs a[i], b[i] (both (P, 7))."""
    a, b = _as_tensor(a), _as_tensor(b)
    p = a.shape[0]
    ca, cb = bev_corners(a), bev_corners(b)                              # (P, 4, 2)
    poly = torch.zeros((p, _MAX_VERTS, 2), dtype=a.dtype, device=a.device)
    poly[:, :4] = ca
    count = torch.full((p,), 4, dtype=torch.long, device=a.device)
    for e in range(4):
        poly, count = _clip(poly, count, cb[:, e], cb[:, (e + 1) % 4])
    area = _polygon_area(poly, count)
    return torch.where(count >= 3, area, torch.zeros_like(area))


def _pairs(a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    a, b = _as_tensor(a), _as_tensor(b)
    ka, kb = a.shape[0], b.shape[0]
    return a[:, None].expand(ka, kb, 7).reshape(-1, 7), b[None].expand(ka, kb, 7).reshape(-1, 7)


def bev_iou(a, b, aligned: bool = False) -> torch.Tensor:
    """Rotated footprint IoU: (Ka, Kb) for every pair, or (K,) for a[i], b[i] when `aligned`."""
    a, b = _as_tensor(a), _as_tensor(b)
    pa, pb = (a, b) if aligned else _pairs(a, b)
    inter = bev_intersection(pa, pb)
    union = pa[:, 3] * pa[:, 4] + pb[:, 3] * pb[:, 4] - inter
    iou = inter / union.clamp_min(torch.finfo(union.dtype).tiny)
    return iou if aligned else iou.reshape(a.shape[0], b.shape[0])


def iou_3d(a, b, aligned: bool = False) -> torch.Tensor:
    """3D IoU of upright boxes: footprint intersection × overlap of the z extents, over the union volume."""
    a, b = _as_tensor(a), _as_tensor(b)
    pa, pb = (a, b) if aligned else _pairs(a, b)
    inter_bev = bev_intersection(pa, pb)
    top = torch.minimum(pa[:, 2] + pa[:, 5] / 2, pb[:, 2] + pb[:, 5] / 2)
    bottom = torch.maximum(pa[:, 2] - pa[:, 5] / 2, pb[:, 2] - pb[:, 5] / 2)
    inter = inter_bev * (top - bottom).clamp_min(0)
    union = pa[:, 3:6].prod(1) + pb[:, 3:6].prod(1) - inter
    iou = inter / union.clamp_min(torch.finfo(union.dtype).tiny)
    return iou if aligned else iou.reshape(a.shape[0], b.shape[0])


def nms_bev(boxes, scores, iou_threshold: float) -> torch.Tensor:
    """Greedy NMS on rotated footprints: visiting boxes by descending score (ties: lower index first),
    keeps a box unless a kept one overlaps it with BEV IoU > `iou_threshold`. Returns kept indices, in
    visiting order. One IoU matrix, then a walk over it."""
    boxes, scores = _as_tensor(boxes), _as_tensor(scores)
    if boxes.shape[0] == 0:
        return torch.zeros(0, dtype=torch.long, device=boxes.device)
    order = torch.sort(scores, descending=True, stable=True).indices
    over = (bev_iou(boxes[order], boxes[order]) > iou_threshold).cpu().numpy()
    suppressed = np.zeros(len(order), dtype=bool)
    keep = []
    for i in range(len(order)):
        if suppressed[i]:
            continue
        keep.append(i)
        suppressed |= over[i]
    return order[torch.as_tensor(keep, device=order.device)]


def points_in_boxes(points, boxes):
    """(K, N) bool, point inside box (faces included): numpy in, numpy out; torch in, torch out."""
    as_numpy = isinstance(points, np.ndarray)
    pts, bx = _as_tensor(points)[:, :3].to(torch.float64), _as_tensor(boxes).to(torch.float64)
    d = pts[None] - bx[:, None, :3]                                       # (K, N, 3)
    cos, sin = torch.cos(bx[:, 6])[:, None], torch.sin(bx[:, 6])[:, None]
    local_x = d[..., 0] * cos + d[..., 1] * sin                           # rotated by -heading
    local_y = -d[..., 0] * sin + d[..., 1] * cos
    inside = ((local_x.abs() <= bx[:, None, 3] / 2) & (local_y.abs() <= bx[:, None, 4] / 2)
              & (d[..., 2].abs() <= bx[:, None, 5] / 2))
    return inside.numpy() if as_numpy else inside
