"""Plans as operators change them: what a valid plan is, and an update applied to one."""

from __future__ import annotations

import re
from dataclasses import dataclass, replace

from quotagate.core.errors import InvalidRequest
from quotagate.core.model import ModelWeight, Plan

MAX_ALLOWANCE = 1_000_000_000_000
PLAN_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")


def validate_plan(plan: Plan) -> Plan:
    """The plan if every field is usable by a decision; InvalidRequest naming the first bad field otherwise."""
    if not PLAN_ID.fullmatch(plan.id):
        raise InvalidRequest("plan id must be 1-64 letters, digits, '.', '_' or '-', starting with a letter or digit")
    if len(plan.name) > 200 or not plan.name.isprintable():
        raise InvalidRequest("plan name must be at most 200 printable characters")
    if not 0 <= plan.monthly_allowance <= MAX_ALLOWANCE:
        raise InvalidRequest(f"monthly_allowance must be between 0 and {MAX_ALLOWANCE}")
    for name in ("warn_threshold", "critical_threshold"):
        if not 0.0 < getattr(plan, name) <= 1.0:
            raise InvalidRequest(f"{name} must be a fraction in (0, 1]")
    if plan.warn_threshold > plan.critical_threshold:
        raise InvalidRequest("warn_threshold must not be above critical_threshold")
    for weight in plan.weights:
        if not weight.pattern or len(weight.pattern) > 200:
            raise InvalidRequest("a model weight needs a pattern of at most 200 characters")
        if weight.input < 0 or weight.output < 0:
            raise InvalidRequest(f"model weights must not be negative ({weight.pattern!r})")
    return plan


@dataclass(frozen=True)
class PlanChanges:
    """What an admin changes on a plan; None leaves a field as it is."""

    name: str | None = None
    monthly_allowance: int | None = None
    warn_threshold: float | None = None
    critical_threshold: float | None = None
    weights: tuple[ModelWeight, ...] | None = None
    active: bool | None = None

    def apply(self, plan: Plan) -> Plan:
        return replace(
            plan,
            name=plan.name if self.name is None else self.name,
            monthly_allowance=plan.monthly_allowance if self.monthly_allowance is None else self.monthly_allowance,
            warn_threshold=plan.warn_threshold if self.warn_threshold is None else self.warn_threshold,
            critical_threshold=plan.critical_threshold if self.critical_threshold is None else self.critical_threshold,
            weights=plan.weights if self.weights is None else self.weights,
            active=plan.active if self.active is None else self.active,
        )


def plan_fields(plan: Plan) -> dict[str, object]:
    """A plan as the audit log shows it."""
    return {
        "name": plan.name,
        "monthly_allowance": plan.monthly_allowance,
        "warn_threshold": plan.warn_threshold,
        "critical_threshold": plan.critical_threshold,
        "model_weights": [{"pattern": w.pattern, "input": w.input, "output": w.output} for w in plan.weights],
        "active": plan.active,
    }
