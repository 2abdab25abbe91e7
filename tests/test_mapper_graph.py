import numpy as np
import torch
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import connected_components as scipy_components

from torchsfm.geometry import so3
from torchsfm.mapper.graph import (
    REASON_COMPONENT,
    active_images,
    compose_along_tree,
    connected_components,
    largest_component,
    mark_images,
    maximum_spanning_tree,
)


def test_connected_components_match_scipy(device):
    g = torch.Generator().manual_seed(0)
    N = 5000
    edges = torch.randint(0, N, (4000, 2), generator=g)
    labels = connected_components(N, edges.to(device)).cpu()
    n, ref = scipy_components(coo_matrix((np.ones(len(edges)), (edges[:, 0].numpy(), edges[:, 1].numpy())),
                                         shape=(N, N)), directed=False)
    ref = torch.from_numpy(ref)
    # Same partition: the (ours, scipy) label pairs are in bijection with the components.
    assert torch.unique(labels).numel() == n
    assert torch.unique(torch.stack([labels, ref], 1), dim=0).shape[0] == n
    # Label = smallest node of the component.
    smallest = torch.full((n,), N, dtype=torch.long).scatter_reduce(0, ref, torch.arange(N), "amin")
    assert torch.equal(labels, smallest[ref])


def test_connected_components_long_chain_and_mask(device):
    N = 3000
    perm = torch.randperm(N, generator=torch.Generator().manual_seed(1))
    edges = torch.stack([perm[:-1], perm[1:]], 1).to(device)  # one long path in random order
    assert bool((connected_components(N, edges) == 0).all())
    mask = torch.ones(N - 1, dtype=torch.bool, device=device)
    mask[1000] = False  # cut the path in two
    labels = connected_components(N, edges, mask)
    assert torch.unique(labels).numel() == 2


def test_largest_component_picks_biggest(device):
    # Clique on 0..4, triangle on 5..7, node 8 isolated, an edge 9-10 masked out.
    e = [(a, b) for a in range(5) for b in range(a + 1, 5)] + [(5, 6), (6, 7), (5, 7), (9, 10)]
    edges = torch.tensor(e, device=device)
    mask = torch.ones(len(e), dtype=torch.bool, device=device)
    mask[-1] = False
    comp, labels = largest_component(11, edges, mask)
    assert comp.cpu().tolist() == [True] * 5 + [False] * 6
    none, _ = largest_component(11, edges, torch.zeros_like(mask))
    assert not bool(none.any())


def test_maximum_spanning_tree_and_composition(device):
    # Square 0-1-2-3-0 plus diagonal 0-2; the light edges (1-2 and 0-2) must be left out.
    edges = torch.tensor([[0, 1], [1, 2], [2, 3], [0, 3], [0, 2]], device=device)
    w = torch.tensor([10.0, 1.0, 9.0, 8.0, 2.0], device=device)
    tree = maximum_spanning_tree(4, edges, w)
    in_tree = set(tree.parent_edge[tree.parent >= 0].cpu().tolist())
    assert in_tree == {0, 2, 3}
    assert tree.root == 0  # largest summed weight (10 + 8 + 2)
    assert bool(tree.in_tree.all())

    # Composition along a deep random tree (a path) reproduces absolute rotations.
    N = 700
    g = torch.Generator().manual_seed(2)
    R = so3.random_rotation(N, g).to(device)
    path = torch.randperm(N, generator=g).to(device)
    e = torch.stack([path[:-1], path[1:]], 1)
    tree = maximum_spanning_tree(N, e, torch.ones(N - 1, device=device))
    parent = tree.parent.clamp_min(0)
    local = R @ R[parent].transpose(-1, -2)
    A = compose_along_tree(tree.parent, local) @ R[tree.root]
    assert torch.allclose(A, R, atol=1e-10)


def test_image_reasons_first_wins_and_copy_on_write():
    meta = {}
    mark_images(meta, 4, torch.tensor([True, False, False, False]), REASON_COMPONENT)
    shared = dict(meta)  # a clone shares the list
    mark_images(shared, 4, torch.tensor([True, True, False, False]), "other")
    assert meta["image_reason"] == [REASON_COMPONENT, "", "", ""]
    assert shared["image_reason"] == [REASON_COMPONENT, "other", "", ""]
    assert active_images(shared, 4).tolist() == [False, False, True, True]


def test_edge_triangle_support_known_answer_and_chunking():
    from torchsfm.mapper.graph import certified_support, edge_triangle_support

    # a square 0-1-2-3 with the diagonal 0-2, a pendant edge 3-4 and a duplicate of 0-1
    edges = torch.tensor([[0, 1], [1, 2], [2, 3], [3, 0], [0, 2], [3, 4], [1, 0]])
    expect = torch.tensor([1, 1, 1, 1, 2, 0, 1])
    q = torch.arange(edges.shape[0])
    assert torch.equal(edge_triangle_support(5, edges, q), expect)
    assert torch.equal(edge_triangle_support(5, edges, q, chunk=1), expect)
    # MinHash never certifies more than there is
    for k in (1, 2, 3):
        assert not bool((certified_support(5, edges, q, k) & (expect < k)).any())


def test_certified_support_proves_dense_cliques():
    from torchsfm.mapper.graph import certified_support

    n = 12
    i, j = torch.triu_indices(n, n, 1)
    edges = torch.stack([i, j], 1)
    q = torch.arange(edges.shape[0])
    assert bool(certified_support(n, edges, q, 2).all())  # every edge closes 10 triangles


def test_certified_support_of_few_queries_in_a_large_graph():
    """With few queried edges, only the graph around their ends is hashed (renumbered nodes):
    the same proofs, never more than the exact count."""
    from torchsfm.mapper.graph import certified_support, edge_triangle_support

    n = 12
    i, j = torch.triu_indices(n, n, 1)
    clique = torch.stack([i, j], 1) + 50_000
    path = torch.stack([torch.arange(0, 999), torch.arange(1, 1000)], 1) * 7
    edges = torch.cat([path, clique])
    q = torch.tensor([3, 500, 999, 1000, 1050])  # two path edges, three clique edges
    assert 4 * q.numel() < edges.shape[0]
    got = certified_support(60_000, edges, q, 2)
    assert got.tolist() == [False, False, True, True, True]
    exact = edge_triangle_support(60_000, edges, q)
    assert exact.tolist() == [0, 0, 10, 10, 10]


def test_connected_components_in_edge_chunks_equal_one_pass(monkeypatch):
    import torchsfm.runtime.chunks as chunks
    from torchsfm.mapper.graph import connected_components

    g = torch.Generator().manual_seed(3)
    edges = torch.randint(0, 400, (300, 2), generator=g)
    whole = connected_components(400, edges)
    monkeypatch.setattr(chunks, "CPU_CHUNK_ROWS", 7)
    assert torch.equal(connected_components(400, edges), whole)
    # every edge joins one component, labelled by its smallest node
    assert torch.equal(whole[edges[:, 0]], whole[edges[:, 1]])
    assert bool((whole <= torch.arange(400)).all())
