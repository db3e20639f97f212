"""The lab: data, models, training runs, plots and reports behind ``normlab demo`` and
``normlab experiment``.

Submodules are imported on use (``normlab.experiments.data`` etc.), so importing this
package is cheap.
"""

from normlab.experiments.registry import EXPERIMENTS

__all__ = ["EXPERIMENTS"]
