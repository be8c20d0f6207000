"""`ControlAdapterConfig`: the options of a Control Adapter, validated when built.

Every invalid value raises `craft.errors.UserError` with a message that names the field, so the TOML engine and
the CLI can pass user input straight through.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields

from ..errors import UserError

TARGETS = ("sublayers", "block")
TYPES = ("lowrank", "symmetric")
INVERSES = ("exact", "neumann")
DTYPES = ("float32", "bfloat16")


@dataclass
class ControlAdapterConfig:
    """Options of a Control Adapter (one per selected decoder layer, all built from the same config).

    Attributes:
        rank: r, the rank of W (hidden x hidden).
        alpha: scale numerator; `None` means sqrt(rank) (rsLoRA), so `scale = alpha / rank = 1 / sqrt(rank)`.
        dropout: dropout probability on the adapter's input path (the delta fed to A), training mode only.
        layers_to_transform: which decoder layers get an adapter: None (all), an int, a list of ints, or a string
            'a:b' (inclusive at both ends, first layer 0) or 'a'.
        target: "sublayers" (each residual write: attention output and MLP output, with the same W) or "block"
            (the whole block delta `layer(h) - h`).
        type: "lowrank" (W = scale * B @ A) or "symmetric" (W = Q diag(exp(S) - 1) Q^T).
        inverse: "exact" (Woodbury, an r x r solve) or "neumann" (truncated series of order `neumann_order`).
        neumann_order: highest power of -W kept by the Neumann inverse; 4 keeps the relative truncation error below
            ||W||_2^5 / (1 - ||W||_2), about 0.1 % at the recommended ||W||_2 <= 0.25.
        gamma: step size of the orthogonality step Q <- Q - gamma Q (Q^T Q - I) for "symmetric"; 0.1 contracts
            the error ||Q^T Q - I|| by about 0.8 per step and stays stable for singular values of Q below 3.3.
        class0_lambda: weight of the auxiliary loss on neutral (class 0) tokens.
        dtype: storage dtype of the adapter parameters; computation is always at least float32.
    """

    rank: int = 16
    alpha: float | None = None
    dropout: float = 0.0
    layers_to_transform: int | str | list[int] | None = None
    target: str = "sublayers"
    type: str = "lowrank"
    inverse: str = "exact"
    neumann_order: int = 4
    gamma: float = 0.1
    class0_lambda: float = 0.0
    dtype: str = "float32"

    def __post_init__(self):
        if isinstance(self.rank, bool) or not isinstance(self.rank, int) or self.rank < 1:
            raise UserError(f"control adapter 'rank' must be a positive integer, got {self.rank!r}")
        if self.alpha is not None and not (_is_number(self.alpha) and self.alpha > 0):
            raise UserError(f"control adapter 'alpha' must be a positive number or None, got {self.alpha!r}")
        if not (_is_number(self.dropout) and 0.0 <= self.dropout < 1.0):
            raise UserError(f"control adapter 'dropout' must be in [0, 1), got {self.dropout!r}")
        for name, allowed in (("target", TARGETS), ("type", TYPES), ("inverse", INVERSES), ("dtype", DTYPES)):
            if getattr(self, name) not in allowed:
                raise UserError(f"control adapter '{name}' must be one of {', '.join(allowed)}; "
                                f"got {getattr(self, name)!r}")
        if isinstance(self.neumann_order, bool) or not isinstance(self.neumann_order, int) or self.neumann_order < 1:
            raise UserError(f"control adapter 'neumann_order' must be an integer >= 1, got {self.neumann_order!r}")
        if not (_is_number(self.gamma) and 0.0 <= self.gamma < 1.0):
            raise UserError(f"control adapter 'gamma' must be in [0, 1), got {self.gamma!r}")
        if not (_is_number(self.class0_lambda) and self.class0_lambda >= 0):
            raise UserError(f"control adapter 'class0_lambda' must be >= 0, got {self.class0_lambda!r}")
        _check_layer_spec(self.layers_to_transform)

    @property
    def effective_alpha(self) -> float:
        """alpha, with the rsLoRA default sqrt(rank) filled in."""
        return float(self.alpha) if self.alpha is not None else math.sqrt(self.rank)

    @property
    def scale(self) -> float:
        """s = alpha / rank, the factor in W = s * B @ A."""
        return self.effective_alpha / self.rank

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, values: dict) -> "ControlAdapterConfig":
        """Build from a dict, ignoring keys that are not config fields (e.g. the extra keys of adapter_config.json)."""
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in values.items() if k in names})


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _check_layer_spec(spec):
    if spec is None or (isinstance(spec, int) and not isinstance(spec, bool)):
        return
    if isinstance(spec, str):
        _parse_range(spec)
        return
    if isinstance(spec, (list, tuple)) and all(isinstance(i, int) and not isinstance(i, bool) for i in spec):
        return
    raise UserError(f"control adapter 'layers_to_transform' must be None, an int, a list of ints or 'a:b'; "
                    f"got {spec!r}")


def _parse_range(spec: str) -> list[int]:
    parts = spec.strip().split(":")
    try:
        bounds = [int(p) for p in parts]
    except ValueError:
        bounds = []
    if len(bounds) not in (1, 2) or (len(bounds) == 2 and bounds[0] > bounds[1]):
        raise UserError(f"control adapter 'layers_to_transform' string must be 'a:b' (inclusive, a <= b) or 'a'; "
                        f"got {spec!r}")
    return list(range(bounds[0], bounds[-1] + 1))


def resolve_layers(spec, num_layers: int) -> list[int]:
    """The sorted layer indices selected by `layers_to_transform` for a model with `num_layers` decoder layers.

    'a:b' is inclusive at both ends (the seed README's convention: '0:29' is 30 layers).
    """
    _check_layer_spec(spec)
    if spec is None:
        return list(range(num_layers))
    if isinstance(spec, int):
        layers = [spec]
    elif isinstance(spec, str):
        layers = _parse_range(spec)
    else:
        layers = list(spec)
    bad = [i for i in layers if not 0 <= i < num_layers]
    if bad or not layers:
        raise UserError(f"control adapter 'layers_to_transform' selects layers {bad or layers} outside "
                        f"0..{num_layers - 1} (the model has {num_layers} decoder layers)")
    return sorted(set(layers))
