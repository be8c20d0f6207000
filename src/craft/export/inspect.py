"""`craft inspect ADAPTER_DIR [--plot out.png]`: per-layer norms of a Control Adapter (or a PEFT LoRA).

For each adapted layer, with W = s·B·A (symmetric: A = Qᵀ, B = Q·diag(eˢ − 1), s = 1), computed exactly from the
factors without forming the hidden × hidden matrix: thin QRs `B = Q_B R_B`, `Aᵀ = Q_A R_A` give
`W = Q_B (s R_B R_Aᵀ) Q_Aᵀ`, so the singular values of W are those of the r × r matrix `s R_B R_Aᵀ`:

* `fro`    ‖W‖_F = √(Σ σᵢ²);
* `spec`   ‖W‖₂ = σ_max;
* `margin` 1 − ‖W‖₂: the Neumann series for (I + W)⁻¹ converges when it is positive (‖W‖₂ < 1 is sufficient),
  and its truncation error after order n is at most ‖W‖₂ⁿ⁺¹ / margin;
* `orth`   ‖QᵀQ − I‖_F, symmetric adapters only (W's nonzero eigenvalues are e^S − 1 only when it is 0).

For a PEFT LoRA the same norms are given per adapted module (W = scale·B·A; fused experts: the largest over
experts), without margin.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from pathlib import Path

import torch

from craft.errors import UserError, first_line
from craft.export.control import adapter_modules, read_control_adapter_file
from craft.export.lora import adapter_kind, read_lora


@dataclass
class Row:
    name: str
    fro: float
    spec: float
    margin: float | None = None
    orth: float | None = None


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("adapter_dir", help="Control Adapter (or PEFT LoRA) directory")
    parser.add_argument("--plot", default=None, metavar="OUT.png", help="also save a plot of the norms per layer")


def run(args: argparse.Namespace) -> int:
    if args.plot:
        check_plot_path(args.plot)
    rows = inspect_adapter(args.adapter_dir)
    print(format_table(rows))
    worst = max(rows, key=lambda row: row.spec)
    print(f"max ||W||_2 = {worst.spec:.6g} ({worst.name})"
          + (" -- the Neumann series diverges there" if worst.margin is not None and worst.margin <= 0 else ""))
    if args.plot:
        plot(rows, args.plot)
        print(f"plot written to {args.plot}")
    return 0


def check_plot_path(path: str) -> None:
    """Refuse a --plot path that is a directory, has no image suffix (matplotlib would silently append `.png`, so
    the file would not be where the command said) or lies in a directory that does not exist."""
    target = Path(path)
    if target.is_dir():
        raise UserError(f"--plot {path} is a directory; give a file name such as {target / 'norms.png'}")
    if not target.suffix:
        raise UserError(f"--plot {path}: give a file name with an image suffix (.png, .pdf, .svg)")
    folder = target.resolve().parent
    if not folder.is_dir():
        raise UserError(f"--plot {path}: the directory {folder} does not exist")


def singular_values(a: torch.Tensor, b: torch.Tensor, s: float) -> torch.Tensor:
    """Singular values of s·B·A (B `(h, r)`, A `(r, h)`), from the r × r core (module docstring), in float64."""
    _, r_b = torch.linalg.qr(b.double())
    _, r_a = torch.linalg.qr(a.double().T)
    return torch.linalg.svdvals(s * r_b @ r_a.T)


def inspect_adapter(adapter_dir) -> list[Row]:
    """One `Row` per adapted layer (Control Adapter) or module (LoRA)."""
    kind, _ = adapter_kind(adapter_dir)
    if kind == "control":
        rows = []
        with torch.no_grad():
            for layer, module in adapter_modules(read_control_adapter_file(adapter_dir)).items():
                a, b, s = module.factors()
                sigma = singular_values(a, b, s)
                orth = None
                if module.type == "symmetric":
                    q = module.Q.double()
                    orth = float(torch.linalg.matrix_norm(q.T @ q - torch.eye(q.shape[1], dtype=q.dtype)))
                spec = float(sigma.max())
                rows.append(Row(f"layer {layer}", float(sigma.norm()), spec, 1.0 - spec, orth))
        return rows
    if kind == "multiplicative":
        raise UserError(f"{adapter_dir} is a multiplicative LoRA; inspect the Control Adapter it came from")
    rows = []
    for name, update in read_lora(adapter_dir).items():
        A, B = (update.A, update.B) if update.A.dim() == 3 else (update.A[None], update.B[None])
        sigmas = [singular_values(a, b, update.scale) for a, b in zip(A, B)]
        rows.append(Row(name, max(float(s.norm()) for s in sigmas), max(float(s.max()) for s in sigmas)))
    return rows


def format_table(rows: list[Row]) -> str:
    has_margin = any(row.margin is not None for row in rows)
    has_orth = any(row.orth is not None for row in rows)
    header = ["adapter", "||W||_F", "||W||_2"] + (["1-||W||_2"] if has_margin else []) + (
        ["||Q^TQ-I||_F"] if has_orth else [])
    lines = []
    for row in rows:
        cells = [row.name, f"{row.fro:.6g}", f"{row.spec:.6g}"]
        if has_margin:
            cells.append(f"{row.margin:.6g}")
        if has_orth:
            cells.append(f"{row.orth:.6g}")
        lines.append(cells)
    widths = [max(len(cells[i]) for cells in [header, *lines]) for i in range(len(header))]
    return "\n".join("  ".join(cell.ljust(width) for cell, width in zip(cells, widths)).rstrip()
                     for cells in [header, *lines])


def plot(rows: list[Row], path: str) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise UserError("--plot needs matplotlib (pip install matplotlib)") from None
    positions = range(len(rows))
    fig, ax = plt.subplots(figsize=(max(6, 0.3 * len(rows)), 4))
    ax.plot(positions, [row.fro for row in rows], "o-", label="||W||_F")
    ax.plot(positions, [row.spec for row in rows], "s-", label="||W||_2")
    ax.axhline(1.0, color="red", linestyle="--", linewidth=1, label="Neumann bound ||W||_2 = 1")
    ax.set_xticks(list(positions), [row.name for row in rows], rotation=90, fontsize=7)
    ax.set_ylabel("norm")
    ax.legend()
    fig.tight_layout()
    try:
        fig.savefig(path)
    except (OSError, ValueError) as err:  # unwritable path, or a suffix matplotlib has no writer for
        raise UserError(f"--plot {path}: {first_line(err)}") from None
    finally:
        plt.close(fig)
