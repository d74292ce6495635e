"""Maze layouts shared by the point-mass, ant and humanoid mazes.

A layout is a list of strings, one row each: '#' is a wall cell, 'R' the start cell of the agent,
'G' a free cell that can hold a goal, '.' a free cell that cannot. A layout without any 'G' (the
point-mass rooms) takes every free cell other than 'R' as a goal cell. Cell (row i, column j) has
its centre at world coordinates ((i - i_R) * cell_size, (j - j_R) * cell_size): the start cell is
the origin. (The authors' code puts cell (0, 0) at the origin instead: a constant translation.)

The ant and humanoid layouts are those of the authors' code (scaling-crl, envs/ant_maze.py and
envs/humanoid_maze.py: rows are x, columns y, 'r' start, 'g' goal, 1 wall, 0 free), including the
`_eval` layouts their jobs evaluate on: the same walls and start cell, fewer goal cells (the far
end of the maze). `humanoid_big_eval` is the humanoid's own big-maze eval layout (one goal cell
more than the ant's: row 2, column 5).
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
        "#RGG#",
        "###G#",
        "#GGG#",
        "#####",
    ],
    "u_eval": [
        "#####",
        "#R..#",
        "###.#",
        "#GGG#",
        "#####",
    ],
    # Snake-like U4 (7 x 5): the farthest goal is 10 cells away by path, 2 in a straight line.
    "u4": [
        "#####",
        "#GGG#",
        "#R#G#",
        "###G#",
        "#G#G#",
        "#GGG#",
        "#####",
    ],
    "u4_eval": [
        "#####",
        "#...#",
        "#R#.#",
        "###.#",
        "#G#.#",
        "#GGG#",
        "#####",
    ],
    # U5 (7 x 8): the farthest goal is 16 cells away by path, 2 in a straight line.
    "u5": [
        "########",
        "#GGGGGG#",
        "#R####G#",
        "######G#",
        "#G####G#",
        "#GGGGGG#",
        "########",
    ],
    "u5_eval": [
        "########",
        "#......#",
        "#R####.#",
        "######.#",
        "#G####G#",
        "#GGGGGG#",
        "########",
    ],
    "big": [
        "########",
        "#RG##GG#",
        "#GG#GGG#",
        "##GGG###",
        "#GG#GGG#",
        "#G#GG#G#",
        "#GGG#GG#",
        "########",
    ],
    "big_eval": [
        "########",
        "#R.##GG#",
        "#..#..G#",
        "##...###",
        "#..#...#",
        "#.#G.#G#",
        "#.GG#GG#",
        "########",
    ],
    "humanoid_big_eval": [
        "########",
        "#R.##GG#",
        "#..#.GG#",
        "##...###",
        "#..#...#",
        "#.#G.#G#",
        "#.GG#GG#",
        "########",
    ],
    "hardest": [
        "############",
        "#RGGG#GGGGG#",
        "#G##G#G#G#G#",
        "#GGGGGG#GGG#",
        "#G####G###G#",
        "#GG#G#GGGGG#",
        "##G#G#G#G###",
        "#GG#GGG#GGG#",
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


def goal_cells(name: str) -> np.ndarray:
    """[n, 2] int array of (row, col) of every goal cell ('G'; without any 'G': every free cell
    other than the start), row-major order."""
    rows = layout(name)
    g = np.array([[c == "G" for c in row] for row in rows], dtype=bool)
    if not g.any():
        g = ~grid(name)
        g[start_cell(name)] = False
    return np.argwhere(g)


def check_same_maze(name: str, other: str) -> None:
    """Raises ValueError unless layouts `name` and `other` have the same walls and start cell
    (an `_eval` layout differs from its training layout only in its goal cells)."""
    if grid(name).shape != grid(other).shape or (grid(name) != grid(other)).any():
        raise ValueError(f"maze layouts {name!r} and {other!r} have different walls")
    if start_cell(name) != start_cell(other):
        raise ValueError(f"maze layouts {name!r} and {other!r} have different start cells")


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
