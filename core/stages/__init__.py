"""Stages: each takes a validated config and writes one run directory.

What every stage shares. A stage module defines ``Config`` (a ``RunConfig`` subclass with the stage's own sections)
and ``main(ctx)``; each research system keeps its own stage in its folder (``subnetworks/ablate.py``,
``subnetworks/transfer.py``, ``guidance/guide.py``, ``compare/stage.py``, ``stitching/stage.py``, ``align/stage.py``,
each registering a ``Stage`` in ``runner.STAGES``), and this package holds the base training stage (``base``) and
the machinery:

* ``runner``: ``execute`` runs a stage end to end (seed, device, run directory, finish or clean up);
* ``upstream``: runs a stage needs, named by run directory or config file, produced first when missing;
* ``task``: the task loss of an objective and the evaluation every stage reports (accuracy, loss, shape bias);
* ``compatibility``: checks that a saved model and this run's data belong together.

The runner's entry points are re-exported here (``from instill.stages import execute``).
"""

from .runner import STAGES, Context, Interrupted, Stage, build_data, execute, get_stage, load_stage_config
from .upstream import UpstreamPlacement, resolve_upstream, upstream_runs_in

__all__ = ["STAGES", "Context", "Interrupted", "Stage", "UpstreamPlacement", "build_data", "execute", "get_stage",
           "load_stage_config", "resolve_upstream", "upstream_runs_in"]
