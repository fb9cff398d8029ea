"""Parameter roles: each module declares what its parameters are, next to their definition.

The optimizer groups parameters by role (decoupled weight decay per role), so no name matching is
needed anywhere. `set_role(module, role)` tags the module's matrices with `role` and its vectors
(biases, gains) with "no_decay"; `set_role(param, role)` tags one parameter as given.
"""
from torch import nn

ROLES = ("qk", "vo", "mixer_other", "mlp", "embed", "no_decay")


def set_role(obj, role: str):
    if role not in ROLES:
        raise ValueError(f"unknown parameter role {role!r}; expected one of {ROLES}")
    if isinstance(obj, nn.Parameter):
        obj._role = role
    else:
        for p in obj.parameters():
            p._role = role if p.ndim >= 2 else "no_decay"
    return obj


def param_role(p: nn.Parameter):
    """The declared role, or "no_decay" for an untagged vector, or None for an untagged matrix."""
    return getattr(p, "_role", "no_decay" if p.ndim < 2 else None)
