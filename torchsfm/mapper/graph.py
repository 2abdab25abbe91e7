"""Graph helpers for the view graph and the keypoint match graph.

- `connected_components`: label propagation with pointer jumping in torch (any device, no loop
  over nodes or edges); it also builds tracks from millions of matches.
- `edge_triangle_support`: common neighbours of the two ends of each edge (a merge test), and
  `certified_support`, its cheap MinHash prefilter; `triangles`: every triangle of a graph, once.
- `largest_component`: node mask of the component with the most nodes.
- `maximum_spanning_tree`: scipy on the CPU (spanning tree + breadth-first rooting). The graph
  has a node per image and an edge per pair, so the host round trip is small; `compose_along_tree`
  then propagates transforms down the tree in torch by pointer doubling.
- `stage_copy`: the copy-on-write a stage makes of its input (no stage mutates its input).
- Image bookkeeping: `Reconstruction.meta["image_reason"]` is a list with one string per image,
  "" while the image is still in play, otherwise why the mapper dropped it (the first reason
  recorded wins, so later stages do not overwrite an earlier cause).
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import numpy as np
import torch
from scipy.sparse import coo_matrix  # imported with the module: its first import takes ~0.3 s
from scipy.sparse.csgraph import breadth_first_order, minimum_spanning_tree
from torch import Tensor

from ..data.model import Reconstruction
from ..runtime.chunks import row_chunks

# Reasons recorded in meta["image_reason"].
REASON_NO_PAIRS = "no_valid_pairs"
REASON_RELPOSE = "relative_pose_failed"
REASON_COMPONENT = "not_in_largest_component"
REASON_ROTATION = "rotation_averaging_filtered"


def connected_components(num_nodes: int, edges: Tensor, mask: Tensor | None = None) -> Tensor:
    """Component label of every node (N,) int64: the smallest node index in its component.

    edges (E, 2) int64 node indices; mask (E,) bool selects the edges to use. Hook-and-shortcut
    (Shiloach-Vishkin style): every round, the root of each edge's endpoints is lowered to the
    smaller of the two roots, then parent pointers are jumped until every node points at a root.
    Labels only decrease and stay within the component, so at the fixed point every edge joins
    nodes with one root, the component's smallest node. Rounds are O(log N) in practice. The
    passes over the edges run in cache-sized chunks on the CPU (45M matches at 10,000 images:
    3.4 -> 1.8 s).
    """
    device = edges.device
    f = torch.arange(num_nodes, device=device)
    if mask is not None:
        edges = edges[mask]
    if edges.numel() == 0 or num_nodes == 0:
        return f
    a, b = edges[:, 0].contiguous(), edges[:, 1].contiguous()
    while True:
        g = f.clone()
        for c in row_chunks(a.numel(), device):  # the passes over the edges in cache-sized pieces
            fa, fb = f[a[c]], f[b[c]]
            m = torch.minimum(fa, fb)
            g.scatter_reduce_(0, fa, m, "amin").scatter_reduce_(0, fb, m, "amin")
        while True:  # pointer jumping
            h = g[g]
            if torch.equal(h, g):
                break
            g = h
        if torch.equal(g, f):
            return f
        f = g
        # An edge whose ends share a root stays satisfied (later hooks move both ends together).
        live = [(a[c], b[c], f[a[c]] != f[b[c]]) for c in row_chunks(a.numel(), device)]
        a, b = torch.cat([x[k] for x, _, k in live]), torch.cat([y[k] for _, y, k in live])
        if a.numel() == 0:
            return f


def _touching(num_nodes: int, edges: Tensor, nodes: Tensor) -> Tensor:
    """The edges with an end in `nodes`: every edge a neighbourhood question about them needs."""
    mark = torch.zeros(num_nodes, dtype=torch.bool, device=edges.device)
    mark[nodes] = True
    return edges[mark[edges[:, 0]] | mark[edges[:, 1]]]


def _local_graph(num_nodes: int, edges: Tensor, u: Tensor, v: Tensor) -> tuple[Tensor, Tensor, Tensor, int]:
    """The edges touching u or v, with their nodes renumbered 0..n-1, the renumbered u and v, and
    n: every neighbourhood of u and v, with per-node arrays of that size and not of the graph's
    (a 10,000-image corridor has 6.7M keypoints and a few hundred thousand in merged tracks)."""
    sub = _touching(num_nodes, edges, torch.cat([u, v]))
    nodes = torch.unique(sub)
    local = lambda x: torch.searchsorted(nodes, x.contiguous().to(nodes.dtype))  # noqa: E731
    return local(sub), local(u), local(v), int(nodes.numel())


_HASH_BITS = 31  # MinHash orders: x -> (A x + B) mod 2^31, A odd: a bijection, computed with a mask
_MASK = (1 << _HASH_BITS) - 1
_NONE = 1 << _HASH_BITS  # larger than every hash: no neighbour


def _min_neighbour(num_nodes: int, edges: Tensor, A: int = 1, B: int = 0) -> Tensor:
    """Per node, the smallest hash (A x + B) mod 2^31 over its neighbours x in `edges` (int64;
    A = 1, B = 0: the smallest index); _NONE where a node has no neighbour. One int64 temporary
    per direction (the edges may be int32)."""
    def h(x: Tensor) -> Tensor:
        x = x.to(torch.long, copy=True)
        return x if A == 1 and B == 0 else x.mul_(A).add_(B).bitwise_and_(_MASK)

    a, b = edges[:, 0], edges[:, 1]
    ext = torch.full((num_nodes,), _NONE, dtype=torch.long, device=edges.device)
    ext.scatter_reduce_(0, a, h(b), "amin")
    return ext.scatter_reduce_(0, b, h(a), "amin")


def _witness(ext: Tensor, u: Tensor, v: Tensor, A: int, B: int) -> Tensor:
    """The common neighbour that u and v both pick (their equal min-hash, mapped back to the
    node; int32), or -1."""
    hu = ext[u]
    same = (hu == ext[v]) & (hu < _NONE)
    node = hu.sub_(B).bitwise_and_(_MASK).mul_(pow(A, -1, 1 << _HASH_BITS)).bitwise_and_(_MASK)  # a bijection
    return torch.where(same, node, -1).to(torch.int32)


def certified_support(num_nodes: int, edges: Tensor, query: Tensor, at_least: int, num_hashes: int = 8,
                      seed: int = 0) -> Tensor:
    """Bool (Q,): queried edges proven to have at least `at_least` common neighbours.

    A witness is a node that both ends of an edge pick by the same rule among their neighbours:
    when u and v pick the same node, it is a common neighbour (never u or v: no node is its own
    neighbour), so the test has no false positives; an edge it cannot certify goes to the exact
    count (`edge_triangle_support`). The rules are MinHash's (the first neighbour in an order of
    the nodes): first the smallest and the largest index, then, for the edges still uncertified,
    `num_hashes` random orders ((A x + B) mod 2^31 with A odd: arithmetic, no permutation
    tables). Each rule is one scatter over the edges and two gathers; witnesses are int32 and
    counted distinct.
    """
    if num_nodes > _MASK:
        raise ValueError(f"certified_support: {num_nodes} nodes, at most {_MASK}")
    u, v = edges[query, 0], edges[query, 1]
    if 4 * query.numel() < edges.shape[0]:  # few queries: the graph around their ends is enough
        edges, u, v, num_nodes = _local_graph(num_nodes, edges, u, v)
    wit = torch.stack([_witness(_min_neighbour(num_nodes, edges, A, B), u, v, A, B)
                       for A, B in ((1, 0), (_MASK, num_nodes - 1))], 1)  # smallest; largest: (N - 1 - x)
    ok = _distinct_at_least(wit, at_least)
    rest = torch.nonzero(~ok, as_tuple=True)[0]
    if rest.numel() == 0 or num_hashes == 0:
        return ok
    wit, u, v = wit[rest], u[rest], v[rest]  # the edges still open
    g = torch.Generator().manual_seed(seed)
    for _ in range(num_hashes):
        if 4 * rest.numel() < edges.shape[0]:  # few left: only the edges around them matter
            edges = _touching(num_nodes, edges, torch.cat([u, v]))
        A = int(torch.randint(0, 1 << (_HASH_BITS - 1), (1,), generator=g)) * 2 + 1  # odd: invertible
        B = int(torch.randint(0, 1 << _HASH_BITS, (1,), generator=g))
        wit = torch.cat([wit, _witness(_min_neighbour(num_nodes, edges, A, B), u, v, A, B)[:, None]], 1)
        done = _distinct_at_least(wit, at_least)
        ok[rest[done]] = True
        keep = ~done
        rest, wit, u, v = rest[keep], wit[keep], u[keep], v[keep]
        if rest.numel() == 0:
            break
    return ok


def _distinct_at_least(w: Tensor, k: int) -> Tensor:
    """Rows of w (Q, h) holding at least k distinct values >= 0."""
    if k <= 1:
        return (w >= 0).any(1)
    srt = torch.sort(w, dim=1).values
    distinct = (srt >= 0) & torch.cat([torch.ones_like(srt[:, :1], dtype=torch.bool), srt[:, 1:] != srt[:, :-1]], 1)
    return distinct.sum(1) >= k


def edge_triangle_support(num_nodes: int, edges: Tensor, query: Tensor, chunk: int = 1 << 22) -> Tensor:
    """For each queried edge (u, v), the number of nodes adjacent to both u and v (int64 (Q,)).

    edges (E, 2) is the undirected graph (duplicates and both orientations allowed); query (Q,)
    indexes rows of `edges`. Each query walks the neighbours of its lower-degree end and looks
    the closing edge up in the sorted adjacency keys, in chunks of at most `chunk` lookups. Only
    the edges touching a queried end are needed (both edges of a triangle through u-v do), so
    the key table is built from those. An edge that merges two tracks by mistake closes no
    triangle, one inside a track closes many.
    """
    device = edges.device
    u, v = edges[query, 0].long(), edges[query, 1].long()
    support = torch.zeros(query.numel(), dtype=torch.long, device=device)
    if query.numel() == 0:
        return support
    sub, u, v, num_nodes = _local_graph(num_nodes, edges, u, v)
    a, b = sub[:, 0].long(), sub[:, 1].long()
    keys = torch.unique(torch.cat([a * num_nodes + b, b * num_nodes + a]))  # sorted, no duplicates
    src, dst = keys // num_nodes, keys % num_nodes
    deg = torch.bincount(src, minlength=num_nodes)
    start = torch.cumsum(deg, 0) - deg
    swap = deg[u] > deg[v]
    u, v = torch.where(swap, v, u), torch.where(swap, u, v)
    n = deg[u]
    ends = torch.cumsum(n, 0)
    q0 = 0
    while q0 < query.numel():  # chunks of queries whose neighbour lists fit in `chunk` lookups
        base = int(ends[q0 - 1]) if q0 else 0
        q1 = max(q0 + 1, int(torch.searchsorted(ends, torch.tensor(base + chunk, device=device), right=True)))
        q1 = min(q1, query.numel())
        rep = torch.repeat_interleave(torch.arange(q0, q1, device=device), n[q0:q1])
        if rep.numel():
            k = torch.arange(rep.numel(), device=device) - (ends[rep] - n[rep] - base)
            w = dst[start[u[rep]] + k]
            look = w * num_nodes + v[rep]
            pos = torch.searchsorted(keys, look).clamp_max(keys.numel() - 1)
            support.index_add_(0, rep, (keys[pos] == look).to(torch.long))
        q0 = q1
    return support


def triangles(num_nodes: int, edges: Tensor, chunk: int = 1 << 22, max_lookups: int | None = None) -> Tensor | None:
    """Every triangle of an undirected simple graph, once: (T, 3) int64 edge rows (xy, xz, yz);
    None when finding them would take more than `max_lookups` lookups (a bound on T).

    edges (E, 2) without duplicates. Nodes are ranked by (degree, index) and each edge points from
    its lower- to its higher-ranked end; a triangle x < y < z (in rank) is found from its edge
    x -> y, among the later out-neighbours z of x, by looking y-z up in the sorted edge keys. The
    work is the sum of squared out-degrees (O(E^1.5)), done in chunks of at most `chunk` lookups.
    """
    device = edges.device
    out = torch.zeros(0, 3, dtype=torch.long, device=device)
    if edges.shape[0] < 3:
        return out
    a, b = edges[:, 0].long(), edges[:, 1].long()
    deg = torch.bincount(torch.cat([a, b]), minlength=num_nodes)
    rank = torch.empty(num_nodes, dtype=torch.long, device=device)
    rank[torch.argsort(deg * num_nodes + torch.arange(num_nodes, device=device))] = torch.arange(
        num_nodes, device=device)
    up = rank[a] < rank[b]
    lo, hi = torch.where(up, a, b), torch.where(up, b, a)
    order = torch.argsort(lo * num_nodes + rank[hi])  # out-lists by source, targets in rank order
    src, dst = lo[order], hi[order]
    ends = torch.cumsum(torch.bincount(src, minlength=num_nodes), 0)
    later = ends[src] - 1 - torch.arange(src.numel(), device=device)  # out-neighbours after dst
    ukey = torch.minimum(a, b) * num_nodes + torch.maximum(a, b)
    skey, srow = torch.sort(ukey)
    total = torch.cumsum(later, 0)
    if max_lookups is not None and total.numel() and int(total[-1]) > max_lookups:
        return None
    found, p0 = [], 0
    while p0 < src.numel():
        base = int(total[p0 - 1]) if p0 else 0
        p1 = max(p0 + 1, int(torch.searchsorted(total, torch.tensor(base + chunk, device=device), right=True)))
        p1 = min(p1, src.numel())
        rep = torch.repeat_interleave(torch.arange(p0, p1, device=device), later[p0:p1])
        if rep.numel():
            q = rep + 1 + torch.arange(rep.numel(), device=device) - (total[rep] - later[rep] - base)
            y, z = dst[rep], dst[q]
            look = torch.minimum(y, z) * num_nodes + torch.maximum(y, z)
            pos = torch.searchsorted(skey, look).clamp_max(skey.numel() - 1)
            hit = skey[pos] == look
            found.append(torch.stack([order[rep[hit]], order[q[hit]], srow[pos[hit]]], 1))
        p0 = p1
    return torch.cat(found) if found else out


def largest_component(num_nodes: int, edges: Tensor, mask: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """(node mask (N,) bool of the largest component with at least one edge, labels (N,)).

    Ties go to the component with the smallest node index. With no usable edge the mask is all
    False: a single image is not a reconstruction.
    """
    labels = connected_components(num_nodes, edges, mask)
    used = edges if mask is None else edges[mask]
    if used.numel() == 0:
        return torch.zeros(num_nodes, dtype=torch.bool, device=edges.device), labels
    touched = torch.zeros(num_nodes, dtype=torch.bool, device=edges.device)
    touched[used.reshape(-1)] = True
    sizes = torch.bincount(labels[touched], minlength=num_nodes)
    best = torch.argmax(sizes)  # argmax returns the first maximum: the smallest label
    return (labels == best) & touched, labels


@dataclass
class SpanningTree:
    """A rooted spanning tree of one component. Rows outside it have parent = -1."""

    root: int
    parent: Tensor  # (N,) int64 parent node, -1 for the root and nodes outside the tree
    parent_edge: Tensor  # (N,) int64 row of the edge to the parent, -1 likewise
    in_tree: Tensor  # (N,) bool: reached from the root


def maximum_spanning_tree(
    num_nodes: int, edges: Tensor, weights: Tensor, mask: Tensor | None = None, root: int | None = None
) -> SpanningTree:
    """Maximum-weight spanning tree of the component of `root`, rooted there.

    root defaults to the node with the largest summed edge weight (a central node keeps the tree
    shallow, so errors compound over fewer hops). Parallel edges keep the heaviest one.
    """
    device = edges.device
    idx = torch.arange(edges.shape[0], device=device)
    if mask is not None:
        idx = idx[mask]
    e = edges[idx].cpu().numpy()
    w = weights[idx].detach().cpu().numpy().astype(np.float64)
    parent = np.full(num_nodes, -1, dtype=np.int64)
    parent_edge = np.full(num_nodes, -1, dtype=np.int64)
    in_tree = np.zeros(num_nodes, dtype=bool)
    if e.shape[0] == 0:
        r = 0 if root is None else int(root)
        in_tree[r] = num_nodes > 0
        return _tree(r, parent, parent_edge, in_tree, device)
    lo, hi = np.minimum(e[:, 0], e[:, 1]), np.maximum(e[:, 0], e[:, 1])
    # Keep the heaviest of parallel edges: sort by (key, -weight) and take the first of each key.
    key = lo * num_nodes + hi
    order = np.lexsort((-w, key))
    first = np.ones(order.size, dtype=bool)
    first[1:] = key[order][1:] != key[order][:-1]
    keep = order[first]
    lo, hi, w, eid = lo[keep], hi[keep], w[keep], idx.cpu().numpy()[keep]
    if root is None:
        strength = np.bincount(lo, w, num_nodes) + np.bincount(hi, w, num_nodes)
        root = int(np.argmax(strength))
    # MST depends only on the order of weights: map to positive costs, heaviest -> cheapest
    # (scipy treats explicit zeros as missing edges).
    cost = (w.max() - w) + 1.0
    G = coo_matrix((cost, (lo, hi)), shape=(num_nodes, num_nodes)).tocsr()
    T = minimum_spanning_tree(G).tocoo()
    order_nodes, pred = breadth_first_order(T, root, directed=False, return_predecessors=True)
    in_tree[order_nodes] = True
    child = order_nodes[order_nodes != root]
    parent[child] = pred[child]
    # Edge row of each (child, parent) link, looked up by the undirected key.
    tkey = np.minimum(child, parent[child]) * num_nodes + np.maximum(child, parent[child])
    skey = lo * num_nodes + hi
    srt = np.argsort(skey)
    parent_edge[child] = eid[srt[np.searchsorted(skey[srt], tkey)]]
    return _tree(root, parent, parent_edge, in_tree, device)


def _tree(root, parent, parent_edge, in_tree, device) -> SpanningTree:
    t = lambda a: torch.from_numpy(a).to(device)  # noqa: E731
    return SpanningTree(int(root), t(parent), t(parent_edge), t(in_tree))


def compose_along_tree(parent: Tensor, local: Tensor) -> Tensor:
    """Absolute transforms from child-from-parent ones by pointer doubling (O(log depth) rounds).

    local (N, d, d): node_from_parent for every node (ignored for the root and nodes outside the
    tree, which get the identity). Returns node_from_root (N, d, d).
    """
    n, d = local.shape[0], local.shape[-1]
    eye = torch.eye(d, dtype=local.dtype, device=local.device).expand(n, d, d)
    has = parent >= 0
    A = torch.where(has[:, None, None], local, eye)
    anc = torch.where(has, parent, torch.arange(n, device=parent.device))
    # Invariant: A[v] = v_from_anc[v]; the root and outside nodes are their own ancestor with
    # A = I. Doubling: v_from_anc[anc[v]] = v_from_anc[v] @ anc[v]_from_anc[anc[v]].
    while True:
        nxt = anc[anc]
        if torch.equal(nxt, anc):
            return A
        A = A @ A[anc]
        anc = nxt


def stage_copy(rec: Reconstruction, *fields: str) -> Reconstruction:
    """A new Reconstruction sharing every tensor with `rec`, with its own meta dict and fresh
    (shallow) containers for `fields`, whose tensors the stage then replaces rather than edits in
    place. Cheaper than `clone()`, which would copy every keypoint and match."""
    out = Reconstruction(rec.cameras, rec.images, rec.keypoints, rec.points3D, rec.tracks, rec.view_graph,
                         dict(rec.meta))
    for name in fields:
        setattr(out, name, dataclasses.replace(getattr(rec, name)))
    return out


def image_reasons(meta: dict, num_images: int) -> list[str]:
    """The per-image reason list in `meta`, created when absent."""
    reasons = meta.get("image_reason")
    if reasons is None or len(reasons) != num_images:
        reasons = [""] * num_images
        meta["image_reason"] = reasons
    return reasons


def mark_images(meta: dict, num_images: int, dropped: Tensor, reason: str) -> int:
    """Record `reason` for images in `dropped` (bool (I,)) that have no reason yet. Returns how
    many were newly marked."""
    reasons = list(image_reasons(meta, num_images))  # copy: clones share the meta's list
    meta["image_reason"] = reasons
    n = 0
    for i in torch.nonzero(dropped, as_tuple=True)[0].tolist():  # report bookkeeping, not a hot path
        if not reasons[i]:
            reasons[i] = reason
            n += 1
    return n


def active_images(meta: dict, num_images: int, device=None) -> Tensor:
    """(I,) bool: images without a recorded drop reason."""
    reasons = image_reasons(meta, num_images)
    return torch.tensor([not r for r in reasons], dtype=torch.bool, device=device)
