"""The one list of a run's trained components: what each is called, where it lives, what it is built from.

A component is a model a job trains after `ddm prepare` and pins by SHA-256 in the manifest. Every layer that
needs "which components are there" reads this registry: the manifest (which sections stay out of the run id,
which weights a record's identity covers), `Run`, export, evaluation, `ddm sample --model` and the jobs that
record them. Adding a component is one entry here.

Which network a component restores into is named (`builds`: "dit" or "router"), not imported: this layer sits
below `experts/` and `router/`, whose factories the sampling layer picks by that name.

Identity (`ddm.data.manifest`): no component enters the run id (`plan_sha256`); the identity verification
records carry (`manifest_sha256`) covers the plan and the weights of the components with `in_ensemble`, the
ones a routed ensemble sample uses. Training the monolith or distilling a student therefore leaves every
record and every export of the run valid.
"""

from __future__ import annotations

import dataclasses

from ddm.core.errors import DDMError


@dataclasses.dataclass(frozen=True)
class Component:
    """One kind of trained component.

    name: its manifest section and human name ("experts" is the section of the per-cluster experts).
    folder: where it trains, RUN/<folder>/ (RUN/<folder>/<k>/ when per-cluster).
    config: the config section holding its model and training settings ("expert", "router", "monolith",
        "distill").
    per_cluster: one per cluster (manifest section {"k": entry}) rather than one per run (section = entry).
    builds: the network its weights restore into: "dit" or "router".
    in_ensemble: the routed ensemble samples with it, so its weights are part of a record's identity.
    command: the CLI command that trains it (named in "not trained" errors).
    """

    name: str
    folder: str
    config: str
    per_cluster: bool
    builds: str
    in_ensemble: bool
    command: str


EXPERTS = Component("experts", "experts", "expert", per_cluster=True, builds="dit", in_ensemble=True,
                    command="ddm train-islands")
ROUTER = Component("router", "router", "router", per_cluster=False, builds="router", in_ensemble=True,
                   command="ddm train-router")
MONOLITH = Component("monolith", "monolith", "monolith", per_cluster=False, builds="dit", in_ensemble=False,
                     command="ddm train-monolith")
STUDENT = Component("student", "student", "distill", per_cluster=False, builds="dit", in_ensemble=False,
                    command="ddm distill")

COMPONENTS = (EXPERTS, ROUTER, MONOLITH, STUDENT)
SECTIONS = tuple(c.name for c in COMPONENTS)  # manifest sections that are components (none enter the run id)
ENSEMBLE = tuple(c for c in COMPONENTS if c.in_ensemble)  # what a record's identity covers
# Single DiTs sampled on their own (`ddm sample --model`, rows of `ddm evaluate`), beside the ensemble.
SINGLES = tuple(c for c in COMPONENTS if not c.per_cluster and c.builds == "dit")
SINGLE_NAMES = tuple(c.name for c in SINGLES)


def component(name: str) -> Component:
    """The registered component called `name`; DDMError naming the known ones otherwise."""
    for c in COMPONENTS:
        if c.name == name:
            return c
    raise DDMError(f"unknown component {name!r} (known: {', '.join(SECTIONS)})")
