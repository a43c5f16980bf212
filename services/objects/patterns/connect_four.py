"""Connect Four's rules, apart from any object: a board, a drop, and what a drop decides.

Kept pure (no storage, no sockets) so the Game object's rules can be read and tested alone,
and another board game can replace them without touching how the object stores, validates
its input, sequences its diffs and forfeits absent players.

The board is a list of ``ROWS`` rows of ``COLUMNS`` cells, row 0 at the bottom; a cell holds 0
(empty) or the seat (1 or 2) whose disc it is. Plain lists, so it is stored and sent as it is.
"""

from __future__ import annotations

ROWS = 6
COLUMNS = 7
CONNECT = 4

#: the four directions a line can run in (the opposite ones are walked from the same cell)
_DIRECTIONS = ((0, 1), (1, 0), (1, 1), (1, -1))


def empty_board() -> list[list[int]]:
    return [[0] * COLUMNS for _ in range(ROWS)]


def landing_row(board: list[list[int]], column: int) -> int | None:
    """The row a disc dropped in ``column`` lands in, or None when the column is full."""
    for row in range(ROWS):
        if board[row][column] == 0:
            return row
    return None


def winning_line(board: list[list[int]], row: int, column: int) -> list[list[int]] | None:
    """The cells ([row, column]) of a line of at least four through the disc at (row, column),
    or None: only lines through the last disc can be new, so that is all a move needs to check."""
    seat = board[row][column]
    if seat == 0:
        return None
    for dr, dc in _DIRECTIONS:
        line = [[row, column]]
        for sign in (1, -1):
            r, c = row + sign * dr, column + sign * dc
            while 0 <= r < ROWS and 0 <= c < COLUMNS and board[r][c] == seat:
                line.append([r, c])
                r, c = r + sign * dr, c + sign * dc
        if len(line) >= CONNECT:
            return sorted(line)
    return None


def is_full(board: list[list[int]]) -> bool:
    """No empty cell left: with no line, the game is a draw."""
    return all(cell != 0 for cell in board[ROWS - 1])
