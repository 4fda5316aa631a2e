"""`inspect()` reports: matched sites and rejected candidates, as data and as a table.

Invariant: building a report never runs a chipmunk op and never changes the model.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class SiteRow:
    kind: str
    pattern: str
    path: str
    layer: int
    shapes: dict
    grouping: str = ""


@dataclass
class RejectedRow:
    kind: str
    pattern: str
    path: str
    reason: str
    shapes: dict


@dataclass
class Report:
    sites: list[SiteRow] = field(default_factory=list)
    rejected: list[RejectedRow] = field(default_factory=list)
    graphs: int = 0
    config: str = ""  # the config traced with and its source ("flux (the compiled model's options)")

    def count(self, kind: str) -> int:
        return sum(s.kind == kind for s in self.sites)

    def __str__(self) -> str:
        lines = [f"chipmunk: {len(self.sites)} sites ({self.count('attention')} attention, "
                 f"{self.count('mlp')} mlp) in {self.graphs} graph(s); {len(self.rejected)} rejected"]
        if self.config:
            lines.append(f"config: {self.config}")
        if self.sites:
            lines.append(_table(["kind", "pattern", "layer", "module", "shapes", "grouping"],
                                [[s.kind, s.pattern, str(s.layer), s.path or "<top>", _fmt(s.shapes), s.grouping]
                                 for s in self.sites]))
        if self.rejected:
            lines.append("rejected:")
            lines.append(_table(["kind", "pattern", "module", "reason", "shapes"],
                                [[r.kind, r.pattern, r.path or "<top>", r.reason, _fmt(r.shapes)] for r in self.rejected]))
        for kind, what in (("attention", "softmax attention (SDPA or explicit softmax(QKᵀ)V)"),
                           ("mlp", "linear → activation → linear MLP")):
            if not any(r.kind == kind for r in (*self.sites, *self.rejected)):
                lines.append(f"no {what} found: a linear attention, a convolutional feed-forward or a "
                             f"fused kernel stays as it is (README: Adding an architecture)")
        return "\n".join(lines)

    __repr__ = __str__


def _fmt(shapes: dict) -> str:
    return " ".join(f"{k}={'x'.join(str(d) for d in v)}" for k, v in shapes.items() if v is not None)


def _table(header: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(str(x)) for x in col) for col in zip(header, *rows)]
    fmt = "  ".join("{:<%d}" % w for w in widths)
    out = [fmt.format(*header), fmt.format(*["-" * w for w in widths])]
    out += [fmt.format(*r) for r in rows]
    return "\n".join(out)
