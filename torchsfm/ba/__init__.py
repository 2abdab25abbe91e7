"""Bundle adjustment on the data model (bundle_adjustment.py) and BAL problems (bal.py)."""
from .bundle_adjustment import BundleAdjustmentOptions, ReprojectionProblem, bundle_adjust

__all__ = ["BundleAdjustmentOptions", "ReprojectionProblem", "bundle_adjust"]
