"""The table of poolings: every training-free pooling's name, parameter, default and formula.

Torch-free, so everything reads it: `--pooling` on the command line (parsed while the command
line is read, before torch loads), ingest, the torch registry (`features.pooling`), the numpy
forms of the torch-free query (`features.pooling_np`), eval, and the README's table (a test
holds them equal). A pooling's computation is a function of its family in `pooling` (torch) and,
where it has one, `pooling_np` (numpy); its row here gives its name and parameter.

A parametrised family is named `<family>-<letter><value>` (`gem-p3`, `rmac-l2`, `spoc-s0.5`);
`show_default` says whether the default value appears in the canonical name (`gem-p3`) or not
(`spoc`). To add a pooling: one function in `pooling.py` (and one in `pooling_np.py` for the
torch-free query) and one row here (README, "Adding a pooling").
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

#: Default SPoC sigma factor: one third of the distance centre -> closest boundary.
SPOC_DEFAULT_S = 1.0 / 3.0


def _fmt_num(v: float) -> str:
    if math.isfinite(v) and v == int(v) and abs(v) < 1e15:
        return str(int(v))
    return repr(float(v))


@dataclass(frozen=True)
class PoolingSpec:
    """One pooling family as users name it."""

    family: str
    formula: str
    reference: str
    letter: str | None = None  # the parameter's letter (gem-p3), None: no parameter
    default: float | int | None = None
    integer: bool = False
    show_default: bool = True
    dim_factor: int = 1  # descriptor length = dim_factor x channels
    in_defaults: bool = True  # stored by ingest when --pooling is not given

    def parse(self, raw: str | None) -> float | int | None:
        """The parameter from its text (None: the default); ValueError when invalid."""
        if self.letter is None:
            if raw is not None:
                raise ValueError
            return None
        if raw is None:
            return self.default
        value = float(raw)
        if not math.isfinite(value) or value <= 0:
            raise ValueError
        if self.integer:
            if value != int(value):
                raise ValueError
            return int(value)
        return value

    def name(self, param: float | int | None) -> str:
        """The canonical name of this family at a parameter value."""
        if self.letter is None or (param == self.default and not self.show_default):
            return self.family
        return f"{self.family}-{self.letter}{_fmt_num(param)}"

    @property
    def form(self) -> str | None:
        """`gem-p<float>`: how a parametrised family is written (None without a parameter)."""
        if self.letter is None:
            return None
        return f"{self.family}-{self.letter}<{'int' if self.integer else 'float'}>"


#: Every built-in pooling, in the order ingest stores them.
TABLE: tuple[PoolingSpec, ...] = (
    PoolingSpec("sum", "f_k = sum over (y, x) of X_k(y, x) (uCroW)", "Comor eq. 1; Kalantidis"),
    PoolingSpec("spoc", "f_k = sum alpha(y, x) X_k(y, x), alpha a centred Gaussian, sigma = "
                "s * min(H, W) / 2", "Babenko sec. 3.2 eq. 3-4", letter="s",
                default=SPOC_DEFAULT_S, show_default=False),
    PoolingSpec("mac", "f_k = max over (y, x) of X_k(y, x)", "Comor eq. 2"),
    PoolingSpec("mac2x2", "MAC of the four quadrants [TL, TR, BL, BR] concatenated (4C)",
                "Comor eq. 3", dim_factor=4),
    PoolingSpec("crow", "S = (S'/‖S'‖)^(1/2), S' = sum_k X_k; beta_k = log((K eps + sum_h Q_h) "
                "/ (eps + Q_k)); f_k = beta_k sum S(y, x) X_k(y, x)",
                "Kalantidis sec. 4 eq. 3-6 (a = 2, b = 2)"),
    PoolingSpec("crow-sw", "CroW's spatial weighting only: f_k = sum S(y, x) X_k(y, x)",
                "Kalantidis Fig. 5b"),
    PoolingSpec("crow-ssw", "CroW's channel weighting only: f_k = beta_k sum X_k(y, x)",
                "Kalantidis Fig. 5b"),
    PoolingSpec("gem", "f_k = (mean max(X_k, 1e-6)^p)^(1/p)", "Radenovic et al. 2018",
                letter="p", default=3.0),
    PoolingSpec("rmac", "sum over the regions of L scales (40% overlap) of L2-normalised MACs, "
                "plus the global MAC", "Tolias et al. 2016", letter="l", default=3,
                integer=True),
)

#: family -> spec: the table, plus any family a user registers (`pooling.register`)
SPECS: dict[str, PoolingSpec] = {s.family: s for s in TABLE}

#: What ingest stores when --pooling is not given.
DEFAULT_POOLINGS: tuple[str, ...] = tuple(s.name(s.default) for s in TABLE if s.in_defaults)
#: The parametrised forms (`gem-p<float>`), for messages and the CLI's help.
POOLING_FORMS: tuple[str, ...] = tuple(s.form for s in TABLE if s.form)


def add(spec: PoolingSpec) -> PoolingSpec:
    """Make a family's name parseable everywhere (a user's own pooling)."""
    SPECS[spec.family] = spec
    _resolve.cache_clear()
    return spec


def remove(family: str) -> None:
    """Forget a family `add` made known (the table's own rows stay)."""
    if SPECS.get(family) not in TABLE:
        SPECS.pop(family, None)
        _resolve.cache_clear()


def _unknown_msg(name: object) -> str:
    forms = ", ".join(s.form for s in SPECS.values() if s.form)
    return (f"Unknown pooling {name!r}; valid names are {', '.join(DEFAULT_POOLINGS)}"
            f" and the parametrised forms {forms}.")


@functools.lru_cache(maxsize=256)
def _resolve(key: str) -> tuple[PoolingSpec, float | int | None]:
    if key in SPECS:
        spec = SPECS[key]
        return spec, spec.parse(None)
    for family in sorted(SPECS, key=len, reverse=True):
        spec = SPECS[family]
        prefix = f"{family}-{spec.letter}"
        if spec.letter and key.startswith(prefix):
            try:
                return spec, spec.parse(key[len(prefix):])
            except ValueError:
                raise ValueError(f"Invalid pooling {key!r}: the parameter of {family}-"
                                 f"{spec.letter}<value> must be a finite number > 0"
                                 + (" and an integer" if spec.integer else "") + ".") from None
    raise ValueError(_unknown_msg(key))


def parse_pooling(name: str) -> tuple[PoolingSpec, float | int | None]:
    """(family, parameter) of a pooling name: the one parser of pooling names; ValueError
    naming the valid forms."""
    if not isinstance(name, str):
        raise ValueError(_unknown_msg(name))
    return _resolve(name.strip().lower())


def canonical_pooling_name(name: str) -> str:
    """Normalise a pooling name (case, numeric form), e.g. 'GEM-P3.0' -> 'gem-p3'."""
    spec, param = parse_pooling(name)
    return spec.name(param)


def pooled_dim(name: str, channels: int) -> int:
    """Descriptor length for a pooling of a C-channel map (4C for mac2x2, Comor eq. 3)."""
    return parse_pooling(name)[0].dim_factor * int(channels)


def markdown_table() -> str:
    """The table as the README prints it (a test holds the README to it)."""
    rows = ["| name | definition | paper |", "| --- | --- | --- |"]
    for s in TABLE:
        name = f"`{s.name(s.default)}`" + (f" (`{s.form}`)" if s.form else "")
        rows.append(f"| {name} | {s.formula} | {s.reference} |")
    return "\n".join(rows)


__all__ = ["markdown_table", "PoolingSpec", "TABLE", "SPECS", "DEFAULT_POOLINGS", "POOLING_FORMS",
           "add", "remove",
           "parse_pooling", "canonical_pooling_name", "pooled_dim", "SPOC_DEFAULT_S"]
