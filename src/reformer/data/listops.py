"""ListOps (Long Range Arena, Tay et al. 2021; after Nangia and Bowman 2018): nested list
operations over the digits 0-9, whose value (one of 10 classes) depends on every token.

    [MAX 4 3 [MIN 2 3 ] 1 0 [MED 1 5 8 9 2 ] ]  ->  5

Specification, as the LRA paper gives it: the operators MAX, MIN, MED (the median, rounded
down for an even count) and SM (the sum modulo 10); trees of depth at most 10, each operator
with at most 10 arguments; sequences of 500 to 2,000 tokens; 10 classes. The generator here
is our own: each argument is a digit or, below the depth limit, a new operator with
probability ``p_branch``, and trees outside the length range are drawn again.

Examples are made on demand and are a pure function of (seed, split, index): the training,
validation and test sets never share an example by construction (their generators are seeded
apart) and need no files. Tokens: 0 padding, then ``VOCAB``'s symbols.

Shapes: L length (at most ``max_length``).
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from reformer.config import fail, is_int

OPERATORS = ("[MAX", "[MIN", "[MED", "[SM")
CLOSE = "]"
VOCAB = ("<pad>", *OPERATORS, CLOSE, *"0123456789")  # id = index; 0 pads
TOKEN_ID = {symbol: i for i, symbol in enumerate(VOCAB)}
SPLITS = {"train": 0, "validation": 1, "test": 2}
N_CLASSES = 10

Tree = tuple[str, list]  # (operator, arguments: digits and trees)


def evaluate(tree: Tree | int) -> int:
    """The value of a tree (or a digit)."""
    if isinstance(tree, int):
        return tree
    op, args = tree
    values = sorted(evaluate(a) for a in args)
    if op == "[MAX":
        return values[-1]
    if op == "[MIN":
        return values[0]
    if op == "[MED":
        mid = len(values) // 2
        return values[mid] if len(values) % 2 else (values[mid - 1] + values[mid]) // 2
    return sum(values) % 10  # [SM


def tokens(tree: Tree | int) -> list[str]:
    """The tree written out: ``[OP arg arg ... ]``."""
    if isinstance(tree, int):
        return [str(tree)]
    op, args = tree
    out = [op]
    for a in args:
        out += tokens(a)
    return out + [CLOSE]


def parse(symbols: Sequence[str]) -> Tree:
    """The inverse of :func:`tokens` (ValueError on a malformed sequence)."""
    stack: list[Tree] = []
    root = None
    for s in symbols:
        if s in OPERATORS:
            node: Tree = (s, [])
            if stack:
                stack[-1][1].append(node)
            stack.append(node)
        elif s == CLOSE:
            if not stack:
                raise ValueError("']' closes nothing")
            root = stack.pop()
        elif s.isdigit() and len(s) == 1 and stack:
            stack[-1][1].append(int(s))
        else:
            raise ValueError(f"unexpected symbol {s!r}")
    if stack or root is None:
        raise ValueError("the sequence does not close its first operator")
    return root


@dataclass(frozen=True)
class ListOpsSpec:
    """How examples are drawn (the LRA defaults)."""

    max_depth: int = 10
    max_args: int = 10
    min_length: int = 500
    max_length: int = 2000
    p_branch: float = 0.25  # an argument below the depth limit is an operator

    def __post_init__(self) -> None:
        for name in ("max_depth", "max_args", "min_length", "max_length"):
            if not is_int(getattr(self, name)) or getattr(self, name) < 1:
                fail(name, getattr(self, name), "must be a positive integer",
                     f"pass e.g. {name}={getattr(ListOpsSpec, name)}")
        if self.min_length > self.max_length:
            fail("min_length", self.min_length, f"exceeds max_length={self.max_length}",
                 "lower min_length or raise max_length")
        if not 0 < self.p_branch < 1:
            fail("p_branch", self.p_branch, "must lie in (0, 1)", "pass e.g. 0.25")


def draw_tree(rng: random.Random, spec: ListOpsSpec, depth: int = 1) -> Tree:
    """One random operator node at ``depth`` (1 = the root) with its arguments."""
    args: list = []
    for _ in range(rng.randint(1, spec.max_args)):
        if depth < spec.max_depth and rng.random() < spec.p_branch:
            args.append(draw_tree(rng, spec, depth + 1))
        else:
            args.append(rng.randrange(10))
    return (rng.choice(OPERATORS), args)


def example(seed: int, split: str, index: int, spec: ListOpsSpec = ListOpsSpec()
            ) -> tuple[list[str], int]:
    """Example ``index`` of ``split``: (its symbols, its value); the same on every call."""
    if split not in SPLITS:
        fail("split", split, "is unknown", f"use one of {sorted(SPLITS)}")
    rng = random.Random(f"listops/{seed}/{split}/{index}")  # str seeds hash stably (sha512)
    while True:
        tree = draw_tree(rng, spec)
        symbols = tokens(tree)
        if spec.min_length <= len(symbols) <= spec.max_length:
            return symbols, evaluate(tree)


def encode(symbols: Sequence[str]) -> torch.Tensor:
    """Symbols -> (L,) token ids."""
    return torch.tensor([TOKEN_ID[s] for s in symbols], dtype=torch.long)


def batch(seed: int, split: str, indices: Sequence[int], spec: ListOpsSpec = ListOpsSpec()
          ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Examples ``indices`` of ``split`` padded to ``spec.max_length``: ids (B, L), attention
    mask (B, L) (True = real token) and labels (B,)."""
    ids = torch.zeros(len(indices), spec.max_length, dtype=torch.long)
    labels = torch.empty(len(indices), dtype=torch.long)
    for row, i in enumerate(indices):
        symbols, value = example(seed, split, i, spec)
        ids[row, :len(symbols)] = encode(symbols)
        labels[row] = value
    return ids, ids != 0, labels
