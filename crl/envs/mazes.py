"""Maze layouts shared by the point-mass, ant and humanoid mazes.

A layout is a list of strings, one row each: '#' is a wall cell, 'R' the start cell of the agent,
'.' a free cell. Every free cell (and 'R') can hold a goal. Cell (row i, column j) has its centre at
world coordinates ((i - i_R) * cell_size, (j - j_R) * cell_size): the start cell is the origin.
"""
from __future__ import annotations

import collections
from typing import Dict, List, Sequence, Tuple

import numpy as np

LAYOUTS: Dict[str, List[str]] = {
    # Open room: no inner walls; the sanity check of every learning test.
    "open": [
        "#######",
        "#R....#",
        "#.....#",
        "#.....#",
        "#.....#",
        "#######",
    ],
    # The classic U: the goal at the tip of the U is close in a straight line but far by path.
    "u": [
        "#####",
        "#R..#",
        "###.#",
        "#...#",
        "#####",
    ],
    # U with arms 4 cells long.
    "u4": [
        "######",
        "#R...#",
        "####.#",
        "#....#",
        "######",
    ],
    # U with arms 5 cells long.
    "u5": [
        "#######",
        "#R....#",
        "#####.#",
        "#.....#",
        "#######",
    ],
    "big": [
        "########",
        "#R.##..#",
        "#..#...#",
        "##...###",
        "#..#...#",
        "#.#..#.#",
        "#...#..#",
        "########",
    ],
    "hardest": [
        "############",
        "#R...#.....#",
        "#.##.#.#.#.#",
        "#......#...#",
        "#.####.###.#",
        "#..#.#.....#",
        "##.#.#.#.###",
        "#..#...#...#",
        "############",
    ],
}


def layout(name: str) -> List[str]:
    if name not in LAYOUTS:
        raise ValueError(f"unknown maze layout {name!r}; choose one of {sorted(LAYOUTS)}")
    return LAYOUTS[name]


def grid(name: str) -> np.ndarray:
    """Boolean wall grid [rows, cols] (True = wall)."""
    return np.array([[c == "#" for c in row] for row in layout(name)], dtype=bool)


def start_cell(name: str) -> Tuple[int, int]:
    for i, row in enumerate(layout(name)):
        j = row.find("R")
        if j >= 0:
            return i, j
    raise ValueError(f"maze {name!r} has no start cell 'R'")


def free_cells(name: str) -> np.ndarray:
    """[n, 2] int array of (row, col) of every non-wall cell, row-major order."""
    return np.argwhere(~grid(name))


def cell_centres(name: str, cell_size: float) -> np.ndarray:
    """[n, 2] float32 world (x, y) of the centre of every free cell, in free_cells order."""
    i0, j0 = start_cell(name)
    cells = free_cells(name)
    return ((cells - np.array([i0, j0])) * cell_size).astype(np.float32)


def wall_boxes(name: str, cell_size: float) -> np.ndarray:
    """[m, 4] float32 (x_min, y_min, x_max, y_max) of every wall cell in world coordinates."""
    i0, j0 = start_cell(name)
    walls = np.argwhere(grid(name))
    centres = (walls - np.array([i0, j0])) * cell_size
    half = cell_size / 2
    return np.concatenate([centres - half, centres + half], axis=1).astype(np.float32)


def shortest_path_cells(name: str, source: Sequence[int]) -> np.ndarray:
    """BFS distance (in cells, 4-connected) from `source` (row, col) to every cell; -1 for walls
    and unreachable cells. Used by the critic analysis (learned vs. true path distance)."""
    g = grid(name)
    dist = -np.ones(g.shape, dtype=np.int32)
    src = tuple(source)
    if g[src]:
        raise ValueError(f"source cell {src} of maze {name!r} is a wall")
    dist[src] = 0
    queue = collections.deque([src])
    while queue:
        i, j = queue.popleft()
        for di, dj in ((1, 0), (-1, 0), (0, 1), (0, -1)):
            ni, nj = i + di, j + dj
            if 0 <= ni < g.shape[0] and 0 <= nj < g.shape[1] and not g[ni, nj] and dist[ni, nj] < 0:
                dist[ni, nj] = dist[i, j] + 1
                queue.append((ni, nj))
    return dist
