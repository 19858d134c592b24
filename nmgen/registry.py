"""The registry of kernel specs: which derivation modules feed the generator, in order."""

from __future__ import annotations

import importlib

from nmgen.derivations.spec import KernelSpec

#: Derivation modules, in the order their kernels appear in the generated files.
DERIVATION_MODULES = (
    "nmgen.derivations.theorem1",
    "nmgen.derivations.lemma1",
    "nmgen.derivations.lemma2",
    "nmgen.derivations.lemma3",
    "nmgen.derivations.theorem2",
    "nmgen.derivations.exact_cross_moment",
    "nmgen.derivations.cross_covariance",
    "nmgen.derivations.pair_tail",
    "nmgen.derivations.series_kernel",
    "nmgen.derivations.proposition1",
)


def modules():
    """Import and return the derivation modules."""
    return [importlib.import_module(m) for m in DERIVATION_MODULES]


def kernel_specs() -> list[KernelSpec]:
    """Every registered kernel spec, in generation order; names are unique."""
    specs = [k for m in modules() for k in getattr(m, "KERNELS", ())]
    names = [k.name for k in specs]
    dup = {n for n in names if names.count(n) > 1}
    if dup:
        raise ValueError(f"duplicate kernel names: {sorted(dup)}")
    return specs


def get(name: str) -> KernelSpec:
    """The spec called ``name``."""
    for k in kernel_specs():
        if k.name == name:
            return k
    raise KeyError(f"no kernel {name!r}; known: {[k.name for k in kernel_specs()]}")
