"""Certified robustness: proven lower bounds on robust accuracy, to set beside the upper bounds attacks give.

* :mod:`robustcnn.certify.smoothing` — randomized smoothing (Cohen et al. 2019): L2 radii for a smoothed classifier.
* :mod:`robustcnn.certify.ibp` — interval bound propagation (Gowal et al. 2018): Linf verification of the model
  itself, and the bounds IBP training minimizes.
"""

from robustcnn.certify.evaluate import IBPResult, certified_accuracy, ibp_certify, smooth_certify
from robustcnn.certify.ibp import bounds, check_supported, margin_lower_bounds, verified, verified_loss
from robustcnn.certify.smoothing import ABSTAIN, Certificate, Smoothed, add_gaussian_noise

__all__ = ["ABSTAIN", "Certificate", "IBPResult", "Smoothed", "add_gaussian_noise", "bounds", "certified_accuracy",
           "check_supported", "ibp_certify", "margin_lower_bounds", "smooth_certify", "verified", "verified_loss"]
